"""`model.cache_text_embeddings`: encode each distinct caption once when nothing in the text path trains.

Entries are keyed by the exact caption string, so the result is always what the text encoder would give;
shuffled or dropped tags only make the cache miss. Past `max_entries` distinct captions (captions that change
every epoch) nothing more is stored and a message says so. Entries live on the CPU, in the encoder's dtype.
For SDXL the pooled embedding is cached and the size/crop `time_ids` are rebuilt for every batch.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


class TextEmbeddingCache:
    def __init__(self, max_entries: int = 20000, log: Optional[Callable[[str], None]] = None):
        self.max_entries = int(max_entries)
        self.entries: dict[str, tuple[torch.Tensor, Optional[torch.Tensor]]] = {}
        self.log = log or print
        self.full_reported = False
        self.hits = self.misses = 0

    @torch.no_grad()
    def _encode_missing(self, conditioner, captions: list[str]) -> dict:
        dummy_size = torch.zeros(len(captions), 6)  # time_ids do not change the text features
        hidden, added = conditioner(captions, dummy_size if conditioner.family == "sdxl" else None)
        pooled = added["text_embeds"] if added else [None] * len(captions)
        return {caption: (hidden[i].cpu(), None if pooled[i] is None else pooled[i].cpu())
                for i, caption in enumerate(captions)}

    def __call__(self, conditioner, captions: Sequence[str], size_info: Optional[torch.Tensor] = None):
        """Same result as `conditioner(captions, size_info)`."""
        missing = [c for c in dict.fromkeys(captions) if c not in self.entries]
        self.misses += len(missing)
        self.hits += len(captions) - len(missing)
        fresh = self._encode_missing(conditioner, missing) if missing else {}
        room = self.max_entries - len(self.entries)
        self.entries.update(dict(list(fresh.items())[:max(room, 0)]))
        if len(fresh) > room and not self.full_reported:
            self.full_reported = True
            self.log(f"cache_text_embeddings: {self.max_entries} distinct captions cached, no more are stored "
                     "(captions change between epochs: shuffled or dropped tags?)")
        rows = [self.entries.get(c) or fresh[c] for c in captions]
        device = next(conditioner.text_encoders[0].parameters()).device
        hidden = torch.stack([row[0] for row in rows]).to(device)
        if conditioner.family != "sdxl":
            return hidden, None
        if size_info is None:
            raise ValueError("SDXL conditioning needs size_info (original size, crop, target size) per image")
        pooled = torch.stack([row[1] for row in rows]).to(device)
        return hidden, {"text_embeds": pooled, "time_ids": size_info.to(device, hidden.dtype)}
