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
    """Encode captions for one model family.

    `prompt_rewriters` run on each caption first; `register_words` (used by the embedding plugin) makes a
    trigger word's token expand into the ids of its n vectors before chunking."""

    def __init__(self, bundle, clip_skip: int = 0, max_chunks: int = 1, clip_final_norm: bool = True):
        super().__init__()
        self.family = bundle.family
        self.tokenizers = bundle.tokenizers
        self.text_encoders = torch.nn.ModuleList(bundle.text_encoders)
        self.clip_skip = int(clip_skip)
        self.max_chunks = max(1, int(max_chunks))
        self.clip_final_norm = clip_final_norm
        self.prompt_rewriters: list[Callable[[str], str]] = []
        self.word_expansions: dict[int, dict[int, list[int]]] = {}

    # -- tokens -----------------------------------------------------------------------------
    def rewrite(self, caption: str) -> str:
        for rewrite in self.prompt_rewriters:
            caption = rewrite(caption)
        return caption

    def register_words(self, encoder_index: int, expansions: dict[int, list[int]]) -> None:
        """Trigger words: tokenizer id of a word -> the ids of its n vectors in the text encoder."""
        self.word_expansions.setdefault(encoder_index, {}).update(expansions)

    def text_to_ids(self, text: str, encoder_index: int = 0) -> list[int]:
        """Token ids of `text` without BOS/EOS, trigger words expanded to their n vector ids."""
        tokenizer = self.tokenizers[encoder_index]
        ids = tokenizer(self.rewrite(text), add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        expansions = self.word_expansions.get(encoder_index)
        if not expansions:
            return list(ids)
        out: list[int] = []
        for token in ids:
            out.extend(expansions.get(token, (token,)))
        return out

    def chunk_ids(self, ids: Sequence[int], tokenizer) -> list[list[int]]:
        """Split ids into `max_chunks` rows of 77: BOS + up to 75 tokens + EOS, padded (longer is cut)."""
        bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
        ids = list(ids)[:CHUNK_TOKENS * self.max_chunks]
        chunks = []
        for index in range(self.max_chunks):
            chunk = [bos] + ids[index * CHUNK_TOKENS:(index + 1) * CHUNK_TOKENS] + [eos]
            chunks.append(chunk + [pad] * (CHUNK_TOKENS + 2 - len(chunk)))
        return chunks

    def tokenize(self, captions: Sequence[str], tokenizer=None, encoder_index: Optional[int] = None) -> torch.Tensor:
        """Return ids of shape [B, max_chunks, 77]: each chunk BOS + 75 tokens + EOS, padded."""
        if encoder_index is None:
            encoder_index = next((i for i, t in enumerate(self.tokenizers) if t is tokenizer), 0)
        tokenizer = self.tokenizers[encoder_index]
        rows = [self.chunk_ids(self.text_to_ids(caption, encoder_index), tokenizer) for caption in captions]
        return torch.tensor(rows, dtype=torch.long)

    # -- encoding ---------------------------------------------------------------------------
    def _encode_one(self, encoder, ids: torch.Tensor, layer_from_end: int, final_norm: bool, eos_id: int):
        """ids [B, C, 77] -> hidden [B, C*77, D], pooled [B, D'] (from the first chunk)."""
        batch, chunks, length = ids.shape
        flat = ids.reshape(batch * chunks, length).to(encoder.device)
        output = encoder(flat, output_hidden_states=True, return_dict=True)
        if layer_from_end == 0 and final_norm:
            hidden = output.last_hidden_state
        else:
            hidden = output.hidden_states[-1 - layer_from_end]
            if final_norm:
                hidden = getattr(encoder, "text_model", encoder).final_layer_norm(hidden)
        hidden = hidden.reshape(batch, chunks * length, hidden.shape[-1])
        pooled = self._pooled(encoder, output.last_hidden_state, flat, eos_id)
        return hidden, pooled.reshape(batch, chunks, -1)[:, 0]

    @staticmethod
    def _pooled(encoder, last_hidden: torch.Tensor, flat_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
        """The (projected) state at each row's first EOS. Computed here rather than read from the model:
        older configs find EOS by the largest id, which a trigger word's added ids would win."""
        positions = (flat_ids == eos_id).int().argmax(dim=-1)
        pooled = last_hidden[torch.arange(flat_ids.shape[0], device=last_hidden.device), positions]
        projection = getattr(encoder, "text_projection", None)
        return projection(pooled) if projection is not None else pooled

    def encode_id_rows(self, rows: torch.Tensor, encoder_index: int = 0):
        """Encode ready-made id rows [B, C, 77] with one encoder as the family does (prompt weighting
        builds on this): returns (hidden [B, C*77, D], pooled [B, D'])."""
        encoder, eos_id = self.text_encoders[encoder_index], self.tokenizers[encoder_index].eos_token_id
        if self.family != "sdxl":
            return self._encode_one(encoder, rows, self.clip_skip, self.clip_final_norm, eos_id)
        return self._encode_one(encoder, rows, 1 + self.clip_skip, False, eos_id)

    def forward(self, captions: Sequence[str], size_info: Optional[torch.Tensor] = None):
        """Return (encoder_hidden_states, added_cond_kwargs or None).

        `size_info` ([B, 6]: original h,w, crop top,left, target h,w) is used by SDXL only.
        """
        if self.family != "sdxl":
            hidden, _ = self.encode_id_rows(self.tokenize(captions, encoder_index=0), 0)
            return hidden, None
        hidden_states, pooled = [], None
        for index in range(len(self.tokenizers)):
            # SDXL conditions on the penultimate layer of both encoders, without the final norm.
            hidden, pooled = self.encode_id_rows(self.tokenize(captions, encoder_index=index), index)
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
