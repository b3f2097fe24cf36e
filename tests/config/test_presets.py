"""Concept presets (cfg=preset/style|object|face): they compose, set what docs/presets.md says they set
(flip, caption templates, LoRA rank, steps, loss masks), and train on the tiny model."""
from __future__ import annotations

import csv

import pytest
from PIL import Image

from hcpdiff_like.config.launcher import compose_config, shipped_cfg_dir
from hcpdiff_like.config.validation import ConfigError, validate_config
from hcpdiff_like.data.demo import make_demo_dataset
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer

PRESETS = {  # what each preset claims: flip, first template line, rank, steps
    "style": (True, "in the style of {name}, {caption}", 16, 1000),
    "object": (True, "a photo of {name}, {caption}", 8, 800),
    "face": (False, "a photo of {name}, {caption}", 8, 300),
}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    root = tmp_path_factory.mktemp("preset_data")
    folder = make_demo_dataset(root / "images", count=4)
    masks = root / "masks"
    masks.mkdir()
    for image in folder.glob("*.png"):  # left half counts, right half is ignored
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (0, 0, 32, 64))
        mask.save(masks / image.name)
    return folder, masks


def preset_cfg(name, folder, *overrides):
    return compose_config([f"cfg=preset/{name}", "model=tiny_sd1", f"dataset_dir={folder}", "concept_name=tok",
                           "data.dataset1.resolution=64", "data.dataset1.batch_size=2", "logger=[console]",
                           *overrides])


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_composes_and_sets_what_it_claims(name, images):
    flip, first_template, rank, steps = PRESETS[name]
    cfg = preset_cfg(name, images[0])
    validate_config(cfg)
    source = cfg.data.dataset1.sources.source1
    assert cfg.data.dataset1.flip is flip
    templates = (shipped_cfg_dir() / "train" / "preset" / "templates" / f"{name}.txt").read_text().splitlines()
    assert source.prompt_template.endswith(f"templates/{name}.txt") and templates[0] == first_template
    assert source.word_names.name == "tok" and source.mask_dir is None
    assert (cfg.plugin.rank, cfg.train.train_steps) == (rank, steps)
    # without the required values the preset refuses to start, naming them
    with pytest.raises(ConfigError, match="concept_name"):
        validate_config(compose_config([f"cfg=preset/{name}", "model=tiny_sd1", f"dataset_dir={images[0]}"]))


def test_presets_train_two_steps_with_their_captions_flip_rank_and_masks(tmp_path, images):
    folder, masks = images
    source = "hcpdiff_like.data.sources.ImageCaptionSource"
    extra_source = f"+validation.sources.extra={{_target_:{source},img_dir:'{folder}'}}"
    runs = {"style": ["data.dataset1.validation_split=0.25", "validation.every_n_steps=1",
                      "validation.timesteps=[500]", extra_source],
            "object": ["validation.every_n_steps=0"],
            "face": [f"mask_dir={masks}", "validation.every_n_steps=0"]}
    for name, extra in runs.items():
        flip, first_template, rank, _ = PRESETS[name]
        cfg = preset_cfg(name, folder, "train.train_steps=2", "train.save_step=100", *extra)
        trainer = Trainer(cfg, exp_dir=str(tmp_path / name)).setup()
        handle = trainer.datasets[0]
        record = handle.dataset.records[0]
        caption = record.image_path.with_suffix(".txt").read_text()
        assert record.caption == first_template.format(name="tok", caption=caption)
        assert handle.dataset.flip is flip
        if name == "face":
            assert all(r.mask_path is not None for r in handle.dataset.records)
            batch = next(iter(handle.loader))
            assert batch["loss_mask"].shape == (2, 1, 64, 64)
            assert batch["loss_mask"][:, :, :, :32].min() == 1 and batch["loss_mask"][:, :, :, 32:].max() == 0
        trainer.train()
        trainer.cleanup()
        state, _ = load_safetensors(tmp_path / name / "ckpts" / "unet-2.safetensors")
        ranks = {tensor.shape[0] for key, tensor in state.items() if key.endswith("lora_A.weight")}
        assert ranks == {rank}
    # style held out 1 of its 4 images and validated on it and on the extra folder (4 images) at steps 0, 1, 2;
    # val_loss is the mean over all 5 images
    rows = list(csv.DictReader((tmp_path / "style" / "validation.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    for row in rows:
        expected = (float(row["dataset1"]) * 1 + float(row["extra"]) * 4) / 5
        assert float(row["val_loss"]) == pytest.approx(expected, rel=1e-6) and expected > 0


def test_missing_trigger_word_is_one_clear_line_from_the_entry_point(run_train, images):
    with pytest.raises(SystemExit, match="required config value.*concept_name"):
        run_train("cfg=preset/face", "model=tiny_sd1", f"dataset_dir={images[0]}")
