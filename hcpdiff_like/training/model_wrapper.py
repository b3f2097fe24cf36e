"""One nn.Module around text conditioning + UNet, so DDP sees every trained parameter at once."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..models.conditioning import TextConditioner


class DiffusionWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module, conditioner: TextConditioner, train_text: bool):
        super().__init__()
        self.unet = unet
        self.conditioner = conditioner
        self.train_text = train_text
        self.text_cache = None  # training/text_cache.py, when model.cache_text_embeddings applies

    def encode_text(self, captions: Sequence[str], size_info: Optional[torch.Tensor] = None):
        if self.text_cache is not None:
            return self.text_cache(self.conditioner, captions, size_info)
        with torch.set_grad_enabled(self.train_text and torch.is_grad_enabled()):
            return self.conditioner(captions, size_info)

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, captions: Sequence[str],
                size_info: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden, added = self.encode_text(captions, size_info)
        hidden = hidden.to(noisy_latents.dtype) if not torch.is_autocast_enabled() else hidden
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden,
                         added_cond_kwargs=added, return_dict=False)[0]
