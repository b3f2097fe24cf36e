"""A map-style dataset of (image, caption) records resized to a fixed training size."""
from __future__ import annotations

import random
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .sources import ImageRecord


def load_rgb(path) -> Image.Image:
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image)
        if image.mode in ("RGBA", "LA", "P"):
            image = image.convert("RGBA")
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(background, image)
        return image.convert("RGB")


def resize_and_crop(image: Image.Image, target_hw: tuple[int, int], random_crop: bool, rng: random.Random):
    """Scale to cover `target_hw` then crop; returns (image, crop_top_left in resized pixels)."""
    target_h, target_w = target_hw
    scale = max(target_w / image.width, target_h / image.height)
    new_w, new_h = max(target_w, round(image.width * scale)), max(target_h, round(image.height * scale))
    resample = Image.LANCZOS if scale < 1 else Image.BICUBIC
    image = image.resize((new_w, new_h), resample)
    if random_crop:
        top, left = rng.randint(0, new_h - target_h), rng.randint(0, new_w - target_w)
    else:
        top, left = (new_h - target_h) // 2, (new_w - target_w) // 2
    return image.crop((left, top, left + target_w, top + target_h)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


class FixedSizeDataset(torch.utils.data.Dataset):
    def __init__(self, records: Sequence[ImageRecord], resolution: int | Sequence[int] = 512,
                 flip: bool = False, random_crop: bool = False, seed: int = 0):
        self.records = list(records)
        if isinstance(resolution, int):
            resolution = (resolution, resolution)
        self.target_hw = (int(resolution[1]), int(resolution[0]))  # config gives [width, height]
        self.flip, self.random_crop, self.seed = flip, random_crop, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        rng = random.Random(hash((self.seed, index)))
        image = load_rgb(record.image_path)
        original_hw = (image.height, image.width)
        image, crop = resize_and_crop(image, self.target_hw, self.random_crop, rng)
        if self.flip and rng.random() < 0.5:
            image = ImageOps.mirror(image)
        return {"pixel_values": to_tensor(image), "caption": record.caption,
                "original_size": torch.tensor(original_hw), "crop_top_left": torch.tensor(crop),
                "target_size": torch.tensor(self.target_hw), "loss_weight": torch.tensor(record.loss_weight)}


def collate(items: list[dict]) -> dict:
    batch = {"captions": [item["caption"] for item in items]}
    for key in items[0]:
        if key != "caption":
            batch[key] = torch.stack([item[key] for item in items])
    return batch
