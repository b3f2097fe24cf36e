"""tools.extract_lora on a tuned folder written from base + a known low-rank delta: the extracted files reload with
load_lora_into and reproduce the tuned model, the --to_webui file converts back to the same tensors."""
from __future__ import annotations

import pytest
import torch

from hcpdiff_like.convert.kohya_lora import kohya_to_ours, read_kohya_lora
from hcpdiff_like.convert.merge import save_bundle_as_diffusers
from hcpdiff_like.models.loading import load_model_bundle
from hcpdiff_like.plugins.lora import load_lora_into
from hcpdiff_like.tools import extract_lora
from hcpdiff_like.training.checkpoints import load_safetensors

CHANGED = {"unet": ["mid_block.attentions.0.transformer_blocks.0.attn1.to_v", "up_blocks.1.resnets.0.conv2"],
           "text_encoder": ["encoder.layers.1.mlp.fc1"]}


@pytest.fixture(scope="module")
def tuned_folder(tiny_sd1, tmp_path_factory):
    bundle = load_model_bundle(str(tiny_sd1))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for target, names in CHANGED.items():
            for name in names:
                weight = getattr(bundle, target).get_submodule(name).weight
                low_rank = torch.randn(weight.shape[0], 2, generator=generator) @ torch.randn(
                    2, weight[0].numel(), generator=generator)
                weight += 0.05 * low_rank.reshape(weight.shape)
    return save_bundle_as_diffusers(bundle, tmp_path_factory.mktemp("tuned") / "tuned")


def test_extracted_files_reproduce_the_tuned_model(tiny_sd1, tuned_folder, tmp_path):
    webui = tmp_path / "extracted-webui.safetensors"
    assert extract_lora.main(["--base", str(tiny_sd1), "--tuned", str(tuned_folder), "--rank", "2",
                              "--conv_rank", "2", "--dump_path", str(tmp_path), "--to_webui", str(webui)]) == 0
    base, tuned = load_model_bundle(str(tiny_sd1)), load_model_bundle(str(tuned_folder))
    kohya_state, kohya_meta = read_kohya_lora(webui)
    from_webui = kohya_to_ours(kohya_state, kohya_meta)
    for target, names in CHANGED.items():
        state, metadata = load_safetensors(tmp_path / f"{target}-extracted.safetensors")
        assert {k.rsplit(".lora_", 1)[0] for k in state} == set(names)
        assert all(torch.equal(from_webui[target].state[k], v) for k, v in state.items())
        model = getattr(base, target)
        load_lora_into(model, state, metadata)
        from hcpdiff_like.convert.merge import bake_adapters

        bake_adapters(model)
        tuned_state = getattr(tuned, target).state_dict()
        for key, value in model.state_dict().items():
            assert torch.allclose(value, tuned_state[key], atol=1e-5), key


def test_help_and_wrong_inputs(tiny_sd1, tiny_sdxl, tuned_folder, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        extract_lora.main(["--help"])
    assert exit_info.value.code == 0 and "--conv_rank" in capsys.readouterr().out
    assert extract_lora.main(["--base", str(tiny_sd1), "--tuned", str(tiny_sd1), "--dump_path", str(tmp_path)]) == 2
    assert "does not differ" in capsys.readouterr().err
    assert extract_lora.main(["--base", str(tiny_sd1), "--tuned", str(tiny_sdxl), "--dump_path", str(tmp_path)]) == 2
    assert "not the same model family" in capsys.readouterr().err
    (tmp_path / "unet-extracted.safetensors").write_text("keep")
    assert extract_lora.main(["--base", str(tiny_sd1), "--tuned", str(tuned_folder), "--dump_path",
                              str(tmp_path)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "unet-extracted.safetensors").read_text() == "keep"
