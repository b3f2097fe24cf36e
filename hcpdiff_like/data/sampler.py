"""Epoch plans: which samples an epoch holds (repeats, fractional too) and how they form batches.

Every batch comes from one bucket (kohya); each epoch reshuffles samples within buckets and the order of
batches from a seed of (seed, epoch), so the plan is a pure function of (seed, epoch): every process
computes the same global list and takes every `num_processes`-th batch (disjoint), and a resumed run
skips to its saved batch. Sample keys are `(record index, epoch, copy)`; the dataset seeds its caption
ops and augmentation from them.
"""
from __future__ import annotations

import math
import random
from collections import defaultdict
from typing import Iterator, Sequence

SampleKey = tuple[int, int, int]


def epoch_samples(repeats: Sequence[float], seed: int, epoch: int) -> list[tuple[int, int]]:
    """(index, copy) pairs of one epoch. Each image appears floor(r) times; the epoch holds
    floor(sum(r)) samples and the missing ones are drawn among the fractional parts (an image is picked
    with probability frac(r), at most one extra copy each; EveryDream2's rule), re-drawn every epoch."""
    samples = [(i, c) for i, r in enumerate(repeats) for c in range(int(math.floor(r + 1e-9)))]
    target = int(math.floor(sum(repeats) + 1e-6))
    fractional = [(i, r - math.floor(r + 1e-9)) for i, r in enumerate(repeats) if r - math.floor(r + 1e-9) > 1e-9]
    need = target - len(samples)
    if need <= 0 or not fractional:
        return samples
    rng = random.Random(f"{seed}:repeats:{epoch}")
    chosen: set[int] = set()
    while need > 0 and len(chosen) < len(fractional):
        order = fractional[:]
        rng.shuffle(order)
        for index, part in order:
            if index not in chosen and rng.random() < part:
                chosen.add(index)
                samples.append((index, int(math.floor(repeats[index] + 1e-9))))
                need -= 1
                if need == 0:
                    break
    return samples


class BucketBatchSampler:
    """A DataLoader `batch_sampler` yielding lists of SampleKey, all of one bucket."""

    def __init__(self, bucket_of: Sequence[int], repeats: Sequence[float], batch_size: int, seed: int = 0,
                 num_processes: int = 1, process_index: int = 0, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < num_processes:
            raise ValueError(f"process_index {process_index} outside 0..{num_processes - 1}")
        self.bucket_of, self.repeats = list(bucket_of), list(repeats)
        self.batch_size, self.seed, self.shuffle = int(batch_size), int(seed), bool(shuffle)
        self.num_processes, self.process_index = int(num_processes), int(process_index)
        self.epoch, self.start_batch = 0, 0
        self._plan: tuple[int, list] = (-1, [])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self, epoch: int) -> list[list[SampleKey]]:
        """The batches of all processes for `epoch`, padded (by repeating the first ones) to a multiple
        of num_processes so every process runs the same number of steps."""
        if self._plan[0] == epoch:
            return self._plan[1]
        rng = random.Random(f"{self.seed}:order:{epoch}")
        by_bucket: dict[int, list[SampleKey]] = defaultdict(list)
        for index, copy in epoch_samples(self.repeats, self.seed, epoch):
            by_bucket[self.bucket_of[index]].append((index, epoch, copy))
        batches = []
        for bucket in sorted(by_bucket):
            keys = by_bucket[bucket]
            if self.shuffle:
                rng.shuffle(keys)
            batches.extend(keys[i:i + self.batch_size] for i in range(0, len(keys), self.batch_size))
        if self.shuffle:
            rng.shuffle(batches)
        if batches and len(batches) % self.num_processes:
            pad = self.num_processes - len(batches) % self.num_processes
            batches.extend(batches[i % len(batches)] for i in range(pad))
        self._plan = (epoch, batches)
        return batches

    def batches(self, epoch: int) -> list[list[SampleKey]]:
        """This process's batches for `epoch`."""
        return self.global_batches(epoch)[self.process_index::self.num_processes]

    def __iter__(self) -> Iterator[list[SampleKey]]:
        start, self.start_batch = self.start_batch, 0
        yield from self.batches(self.epoch)[start:]

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
