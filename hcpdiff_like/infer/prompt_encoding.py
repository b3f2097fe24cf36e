"""Weighted prompts -> text-encoder conditioning, for the diffusers pipelines' `prompt_embeds`.

Each segment's tokens are encoded together with the rest of the prompt (weights do not change the
tokens); afterwards every token's hidden state is multiplied by its segment's weight and the result is
rescaled so each prompt keeps its original mean (HCP-Diffusion's and webui's convention). Long prompts
are split into 75-token chunks, each with its own BOS/EOS, as in training; a batch's prompts (positive
and negative together) get the same number of chunks, at least `min_chunks` (the `N_repeats` option).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from ..models.conditioning import CHUNK_TOKENS, TextConditioner
from .prompt_weights import parse_prompt_weights


class WeightedPromptEncoder:
    """`max_chunks` (training: the conditioner's own) cuts longer prompts; by default they get more chunks."""

    def __init__(self, conditioner: TextConditioner, min_chunks: int = 1, max_chunks: Optional[int] = None):
        self.conditioner = conditioner
        self.min_chunks = max(1, int(min_chunks))
        self.max_chunks = None if max_chunks is None else max(self.min_chunks, int(max_chunks))

    def weighted_ids(self, prompt: str, encoder_index: int = 0) -> tuple[list[int], list[float]]:
        """Token ids (no BOS/EOS, trigger words expanded) and one weight per token."""
        ids: list[int] = []
        weights: list[float] = []
        for segment in parse_prompt_weights(prompt):
            piece = self.conditioner.text_to_ids(segment.text, encoder_index)
            ids.extend(piece)
            weights.extend([segment.weight] * len(piece))
        return ids, weights

    def _rows(self, prompts: Sequence[str], encoder_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, C, 77] and weights [B, C*77] (1.0 at BOS/EOS/padding)."""
        tokenizer = self.conditioner.tokenizers[encoder_index]
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        parsed = [self.weighted_ids(p, encoder_index) for p in prompts]
        chunks = max([self.min_chunks] + [math.ceil(len(ids) / CHUNK_TOKENS) for ids, _ in parsed])
        if self.max_chunks is not None:
            chunks = min(chunks, self.max_chunks)
        id_rows, weight_rows = [], []
        for ids, weights in parsed:
            row_ids, row_weights = [], []
            for index in range(chunks):
                piece = slice(index * CHUNK_TOKENS, (index + 1) * CHUNK_TOKENS)
                chunk_ids, chunk_weights = ids[piece], weights[piece]
                padding = CHUNK_TOKENS - len(chunk_ids)
                row_ids.append([bos] + chunk_ids + [eos] + [pad] * padding)
                row_weights.extend([1.0] + chunk_weights + [1.0] + [1.0] * padding)
            id_rows.append(row_ids)
            weight_rows.append(row_weights)
        return torch.tensor(id_rows, dtype=torch.long), torch.tensor(weight_rows, dtype=torch.float32)

    @staticmethod
    def apply_weights(hidden: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D] x weights [B, T], each prompt rescaled back to its own original mean.

        A prompt whose mean is ~0 relative to its magnitude (possible with untrained encoders) is only
        multiplied: dividing by a near-zero mean would blow it up."""
        if torch.all(weights == 1.0):
            return hidden
        weights = weights.to(hidden.device, torch.float32)
        original = hidden.float()
        original_mean = original.mean(dim=(1, 2), keepdim=True)
        weighted = original * weights.unsqueeze(-1)
        weighted_mean = weighted.mean(dim=(1, 2), keepdim=True)
        magnitude = original.abs().mean(dim=(1, 2), keepdim=True)
        stable = (weighted_mean.abs() > 1e-3 * magnitude) & (original_mean.abs() > 1e-3 * magnitude)
        ratio = torch.where(stable, original_mean / torch.where(stable, weighted_mean, 1.0), 1.0)
        return (weighted * ratio).to(hidden.dtype)

    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Return (hidden [B, C*77, D], pooled [B, D'] for SDXL else None); differentiable (training)."""
        hidden_states, pooled = [], None
        for index in range(len(self.conditioner.text_encoders)):
            ids, weights = self._rows(prompts, index)
            hidden, pooled = self.conditioner.encode_id_rows(ids, index)
            hidden_states.append(self.apply_weights(hidden, weights))
        hidden = torch.cat(hidden_states, dim=-1)
        return hidden, (pooled if self.conditioner.family == "sdxl" else None)

    def encode_pair(self, prompts: Sequence[str], negative_prompts: Sequence[str]) -> dict:
        """Keyword arguments for a diffusers SD / SDXL pipeline call (positive and negative share chunks)."""
        if len(prompts) != len(negative_prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(negative_prompts)} negative prompts")
        hidden, pooled = self.encode(list(prompts) + list(negative_prompts))
        count = len(prompts)
        kwargs = {"prompt_embeds": hidden[:count], "negative_prompt_embeds": hidden[count:]}
        if pooled is not None:
            kwargs.update(pooled_prompt_embeds=pooled[:count], negative_pooled_prompt_embeds=pooled[count:])
        return kwargs
