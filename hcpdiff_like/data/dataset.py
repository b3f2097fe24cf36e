"""The map-style dataset: a record + its bucket -> one training sample (pixels or cached latents).

Indexed by SampleKey `(record index, epoch, copy)` from sampler.py (a plain int means epoch 0, copy 0,
no random augmentation); flip, random crop and caption ops are drawn from a generator seeded by the
key, so the same key always gives the same sample (exact resume).
"""
from __future__ import annotations

import random
import zlib
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps

from .buckets import BucketAssignment, BucketManager
from .images import DEFAULT_MAX_PIXELS, load_rgb, scan_images
from .sampler import BucketBatchSampler
from .sources import ImageRecord


def resize_and_crop(image: Image.Image, assignment: BucketAssignment, random_crop: bool = False,
                    rng: Optional[random.Random] = None, resample=None):
    """Resize to `assignment.resized`, crop to `assignment.bucket`; returns (image, (top, left))."""
    resized_w, resized_h = assignment.resized
    bucket_w, bucket_h = assignment.bucket
    if image.size != (resized_w, resized_h):
        if resample is None:
            resample = Image.LANCZOS if resized_w < image.width else Image.BICUBIC
        image = image.resize((resized_w, resized_h), resample)
    if random_crop and rng is not None:
        top, left = rng.randint(0, resized_h - bucket_h), rng.randint(0, resized_w - bucket_w)
    else:
        top, left = (resized_h - bucket_h) // 2, (resized_w - bucket_w) // 2
    return image.crop((left, top, left + bucket_w, top + bucket_h)), (top, left)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor [3, H, W] in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def load_mask(path, assignment: BucketAssignment, crop: tuple[int, int], flip: bool) -> torch.Tensor:
    """A mask image -> [1, H, W] in [0, 1], resized and cropped exactly like its image."""
    with Image.open(path) as handle:
        mask = ImageOps.exif_transpose(handle).convert("L")
    mask = mask.resize(assignment.resized, Image.BILINEAR)
    top, left = crop
    mask = mask.crop((left, top, left + assignment.bucket[0], top + assignment.bucket[1]))
    if flip:
        mask = ImageOps.mirror(mask)
    return torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]


def sample_rng(seed: int, key) -> random.Random:
    return random.Random(f"{seed}:{key[0]}:{key[1]}:{key[2]}")


class BucketDataset(torch.utils.data.Dataset):
    """Records with their bucket assignments. `latent_store` (set by latent_cache.py) replaces image
    decoding by cached VAE latents."""

    def __init__(self, records: Sequence[ImageRecord], assignments: Sequence[BucketAssignment], flip: bool = False,
                 random_crop: bool = False, seed: int = 0, augment: bool = True,
                 max_pixels: int = DEFAULT_MAX_PIXELS):
        self.records, self.assignments = list(records), list(assignments)
        self.flip, self.random_crop, self.seed, self.augment = bool(flip), bool(random_crop), int(seed), augment
        self.max_pixels = max_pixels
        self.with_masks = any(r.mask_path is not None for r in self.records)
        self.latent_store = None

    def __len__(self) -> int:
        return len(self.records)

    def _key(self, key):
        if isinstance(key, (tuple, list)):
            return tuple(int(k) for k in key), self.augment
        return (int(key), 0, 0), False

    def __getitem__(self, key) -> dict:
        key, augment = self._key(key)
        index = key[0]
        record, assignment = self.records[index], self.assignments[index]
        rng = sample_rng(self.seed, key) if augment else None
        flip = bool(self.flip and rng is not None and rng.random() < 0.5)
        width, height = record.size
        item = {"caption": record.prompt(rng), "original_size": torch.tensor((height, width)),
                "target_size": torch.tensor((assignment.bucket[1], assignment.bucket[0])),
                "loss_weight": torch.tensor(record.loss_weight, dtype=torch.float32)}
        if self.latent_store is not None:
            crop = ((assignment.resized[1] - assignment.bucket[1]) // 2,
                    (assignment.resized[0] - assignment.bucket[0]) // 2)
            generator = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{key}".encode()))
            item["latents"] = self.latent_store.sample(index, flip, generator)
        else:
            image, crop = resize_and_crop(load_rgb(record.image_path, self.max_pixels), assignment,
                                          self.random_crop, rng)
            if flip:
                image = ImageOps.mirror(image)
            item["pixel_values"] = to_tensor(image)
        if self.with_masks:
            item["loss_mask"] = (load_mask(record.mask_path, assignment, crop, flip) if record.mask_path
                                 else torch.ones(1, assignment.bucket[1], assignment.bucket[0]))
        top, left = crop
        if flip:  # SDXL crop conditioning of a mirrored image: the left offset mirrors too (kohya)
            left = assignment.resized[0] - assignment.bucket[0] - left
        item["crop_top_left"] = torch.tensor((top, left))
        return item


class FixedSizeDataset(BucketDataset):
    """Every record resized to cover `resolution` ([width, height] or int) and cropped to it."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int | Sequence[int] = 512, flip: bool = False,
                 random_crop: bool = False, seed: int = 0):
        records = ensure_sizes(records)
        manager = BucketManager(resolution, enabled=False)
        super().__init__(records, [manager.select(*r.size) for r in records], flip, random_crop, seed)


def ensure_sizes(records: Sequence[ImageRecord], max_pixels: int = DEFAULT_MAX_PIXELS) -> list[ImageRecord]:
    """Fill `record.size` where missing (scans the images); unusable images raise BadImageError."""
    from .images import BadImageError

    missing = [r for r in records if r.size is None]
    if missing:
        infos = scan_images([r.image_path for r in missing], max_pixels, progress=False)
        for record in missing:
            info = infos[record.image_path]
            if info.problem:
                raise BadImageError(f"{record.image_path}: {info.problem}")
            record.size = info.size
    return list(records)


def collate(items: list[dict]) -> dict:
    batch = {"captions": [item["caption"] for item in items]}
    for key in items[0]:
        if key != "caption":
            batch[key] = torch.stack([item[key] for item in items])
    return batch


def make_eval_loader(records: Sequence[ImageRecord], resolution: int | Sequence[int] = 512, batch_size: int = 1,
                     buckets: Optional[BucketManager] = None, workers: int = 0) -> torch.utils.data.DataLoader:
    """Batches of `records` with the training resize/crop and deterministic captions (no flip, no random
    crop, no caption ops), in a fixed order. Records held out by `validation_split` keep the bucket the
    training dataset gave them; pass a `BucketManager` to choose buckets anew."""
    records = ensure_sizes(records)
    manager = buckets or BucketManager(resolution, enabled=False)
    assignments = [r.extras.get("bucket_assignment") if buckets is None and r.extras.get("bucket_assignment")
                   else manager.select(*r.size) for r in records]
    dataset = BucketDataset(records, assignments, augment=False)
    bucket_ids = {b: i for i, b in enumerate(sorted({a.bucket for a in assignments}))}
    sampler = BucketBatchSampler([bucket_ids[a.bucket] for a in assignments], [1.0] * len(records), batch_size,
                                 shuffle=False)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers)
