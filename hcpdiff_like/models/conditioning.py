"""Family adapters: turn captions into the UNet's conditioning for SD1.x, SD2.x and SDXL.

* SD1.x / SD2.x: one CLIP text encoder; `clip_skip` picks an earlier layer (webui "Clip skip 2"
  = `clip_skip: 1`), with the final layer norm re-applied as webui does.
* SDXL: both text encoders' penultimate layers concatenated, the second encoder's pooled projection,
  and `add_time_ids` (original size, crop top-left, target size) for micro-conditioning.

Long prompts are split into `max_chunks` chunks of 75 tokens; each chunk gets its own BOS/EOS and is
encoded separately, and the hidden states are concatenated (as webui and HCP-Diffusion do).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch

CHUNK_TOKENS = 75  # tokens per chunk, excluding BOS/EOS


class TextConditioner(torch.nn.Module):
    """Encode captions for one model family. `prompt_rewriters` run on each caption first
    (the embedding plugin uses this to expand a trigger word into its n token strings)."""

    def __init__(self, bundle, clip_skip: int = 0, max_chunks: int = 1, clip_final_norm: bool = True):
        super().__init__()
        self.family = bundle.family
        self.tokenizers = bundle.tokenizers
        self.text_encoders = torch.nn.ModuleList(bundle.text_encoders)
        self.clip_skip = int(clip_skip)
        self.max_chunks = max(1, int(max_chunks))
        self.clip_final_norm = clip_final_norm
        self.prompt_rewriters: list[Callable[[str], str]] = []

    # -- tokens -----------------------------------------------------------------------------
    def rewrite(self, caption: str) -> str:
        for rewrite in self.prompt_rewriters:
            caption = rewrite(caption)
        return caption

    def tokenize(self, captions: Sequence[str], tokenizer) -> torch.Tensor:
        """Return ids of shape [B, max_chunks, 77]: each chunk BOS + 75 tokens + EOS, padded."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        width = CHUNK_TOKENS * self.max_chunks
        rows = []
        for caption in captions:
            ids = tokenizer(self.rewrite(caption), add_special_tokens=False, truncation=False)["input_ids"][:width]
            chunks = []
            for index in range(self.max_chunks):
                piece = ids[index * CHUNK_TOKENS:(index + 1) * CHUNK_TOKENS]
                if index > 0 and not piece:
                    piece = []
                chunk = [bos] + piece + [eos]
                chunk += [pad] * (CHUNK_TOKENS + 2 - len(chunk))
                chunks.append(chunk)
            rows.append(chunks)
        return torch.tensor(rows, dtype=torch.long)

    # -- encoding ---------------------------------------------------------------------------
    def _encode_one(self, encoder, ids: torch.Tensor, layer_from_end: int, final_norm: bool):
        """ids [B, C, 77] -> hidden [B, C*77, D], pooled [B, D'] (from the first chunk)."""
        batch, chunks, length = ids.shape
        flat = ids.reshape(batch * chunks, length).to(encoder.device)
        output = encoder(flat, output_hidden_states=True, return_dict=True)
        hidden = output.hidden_states[-1 - layer_from_end]
        if final_norm and layer_from_end > 0:
            hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        hidden = hidden.reshape(batch, chunks * length, hidden.shape[-1])
        pooled = getattr(output, "text_embeds", None)
        if pooled is None:
            pooled = output.pooler_output
        pooled = pooled.reshape(batch, chunks, -1)[:, 0]
        return hidden, pooled

    def forward(self, captions: Sequence[str], size_info: Optional[torch.Tensor] = None):
        """Return (encoder_hidden_states, added_cond_kwargs or None).

        `size_info` ([B, 6]: original h,w, crop top,left, target h,w) is used by SDXL only.
        """
        if self.family != "sdxl":
            ids = self.tokenize(captions, self.tokenizers[0])
            hidden, _ = self._encode_one(self.text_encoders[0], ids, self.clip_skip, self.clip_final_norm)
            return hidden, None
        hidden_states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = self.tokenize(captions, tokenizer)
            # SDXL conditions on the penultimate layer of both encoders, without the final norm.
            hidden, pooled = self._encode_one(encoder, ids, 1 + self.clip_skip, False)
            hidden_states.append(hidden)
        hidden = torch.cat(hidden_states, dim=-1)
        if size_info is None:
            raise ValueError("SDXL conditioning needs size_info (original size, crop, target size) per image")
        added = {"text_embeds": pooled, "time_ids": size_info.to(hidden.device, hidden.dtype)}
        return hidden, added


def sdxl_size_info(original_hw, crop_top_left, target_hw) -> torch.Tensor:
    """Build the [B, 6] add_time_ids tensor from per-image (h, w), (top, left), (h, w)."""
    return torch.cat([torch.as_tensor(original_hw), torch.as_tensor(crop_top_left),
                      torch.as_tensor(target_hw)], dim=-1).float()
