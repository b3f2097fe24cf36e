"""Epoch plans: fractional repeats, one bucket per batch, disjoint DDP shards, determinism."""
from __future__ import annotations

import math
from collections import Counter

import pytest

from hcpdiff_like.data.sampler import BucketBatchSampler, epoch_samples


def test_fractional_repeats_follow_everydream_rule():
    repeats = [2.5, 1.0, 0.25, 0.25, 3.0, 0.4]
    extras = Counter()
    epochs = 400
    for epoch in range(epochs):
        samples = epoch_samples(repeats, seed=3, epoch=epoch)
        assert len(samples) == math.floor(sum(repeats))
        counts = Counter(i for i, _ in samples)
        for index, r in enumerate(repeats):
            assert counts[index] in (math.floor(r), math.floor(r) + 1)
            extras[index] += counts[index] - math.floor(r)
        assert len(set(samples)) == len(samples)  # copy numbers make keys unique
    # the extra slots go to the fractional images, roughly in proportion to their fractions
    assert extras[1] == extras[4] == 0
    assert extras[0] > extras[5] > 0 and extras[2] > 0 and extras[3] > 0
    assert sum(extras.values()) == epochs * (7 - 6)
    assert epoch_samples(repeats, 3, 5) == epoch_samples(repeats, 3, 5)


def test_batches_stay_in_one_bucket_and_cover_everything():
    bucket_of = [i % 3 for i in range(23)]
    sampler = BucketBatchSampler(bucket_of, [2.0] * 23, batch_size=4, seed=1)
    batches = list(sampler)
    assert all(len({bucket_of[k[0]] for k in batch}) == 1 for batch in batches)
    assert Counter(k[0] for b in batches for k in b) == Counter({i: 2 for i in range(23)})
    sizes = Counter(bucket_of)  # per bucket ceil(count*repeat / batch) batches, kohya's rule
    assert len(batches) == sum(math.ceil(2 * n / 4) for n in sizes.values())


def test_epochs_reshuffle_deterministically():
    make = lambda: BucketBatchSampler([0] * 16, [1.0] * 16, 4, seed=9)
    a, b = make(), make()
    a.set_epoch(0), b.set_epoch(0)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert [k[0] for bt in list(a) for k in bt] != [k[0] for bt in list(b) for k in bt]


@pytest.mark.parametrize("world", [2, 3])
def test_ddp_shards_disjoint_and_equal_length(world):
    bucket_of = [i % 2 for i in range(21)]
    shards = [BucketBatchSampler(bucket_of, [1.0] * 21, 2, seed=4, num_processes=world, process_index=r)
              for r in range(world)]
    plans = [list(s) for s in shards]
    assert len({len(p) for p in plans}) == 1
    global_batches = shards[0].global_batches(0)
    assert sum(len(p) for p in plans) == len(global_batches)
    for rank, plan in enumerate(plans):  # rank r runs global batches r, r+world, ...: no batch runs twice
        assert plan == global_batches[rank::world]
    padding = len(global_batches) - math.ceil(sum(1 for _ in range(11)) / 2) - math.ceil(10 / 2)
    assert 0 <= padding < world
    seen = Counter(k[0] for p in plans for b in p for k in b)
    assert set(seen) == set(range(21))


def test_start_batch_skips_once():
    sampler = BucketBatchSampler([0] * 12, [1.0] * 12, 3, seed=0)
    full = list(sampler)
    sampler.start_batch = 2
    assert list(sampler) == full[2:]
    assert list(sampler) == full
