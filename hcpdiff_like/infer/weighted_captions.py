"""Weighted captions during training (kohya's --weighted_captions), opt-in with `model.weighted_captions: true`.

Captions may then use the visualizer's weighting syntax, `(tag:1.2)`, `[tag]`, `{tag:1.2}`; the weights scale
the text encoder's output as at inference (prompt_encoding.py). Captions keep the training chunking: at most
`model.tokenizer_repeats` chunks of 75 tokens, longer captions are cut. Caption operations that split on
commas (tag shuffling, dropout) can cut a bracket apart; as in kohya, keep commas out of weighted brackets.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.conditioning import TextConditioner
from .prompt_encoding import WeightedPromptEncoder


class WeightedTextConditioner(TextConditioner):
    """A TextConditioner whose captions may carry prompt weights (same output for unweighted captions)."""

    def forward(self, captions: Sequence[str], size_info: Optional[torch.Tensor] = None):
        encoder = WeightedPromptEncoder(self, min_chunks=self.max_chunks, max_chunks=self.max_chunks)
        hidden, pooled = encoder.encode(list(captions))
        if self.family != "sdxl":
            return hidden, None
        if size_info is None:
            raise ValueError("SDXL conditioning needs size_info (original size, crop, target size) per image")
        return hidden, {"text_embeds": pooled, "time_ids": size_info.to(hidden.device, hidden.dtype)}


def conditioner_class(model_cfg) -> type:
    """TextConditioner, or the weighted one when `model.weighted_captions` is true."""
    return WeightedTextConditioner if (model_cfg or {}).get("weighted_captions") else TextConditioner
