"""Loggers, several at once: console + train.log, TensorBoard (read back with tensorboard's own reader),
W&B offline; an API key from the environment never lands in any written file."""
from __future__ import annotations

import re

from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from hcpdiff_like.training.loggers import LossMeter, TensorBoardLogger

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


def _all_files(root):
    return [p for p in root.rglob("*") if p.is_file()]


def test_console_tensorboard_wandb_together_and_no_secret_written(run_train, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_home"))
    results, runs = run_train("cfg=demo", "logger=[console,tensorboard,wandb]", "logger.console.log_step=1",
                              "logger.tensorboard.log_step=1", "train.train_steps=3", "train.save_step=1000",
                              "+notes=${oc.env:WANDB_API_KEY}")  # a config that pulls the key in on purpose
    exp_dir = runs[0]

    logged = {int(m.group(1)): float(m.group(2))
              for m in re.finditer(r"step (\d+): loss=([0-9.e+-]+)", (exp_dir / "train.log").read_text())}
    assert sorted(logged) == [1, 2, 3]
    events = EventAccumulator(str(exp_dir / "tblog"))
    events.Reload()
    scalars = {event.step: event.value for event in events.Scalars("loss")}
    assert sorted(scalars) == [1, 2, 3]
    for step, value in logged.items():  # the same numbers in both loggers
        assert abs(scalars[step] - value) <= 1e-5 * abs(value)
    assert {"loss_smoothed", "lr"} <= set(events.Tags()["scalars"])

    offline_runs = list((exp_dir / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1 and (exp_dir / "wandb_run_id").read_text() in offline_runs[0].name
    assert "notes: '***'" in (exp_dir / "cfg.yaml").read_text()
    for path in _all_files(tmp_path):
        assert FAKE_KEY.encode() not in path.read_bytes(), f"the API key was written to {path}"


def test_tensorboard_images_and_resume_purge(tmp_path):
    logger = TensorBoardLogger(str(tmp_path), log_step=1)
    logger.image("samples/cat", Image.new("RGB", (24, 16), (255, 0, 0)), step=2)
    for step in (1, 2, 3, 4):  # a killed run logged 3 and 4 after its state at 2
        logger.scalars({"loss": float(step)}, step)
    logger.resumed(2)
    logger.scalars({"loss": 30.0}, 3)
    logger.close()
    events = EventAccumulator(str(tmp_path / "tblog"))
    events.Reload()
    (image,) = events.Images("samples/cat")
    assert (image.step, image.width, image.height) == (2, 24, 16)
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_loss_meter_state_round_trip():
    meter = LossMeter()
    for loss in (1.0, 0.5, 0.25):
        meter.update(loss)
    copy = LossMeter()
    copy.load_state_dict(meter.state_dict())
    copy.update(0.125)
    meter.update(0.125)
    assert copy.summary() == meter.summary()
    assert meter.summary()["mean_loss"] == (1.0 + 0.5 + 0.25 + 0.125) / 4
    assert abs(meter.smoothed - (((1.0 * 0.93 + 0.07 * 0.5) * 0.93 + 0.07 * 0.25) * 0.93 + 0.07 * 0.125)) < 1e-12


def test_loss_curve_picture_holds_every_step(run_train, tmp_path):
    from PIL import Image

    results, runs = run_train("cfg=demo", "train.train_steps=5", "train.save_step=100", "logger=[console]")
    picture = runs[0] / "loss.png"
    assert picture.is_file()
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 100
    from hcpdiff_like.training.loggers import LossMeter

    meter = LossMeter()
    for step, loss in enumerate([3.0, 1.0, 2.0], start=1):
        meter.update(loss, step)
    restored = LossMeter()
    restored.load_state_dict(meter.state_dict())
    assert restored.history == meter.history and [s for s, _, _ in meter.history] == [1, 2, 3]
    assert meter.history[1][2] == 0.93 * 3.0 + 0.07 * 1.0
