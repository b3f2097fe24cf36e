"""tools.prepare_config: a pipeline dataset tree -> a composable experiment config (+ embeddings) that trains."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hydra.utils import instantiate

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.tools import prepare_config

WORDS = {"aobakokona": ["brown hair", "short hair"], "screenshots": ["anime screencap"]}


@pytest.fixture()
def dataset(tmp_path):
    """training/screenshots/1_character/aobakokona (2 images, multiply 2.6), booru/aobakokona (2, none),
    regularization (2, multiply 0.4); captions name the trigger words like the pipeline's do."""
    from PIL import Image

    root = tmp_path / "training"
    layout = {"screenshots/1_character/aobakokona": "2.6", "booru/aobakokona": None, "regularization": "0.4"}
    for index, (relative, multiply) in enumerate(layout.items()):
        folder = root / relative
        folder.mkdir(parents=True)
        for n in range(2):
            Image.new("RGB", (64, 64), (40 * index, 90 * n, 200)).save(folder / f"{n}.png")
            (folder / f"{n}.txt").write_text("aobakokona, screenshots, 1girl, brown hair")
        if multiply:
            (folder / "multiply.txt").write_text(multiply)
    (root / "emb_init.json").write_text(json.dumps(WORDS, indent=4))
    return root


@pytest.mark.slow
def test_pivotal_config_composes_creates_embeddings_and_trains(dataset, tiny_sd1, tmp_path, run_train):
    dst = tmp_path / "run"
    assert prepare_config.main(["--dataset_dir", str(dataset), "--config_dst_dir", str(dst), "--pivotal",
                                "--trigger_word_file", str(dataset / "emb_init.json"), "--model", str(tiny_sd1),
                                "--n_vectors", "3"]) == 0
    config = dst / "prepared.yaml"
    assert config.read_text().startswith("# @package _global_")
    from hcpdiff_like.plugins.embedding_files import read_embedding

    for name in WORDS:
        assert read_embedding(dst / "embs" / f"{name}.pt").n_vectors == 3

    cfg = compose_config([f"cfg={config}"])
    assert cfg.model.clip_skip == 1  # inherited from the shipped lora_anime_character (anime_sd1)
    assert [w.name for w in cfg.embeddings.train] == list(WORDS)
    sources = {k: instantiate(v) for k, v in cfg.data.dataset1.sources.items()}
    repeats = {s.name: s.repeat for s in sources.values()}
    assert repeats == {"booru/aobakokona": 1, "regularization": 0.4, "screenshots/1_character/aobakokona": 2.6}
    assert sum(r.repeat for s in sources.values() for r in s.records()) == pytest.approx(2 * 1 + 2 * 0.4 + 2 * 2.6)
    assert all(r.caption.startswith("aobakokona") for s in sources.values() for r in s.records())

    results, runs = run_train(f"cfg={config}", "data.dataset1.resolution=64", "data.dataset1.batch_size=2",
                              "train.train_steps=2", "train.save_step=2", f"exp_root={tmp_path / 'exps'}")
    ckpts = runs[0] / "ckpts"
    assert (ckpts / "unet-2.safetensors").is_file()
    assert all((ckpts / f"{name}-2.pt").is_file() for name in WORDS)


def test_plain_config_and_refusals(dataset, tmp_path, capsys):
    dst = tmp_path / "plain"
    args = ["--dataset_dir", str(dataset), "--config_dst_dir", str(dst)]
    assert prepare_config.main(args) == 0
    cfg = compose_config([f"cfg={dst / 'prepared.yaml'}", "model.pretrained_model_name_or_path=tiny:sd1"])
    assert not (cfg.get("embeddings") or {}).get("train") and len(cfg.data.dataset1.sources) == 3
    assert prepare_config.main(args + ["--overwrite", "--round_repeats"]) == 0  # the pipeline's rounding
    assert "regularization has repeat 0" in capsys.readouterr().err  # 0.4 rounds to 0: left out, with a warning
    cfg = compose_config([f"cfg={dst / 'prepared.yaml'}", "model.pretrained_model_name_or_path=tiny:sd1"])
    assert sorted(s.repeat for s in cfg.data.dataset1.sources.values()) == [1, 3]  # 2.6 -> 3

    assert prepare_config.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert prepare_config.main(args + ["--overwrite"]) == 0
    assert prepare_config.main(args + ["--overwrite", "--pivotal"]) == 2
    assert "--trigger_word_file" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "a", "mapping"]')
    assert prepare_config.main(args + ["--overwrite", "--pivotal", "--trigger_word_file", str(bad),
                                       "--model", "tiny:sd1"]) == 2
    assert "mapping each name" in capsys.readouterr().err
    assert prepare_config.main(["--dataset_dir", str(tmp_path / "nothing"), "--config_dst_dir", str(dst)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert prepare_config.main(args + ["--overwrite", "--base_config", "no_such_recipe"]) == 2


def test_help():
    result = subprocess.run([sys.executable, "-m", "hcpdiff_like.tools.prepare_config", "--help"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "--trigger_word_file" in result.stdout
