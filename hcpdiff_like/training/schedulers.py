"""Learning-rate schedules by name (diffusers' `get_scheduler` names, plus one_cycle)."""
from __future__ import annotations

from typing import Optional

import torch

SCHEDULER_NAMES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts",
                   "polynomial", "one_cycle")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str = "constant", num_warmup_steps: int = 0,
                    num_training_steps: Optional[int] = None, **kwargs):
    """`num_training_steps` is filled from `train.train_steps` by the trainer when left null."""
    if num_training_steps is None:
        raise ValueError("scheduler.num_training_steps is unset (the trainer fills it from train.train_steps)")
    if name == "one_cycle":
        max_lrs = [group["lr"] for group in optimizer.param_groups]
        pct_start = min(0.99, max(num_warmup_steps / max(num_training_steps, 1), 1e-4))
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=num_training_steps,
                                                   pct_start=pct_start, **kwargs)
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler.name={name!r}: expected one of {SCHEDULER_NAMES}")
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps,
                         num_training_steps=num_training_steps, **kwargs)
