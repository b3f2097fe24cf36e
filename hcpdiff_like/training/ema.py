"""Exponential moving average of the trained weights (`train.ema`), built on diffusers' EMAModel.

    train:
      ema: {decay: 0.9999, power: 0.6667, update_after_step: 0, use_ema_warmup: true}

The average covers every trained tensor (LoRA blocks, fine-tuned base weights, trigger words), is updated
after each optimizer step, and is saved next to the live weights: `ckpts/ema/<target>-<step>.safetensors`
and `ckpts/ema/<word>-<step>.pt`, with exactly the keys and metadata of the live files, so the same loaders read them.
The decay at update n (counted after `update_after_step`) is min(decay, (1 + n) / (10 + n)), or with
`use_ema_warmup` min(decay, 1 - (1 + n / inv_gamma) ** -power) (HCP-Diffusion's ModelEMA schedule).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch

EMA_KEYS = ("decay", "min_decay", "update_after_step", "use_ema_warmup", "inv_gamma", "power", "foreach")


class EMA:
    """EMA of `parameters`; `applied()` swaps the averaged values in for saving, then restores the live ones."""

    def __init__(self, parameters: Sequence[torch.nn.Parameter], **options):
        from diffusers.training_utils import EMAModel

        unknown = sorted(set(options) - set(EMA_KEYS))
        if unknown:
            raise ValueError(f"unknown key(s) in train.ema: {', '.join(unknown)} (known: {', '.join(EMA_KEYS)})")
        casts = {"decay": float, "min_decay": float, "inv_gamma": float, "power": float,
                 "update_after_step": int, "use_ema_warmup": bool}
        options = {k: casts[k](v) if k in casts and v is not None else v for k, v in options.items()}
        self.parameters = list(parameters)
        if not self.parameters:
            raise ValueError("train.ema is set but nothing trains")
        self.average = EMAModel(self.parameters, **options)

    @torch.no_grad()
    def update(self) -> None:
        self.average.step(self.parameters)

    @property
    def decay(self) -> float:
        return float(self.average.cur_decay_value or 0.0)

    @contextmanager
    def applied(self) -> Iterator[None]:
        """Inside the block the trained parameters hold the EMA values; afterwards the live values again."""
        self.average.store(self.parameters)
        self.average.copy_to(self.parameters)
        try:
            yield
        finally:
            self.average.restore(self.parameters)

    def state_dict(self) -> dict:
        return self.average.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state)
