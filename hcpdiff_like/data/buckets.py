"""Aspect-ratio buckets following kohya sd-scripts' rules (peer-trainers.md 1b), and the fixed-size mode.

Predefined buckets: the square `floor(sqrt(W*H)/step)*step`, plus for each width from min to max in
`step`s the tallest height (<= max, multiple of step) within the target area W*H, and its transpose.
An image takes the bucket of closest aspect ratio (the exact bucket if its size is one) and is scaled
to cover it (match heights when it is wider than the bucket, else widths), then cropped.
`no_upscale`: images over the target area shrink to it (keeping their ratio); the bucket is the size
floored to a multiple of `step`, so images are never enlarged and min/max are not used.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class BucketAssignment:
    bucket: tuple[int, int]    # (width, height) of the training crop
    resized: tuple[int, int]   # (width, height) the image is resized to before cropping
    ar_error: float            # bucket aspect ratio - image aspect ratio


def make_bucket_resolutions(resolution: tuple[int, int], min_size: int = 256, max_size: int = 1024,
                            step: int = 64) -> list[tuple[int, int]]:
    width, height = resolution
    max_area = width * height
    side = int(math.sqrt(max_area) // step) * step
    resos = {(side, side)}
    w = min_size
    while w <= max_size:
        h = min(max_size, int((max_area // w) // step) * step)
        if h >= min_size:
            resos.add((w, h))
            resos.add((h, w))
        w += step
    return sorted(resos)


def _round_to_step(value: float, step: int) -> int:
    rounded = int(value + 0.5)
    return rounded - rounded % step


def _cover(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int]:
    width, height = size
    if width / height > bucket[0] / bucket[1]:
        scale = bucket[1] / height
    else:
        scale = bucket[0] / width
    return int(width * scale + 0.5), int(height * scale + 0.5)


class BucketManager:
    """Chooses a bucket for each image size. `enabled=False` is the fixed-resolution mode (one bucket)."""

    def __init__(self, resolution: int | Sequence[int] = 512, enabled: bool = False, min_size: int = 256,
                 max_size: int = 1024, step: int = 64, no_upscale: bool = False):
        if isinstance(resolution, (int, float)):
            resolution = (int(resolution), int(resolution))
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.enabled, self.step, self.no_upscale = bool(enabled), int(step), bool(no_upscale)
        if self.step < 8:
            raise ValueError(f"bucket_reso_steps must be >= 8, got {step}")
        self.min_size = max(self.step, int(min_size) - int(min_size) % self.step)   # kohya: rounded down
        self.max_size = int(math.ceil(int(max_size) / self.step) * self.step)       # kohya: rounded up
        if self.enabled and not self.no_upscale:
            if min(self.resolution) < self.min_size or max(self.resolution) > self.max_size:
                raise ValueError(f"resolution {self.resolution} must lie within min_bucket_reso "
                                 f"{self.min_size} and max_bucket_reso {self.max_size}")
            self.predefined = make_bucket_resolutions(self.resolution, self.min_size, self.max_size, self.step)
        else:
            self.predefined = [] if self.enabled else [self.resolution]
        self._predefined_set = set(self.predefined)

    def select(self, width: int, height: int) -> BucketAssignment:
        aspect = width / height
        if not self.enabled or not self.no_upscale:
            if (width, height) in self._predefined_set:
                bucket = (width, height)
            else:
                errors = [abs(w / h - aspect) for w, h in self.predefined]
                bucket = self.predefined[errors.index(min(errors))]
            resized = _cover((width, height), bucket)
        else:
            max_area = self.resolution[0] * self.resolution[1]
            if width * height > max_area:
                resized_w = math.sqrt(max_area * aspect)
                resized_h = max_area / resized_w
                w_first = _round_to_step(resized_w, self.step)
                h_in_w = _round_to_step(w_first / aspect, self.step)
                h_first = _round_to_step(resized_h, self.step)
                w_in_h = _round_to_step(h_first * aspect, self.step)
                ar_w_first = w_first / h_in_w if h_in_w else math.inf
                ar_h_first = w_in_h / h_first if h_first else math.inf
                if abs(ar_w_first - aspect) < abs(ar_h_first - aspect):
                    resized = (w_first, int(w_first / aspect + 0.5))
                else:
                    resized = (int(h_first * aspect + 0.5), h_first)
            else:
                resized = (width, height)
            bucket = (resized[0] - resized[0] % self.step, resized[1] - resized[1] % self.step)
            if bucket[0] < self.step or bucket[1] < self.step:
                raise ValueError(f"image of {width}x{height} is smaller than one bucket step ({self.step} px)")
        return BucketAssignment(bucket, resized, bucket[0] / bucket[1] - aspect)

    def describe(self) -> str:
        if not self.enabled:
            return f"fixed resolution {self.resolution[0]}x{self.resolution[1]}"
        if self.no_upscale:
            return (f"buckets: no_upscale, area {self.resolution[0]}x{self.resolution[1]}, "
                    f"step {self.step}")
        return (f"buckets: {len(self.predefined)} predefined for {self.resolution[0]}x{self.resolution[1]}, "
                f"min {self.min_size}, max {self.max_size}, step {self.step}")


def bucket_histogram(assignments: Sequence[BucketAssignment], repeats: Optional[Sequence[float]] = None
                     ) -> dict[tuple[int, int], float]:
    """Images per bucket (weighted by repeats when given), sorted by bucket size."""
    counts: Counter = Counter()
    for index, assignment in enumerate(assignments):
        counts[assignment.bucket] += repeats[index] if repeats is not None else 1
    return dict(sorted(counts.items()))
