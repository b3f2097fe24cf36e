"""Validation loss: repeatable on the same weights, equal to the formula, moves with training, leaves the
training RNG (and so the trained weights) untouched; CSV, plot, best checkpoint and early stop."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hcpdiff_like.config.launcher import compose_config
from hcpdiff_like.data.demo import make_demo_dataset
from hcpdiff_like.training.checkpoints import load_safetensors
from hcpdiff_like.training.trainer import Trainer
from hcpdiff_like.training.validation import ValidationConfigError, ValidationLoop

SOURCE = "hcpdiff_like.data.sources.ImageCaptionSource"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation_data")
    return make_demo_dataset(root / "train", count=4), make_demo_dataset(root / "held_out", count=3, seed=50)


def make_trainer(exp_dir, train_dir, *overrides):
    cfg = compose_config(["cfg=demo", f"data.dataset1.sources.shapes.img_dir={train_dir}", "logger=[console]",
                          "train.lr=5e-3", "scheduler=constant", *overrides])
    return Trainer(cfg, exp_dir=str(exp_dir)).setup()


def held_out(folder) -> str:
    return f"+validation.sources.held_out={{_target_:{SOURCE},img_dir:'{folder}'}}"


def formula_loss(trainer, folder, timesteps, seed, batch_size) -> float:
    """Independent re-computation: VAE mean latents, noise drawn batch by batch then timestep by timestep
    from a CPU generator, mean of MSE(prediction, noise) over images and timesteps."""
    images = sorted(folder.glob("*.png"))
    generator = torch.Generator().manual_seed(seed)
    vae, unet, conditioner = trainer.bundle.vae, trainer.bundle.unet, trainer.model.conditioner
    scheduler, losses = trainer.bundle.noise_scheduler, []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            chunk = images[start:start + batch_size]
            pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(p).convert("RGB"), dtype=np.float32))
                                  .permute(2, 0, 1) / 127.5 - 1 for p in chunk])
            latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
            captions = [p.with_suffix(".txt").read_text() for p in chunk]
            hidden, _ = conditioner(captions, None)
            for t in timesteps:
                noise = torch.randn(latents.shape, generator=generator)
                steps = torch.full((len(chunk),), t)
                noisy = scheduler.add_noise(latents, noise, steps)
                prediction = unet(noisy, steps, encoder_hidden_states=hidden).sample
                losses += F.mse_loss(prediction, noise, reduction="none").mean(dim=(1, 2, 3)).tolist()
    return sum(losses) / len(losses)


def test_validation_loss_repeatable_equal_to_formula_and_moves_with_training(tmp_path, folders):
    train_dir, val_dir = folders
    trainer = make_trainer(tmp_path / "exp", train_dir, "train.train_steps=3", "validation.every_n_steps=2",
                           "validation.timesteps=[200,700]", "validation.batch_size=2", held_out(val_dir))
    assert trainer.validator.enabled and [len(s.records) for s in trainer.validator.sets] == [3]
    rng_before = torch.get_rng_state()
    first = trainer.validator.evaluate(trainer)["held_out"]
    assert torch.equal(torch.get_rng_state(), rng_before), "validation moved the global torch RNG"
    assert first == pytest.approx(formula_loss(trainer, val_dir, [200, 700], 555, 2), rel=1e-5)

    trainer.train()  # validates at step 0 (the same weights as above), 2 and 3
    history = trainer.validator.history
    assert history[0]["held_out"] == first  # exactly the same number on the same weights
    assert history[1]["held_out"] != first
    exp = trainer.exp.path
    rows = list(csv.DictReader((exp / "validation.csv").open()))
    assert [int(r["step"]) for r in rows] == [0, 2, 3]  # baseline, every 2 steps, the last step
    assert float(rows[0]["val_loss"]) == pytest.approx(first, rel=1e-6)
    after = float(rows[-1]["held_out"])
    assert after != pytest.approx(first, rel=1e-4)
    assert after == pytest.approx(formula_loss(trainer, val_dir, [200, 700], 555, 2), rel=1e-5)
    with Image.open(exp / "validation.png") as plot:
        assert plot.format == "PNG" and plot.width > 100
    assert "val_loss" in (exp / "train.log").read_text()
    trainer.cleanup()


def test_validation_on_or_off_gives_identical_training_weights_and_keeps_best(tmp_path, folders):
    train_dir, val_dir = folders
    common = ["train.train_steps=3", "plugin.dropout=0.1", "train.save_step=1000"]
    weights = {}
    for mode, extra in (("on", ["validation.every_n_steps=1", "validation.keep_best=true",
                                "validation.timesteps=[300,600]", "validation.batch_size=3", held_out(val_dir)]),
                        ("off", ["validation.every_n_steps=0"])):
        trainer = make_trainer(tmp_path / mode, train_dir, *common, *extra)
        trainer.train()
        weights[mode] = load_safetensors(trainer.exp.ckpt_dir / "unet-3.safetensors")[0]
        trainer.cleanup()
    assert weights["on"].keys() == weights["off"].keys()
    for key in weights["on"]:
        assert torch.equal(weights["on"][key], weights["off"][key]), key
    assert not (tmp_path / "off" / "validation.csv").exists()

    rows = list(csv.DictReader((tmp_path / "on" / "validation.csv").open()))
    best_row = min(rows, key=lambda r: float(r["val_loss"]))
    best = json.loads((tmp_path / "on" / "ckpts" / "best" / "best.json").read_text())
    assert best["step"] == int(best_row["step"]) and best["files"] == [f"unet-{best['step']}.safetensors"]
    state, metadata = load_safetensors(tmp_path / "on" / "ckpts" / "best" / best["files"][0])
    assert state.keys() == weights["on"].keys() and metadata["hcpdiff_like.step"] == str(best["step"])
    assert sorted(p.name for p in (tmp_path / "on" / "ckpts" / "best").iterdir()) == sorted(
        best["files"] + ["best.json"])


def test_early_stop_after_patience(tmp_path, folders):
    train_dir, val_dir = folders
    # lr 0: the weights never change, so the loss never improves after the baseline
    trainer = make_trainer(tmp_path / "exp", train_dir, "train.train_steps=20", "train.lr=0",
                           "validation.every_n_steps=1", "validation.early_stop_patience=2",
                           "validation.timesteps=[500]", held_out(val_dir))
    summary = trainer.train()
    assert summary["steps"] == 2 and trainer.validator.should_stop
    assert (trainer.exp.ckpt_dir / "unet-2.safetensors").exists()
    trainer.cleanup()


def test_patience_and_min_delta_bookkeeping(tmp_path):
    loop = ValidationLoop(None, None, [], tmp_path)
    loop.patience, loop.min_delta = 2, 0.01
    assert loop.record(0, {"a": 1.0}) is True
    assert loop.record(1, {"a": 0.995}) is False  # better, but by less than min_delta
    assert loop.record(2, {"a": 0.90}) is True and loop.bad_validations == 0
    assert loop.record(3, {"a": 0.95}) is False and not loop.should_stop
    assert loop.record(4, {"a": 0.91}) is False and loop.should_stop
    assert (loop.best_step, loop.best_loss) == (2, 0.90)
    restored = ValidationLoop(None, None, [], tmp_path)
    restored.load_state_dict(loop.state_dict())
    assert restored.history == loop.history and restored.best_step == 2


def test_bad_validation_source_fails_before_the_model_loads(tmp_path, folders, monkeypatch):
    import hcpdiff_like.training.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "load_model_bundle",
                        lambda *a, **k: pytest.fail("the model loaded before the validation source was checked"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValidationConfigError, match="validation.sources.held_out"):
        make_trainer(tmp_path / "exp", folders[0], "validation.every_n_steps=5", held_out(empty))
    with pytest.raises(ValidationConfigError, match="validation.early_stop_patience"):
        ValidationLoop(compose_config(["validation.early_stop_patience=0"]).validation, None, [], tmp_path)


def test_processes_share_the_batches_and_add_up_to_the_single_process_loss(tmp_path, folders):
    """Two processes each evaluate every other batch with the noise one process would draw for it; their
    sums give the one-process loss (the DDP test checks the all-reduce end to end)."""
    train_dir, val_dir = folders
    trainer = make_trainer(tmp_path / "exp", train_dir, "train.train_steps=1", "validation.every_n_steps=1",
                           "validation.timesteps=[200,700]", "validation.batch_size=1", held_out(val_dir))
    validator = trainer.validator
    whole = validator.evaluate(trainer)["held_out"]
    shares = []
    for rank in (0, 1):
        validator.shard, validator._cached_batches = (2, rank), {}
        shares.append((validator.evaluate(trainer)["held_out"], validator._counts["held_out"]))
    assert [count for _, count in shares] == [2 * 2, 1 * 2]  # 3 one-image batches x 2 timesteps
    assert shares[0][0] != shares[1][0]
    combined = sum(loss * count for loss, count in shares) / sum(count for _, count in shares)
    assert combined == pytest.approx(whole, rel=1e-6)
    trainer.cleanup()
