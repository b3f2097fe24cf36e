"""tools.diffusers2sd and tools.sd2diffusers: folder -> single file -> folder, offline, with safe overwrites."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.tools import diffusers2sd, sd2diffusers


def _same_weights(a, b):
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(a, name) is None:
            assert getattr(b, name) is None
            continue
        state_a, state_b = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert state_a.keys() == state_b.keys()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a), name


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_folder_to_single_file_and_back(family, request, tmp_path, capsys):
    folder = request.getfixturevalue(f"tiny_{family}")
    single = tmp_path / "model.safetensors"
    assert diffusers2sd.main(["--model_path", str(folder), "--save_path", str(single)]) == 0
    back = tmp_path / "back"
    assert sd2diffusers.main(["--checkpoint_path", str(single), "--config_dir", str(folder),
                              "--dump_path", str(back)]) == 0
    assert (back / "model_index.json").is_file() and (back / "tokenizer" / "tokenizer_config.json").is_file()
    original, restored = load_model_bundle(str(folder)), load_model_bundle(str(back))
    assert restored.family == family
    _same_weights(original, restored)
    assert restored.noise_scheduler.config.prediction_type == original.noise_scheduler.config.prediction_type
    assert not list(tmp_path.glob(".*tmp*"))  # no temp leftovers


def test_tools_refuse_to_overwrite_and_wrong_inputs(tiny_sd1, tmp_path, capsys):
    single = tmp_path / "m.safetensors"
    single.write_bytes(b"old")
    assert diffusers2sd.main(["--model_path", str(tiny_sd1), "--save_path", str(single)]) == 2
    assert "--overwrite" in capsys.readouterr().err and single.read_bytes() == b"old"
    assert diffusers2sd.main(["--model_path", str(tiny_sd1), "--save_path", str(single), "--overwrite",
                              "--half"]) == 0
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as handle:
        assert handle.get_tensor("model.diffusion_model.out.2.weight").dtype == torch.float16

    missing = ["--model_path", str(tmp_path / "nope"), "--save_path", str(tmp_path / "x.safetensors")]
    assert diffusers2sd.main(missing) == 2
    assert "not a diffusers folder" in capsys.readouterr().err
    assert diffusers2sd.main(["--model_path", str(tiny_sd1), "--save_path", str(tmp_path / "x.ckpt")]) == 2
    assert ".safetensors" in capsys.readouterr().err

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    assert sd2diffusers.main(["--checkpoint_path", str(single), "--config_dir", str(tiny_sd1),
                              "--dump_path", str(existing)]) == 2
    assert (existing / "keep.txt").read_text() == "mine"
    assert sd2diffusers.main(["--checkpoint_path", str(tmp_path / "notes.txt"), "--config_dir", str(tiny_sd1),
                              "--dump_path", str(tmp_path / "out")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert sd2diffusers.main(["--checkpoint_path", str(single), "--config_dir", str(tiny_sd1),
                              "--dump_path", str(existing), "--overwrite"]) == 0
    assert not (existing / "keep.txt").exists() and (existing / "unet").is_dir()


def test_help_runs_as_module():
    for tool in ("sd2diffusers", "diffusers2sd"):
        result = subprocess.run([sys.executable, "-m", f"hcpdiff_like.tools.{tool}", "--help"], capture_output=True,
                                text=True, timeout=120)
        assert result.returncode == 0 and "--overwrite" in result.stdout
