"""train.train_epochs / train.save_every_n_epochs become train_steps / save_step: the arithmetic, bad values,
and a real run that stops and saves on epoch boundaries."""
from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.config.validation import ConfigError
from hcpdiff_like.training.epochs import steps_from_epochs
from hcpdiff_like.training.trainer import Trainer


def train_cfg(**keys):
    return OmegaConf.create({"train_steps": 1000, "save_step": 100, "gradient_accumulation_steps": 1, **keys})


def test_epochs_count_optimizer_steps_of_the_first_dataset():
    assert steps_from_epochs(train_cfg(), 10) is None  # neither key set: nothing changes
    assert steps_from_epochs(train_cfg(train_epochs=3), 10) == {"steps_per_epoch": 10, "train_steps": 30,
                                                                "save_step": 100}
    # 5 batches with accumulation 2: 3 optimizer steps per epoch (the last one takes the odd batch)
    assert steps_from_epochs(train_cfg(train_epochs=2, save_every_n_epochs=1, gradient_accumulation_steps=2), 5) == {
        "steps_per_epoch": 3, "train_steps": 6, "save_step": 3}
    assert steps_from_epochs(train_cfg(save_every_n_epochs=2), 4)["train_steps"] == 1000
    for bad in (0, -1, 1.5, "3", True):
        with pytest.raises(ConfigError, match="train.train_epochs="):
            steps_from_epochs(train_cfg(train_epochs=bad), 4)


def test_a_run_in_epochs_stops_and_saves_on_epoch_boundaries(tmp_path, demo_images):
    # the demo set: 8 images, batch 2 -> 4 optimizer steps per epoch
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={demo_images}", "logger=[console]",
                          "train.train_epochs=2", "train.save_every_n_epochs=1", "train.train_steps=999",
                          "validation.every_n_steps=0"])
    trainer = Trainer(cfg, exp_dir=str(tmp_path / "exp")).setup()
    assert (trainer.cfg.train.train_steps, trainer.cfg.train.save_step) == (8, 4)
    summary = trainer.train()
    trainer.cleanup()
    assert summary["steps"] == 8
    assert sorted(p.name for p in trainer.exp.ckpt_dir.glob("unet-*.safetensors")) == ["unet-4.safetensors",
                                                                                      "unet-8.safetensors"]
    assert "4 optimizer steps per epoch of dataset1: train_steps 8, save_step 4" in (trainer.exp.path /
                                                                                      "train.log").read_text()
