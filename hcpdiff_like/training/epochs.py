"""Run length and checkpoint interval in epochs (`train.train_epochs`, `train.save_every_n_epochs`), as in
HCP-Diffusion (`train_epochs`) and kohya (`--max_train_epochs`, `--save_every_n_epochs`).

An epoch is one pass over the first dataset as this process sees it (its shard, with repeats), counted in
optimizer steps: ceil(batches per epoch / gradient_accumulation_steps). The trainer turns both keys into
`train.train_steps` / `train.save_step` before anything else reads them.
"""
from __future__ import annotations

import math
from typing import Optional

from ..config.validation import ConfigError


def _positive(value, key: str) -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"train.{key}={value!r}: expected a whole number >= 1, or null")
    return value


def steps_from_epochs(train_cfg, batches_per_epoch: int) -> Optional[dict]:
    """{'steps_per_epoch', 'train_steps', 'save_step'} for the epoch keys that are set; None if neither is."""
    epochs = _positive(train_cfg.get("train_epochs"), "train_epochs")
    save_epochs = _positive(train_cfg.get("save_every_n_epochs"), "save_every_n_epochs")
    if epochs is None and save_epochs is None:
        return None
    per_epoch = max(1, math.ceil(batches_per_epoch / int(train_cfg.get("gradient_accumulation_steps") or 1)))
    return {"steps_per_epoch": per_epoch,
            "train_steps": epochs * per_epoch if epochs else int(train_cfg.train_steps),
            "save_step": save_epochs * per_epoch if save_epochs else int(train_cfg.save_step)}
