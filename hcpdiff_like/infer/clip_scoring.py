"""CLIP scores for generated images (as the Eden trainer reports them), from a LOCAL CLIP model folder.

* image_text_similarity: mean cosine between each image and its prompt (weighting syntax removed)
* training_image_similarity: mean cosine over all (generated, training image) pairs; rising with the
  steps while the text score falls is the usual sign of overfitting
* diversity: mean (1 - cosine) over pairs of generated images
"""
from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence

import torch

from .prompt_weights import plain_text

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ClipModelError(ValueError):
    pass


class ClipScorer:
    def __init__(self, model_path: str | os.PathLike, device: Optional[str] = None, batch_size: int = 16):
        from transformers import CLIPModel, CLIPProcessor

        path = Path(os.path.expanduser(str(model_path)))
        if not (path / "config.json").is_file():
            raise ClipModelError(f"--clip_model: {path} is not a local CLIP model folder (no config.json); "
                                 "give a folder saved with CLIPModel.save_pretrained plus its processor files")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = CLIPModel.from_pretrained(str(path), local_files_only=True).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
        self.batch_size = batch_size

    @torch.no_grad()
    def image_features(self, images: Sequence) -> torch.Tensor:
        """Unit-length CLIP image embeddings [N, D]."""
        features = []
        for start in range(0, len(images), self.batch_size):
            batch = [image.convert("RGB") for image in images[start:start + self.batch_size]]
            pixels = self.processor(images=batch, return_tensors="pt")["pixel_values"].to(self.device)
            pooled = self.model.vision_model(pixel_values=pixels).pooler_output
            features.append(self.model.visual_projection(pooled))
        return torch.nn.functional.normalize(torch.cat(features).float(), dim=-1)

    @torch.no_grad()
    def text_features(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-length CLIP text embeddings [N, D] (prompts cut at CLIP's 77 tokens)."""
        tokens = self.processor(text=[plain_text(t) for t in texts], return_tensors="pt", padding=True,
                                truncation=True, max_length=77)
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        pooled = self.model.text_model(**tokens).pooler_output
        return torch.nn.functional.normalize(self.model.text_projection(pooled).float(), dim=-1)

    def scores(self, images: Sequence, prompts: Sequence[str],
               training_features: Optional[torch.Tensor] = None) -> dict:
        image_features = self.image_features(images)
        text_features = self.text_features(prompts)
        result = {"image_text_similarity": float((image_features * text_features).sum(-1).mean())}
        if training_features is not None and len(training_features):
            result["training_image_similarity"] = float((image_features @ training_features.T).mean())
        pairs = list(combinations(range(len(images)), 2))
        if pairs:
            result["diversity"] = float(sum(1 - float(image_features[a] @ image_features[b]) for a, b in pairs)
                                        / len(pairs))
        return result


def load_images(folder: str | os.PathLike) -> list:
    """Every image in a folder (sorted), for the training-set similarity."""
    from PIL import Image

    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise ClipModelError(f"--training_images: folder {folder} does not exist")
    paths = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not paths:
        raise ClipModelError(f"--training_images: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
