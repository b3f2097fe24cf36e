"""Every cfgs/scheduler/*.yaml builds and follows its closed-form lr curve; num_training_steps follows
train.train_steps unless set."""
from __future__ import annotations

import math

import pytest
import torch
from hydra.utils import instantiate

from hcpdiff_like.config.launcher import compose_config, shipped_cfg_dir
from hcpdiff_like.training.schedulers import build_scheduler

SCHEDULER_FILES = sorted(p.stem for p in (shipped_cfg_dir() / "scheduler").glob("*.yaml"))
TOTAL = 200


def expected_factor(name: str, step: int, cfg) -> float:
    """lr / base lr after `step` scheduler steps, written from each schedule's definition."""
    warmup = cfg.num_warmup_steps
    if name == "constant":
        return 1.0
    if step < warmup and name != "one_cycle":
        return step / warmup
    progress = (step - warmup) / (TOTAL - warmup)
    if name == "constant_with_warmup":
        return 1.0
    if name == "linear":
        return 1.0 - progress
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if name == "cosine_with_restarts":
        return 0.5 * (1 + math.cos(math.pi * ((cfg.num_cycles * progress) % 1.0)))
    if name == "polynomial":
        lr_end = 1e-7
        return ((1.0 - lr_end) * (1 - progress) ** cfg.power + lr_end) / 1.0
    if name == "one_cycle":  # cosine up from 1/div to 1 over the warmup, cosine down to 1/(div*final_div)
        start, low = 1 / cfg.div_factor, 1 / (cfg.div_factor * cfg.final_div_factor)
        rise_end = warmup - 1  # torch counts phases in steps 0..total-1
        if step <= rise_end:
            return 1 + (start - 1) * (1 + math.cos(math.pi * step / rise_end)) / 2
        fall = (step - rise_end) / (TOTAL - 1 - rise_end)
        return low + (1 - low) * (1 + math.cos(math.pi * fall)) / 2
    raise AssertionError(name)


def test_the_issue_schedulers_are_shipped():
    assert {"constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
            "one_cycle"} <= set(SCHEDULER_FILES)


@pytest.mark.parametrize("name", SCHEDULER_FILES)
def test_scheduler_config_follows_its_curve(name):
    cfg = compose_config(["cfg=demo", f"scheduler={name}"]).scheduler
    assert cfg.num_training_steps is None  # follows train.train_steps
    parameter = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([{"params": [parameter], "lr": 1.0}, {"params": [], "lr": 0.5}], lr=1.0)
    scheduler = instantiate(cfg, num_training_steps=TOTAL)(optimizer)
    for step in range(TOTAL):
        lrs = scheduler.get_last_lr()
        assert lrs[0] == pytest.approx(expected_factor(name, step, cfg), abs=1e-6), (name, step)
        assert lrs[1] == pytest.approx(0.5 * lrs[0], abs=1e-6)  # every param group scales the same way
        optimizer.step()
        scheduler.step()


def test_unset_length_and_unknown_name_are_clear_errors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="num_training_steps"):
        build_scheduler(optimizer, "linear")
    with pytest.raises(ValueError, match="scheduler.name='warmup_cosine'"):
        build_scheduler(optimizer, "warmup_cosine", num_training_steps=10)
