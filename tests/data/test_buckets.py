"""Bucket math against kohya's rules written independently (brute force) and the reference's examples."""
from __future__ import annotations

import math

import pytest

from hcpdiff_like.data.buckets import BucketManager, make_bucket_resolutions

REFERENCE_512 = ("256x832 256x896 256x960 256x1024 320x704 320x768 384x640 448x576 512x512 576x448 640x384 "
                 "704x320 768x320 832x256 896x256 960x256 1024x256")  # peer-trainers.md 1b


def brute_force_buckets(width, height, min_size, max_size, step):
    """Every width on the step grid paired with the tallest grid height inside the area, both ways."""
    area = width * height
    grid = range(step, max_size + 1, step)
    side = max(s for s in grid if s * s <= area)
    found = {(side, side)}
    for w in range(min_size, max_size + 1, step):
        heights = [h for h in grid if w * h <= area and h <= max_size]
        if heights and max(heights) >= min_size:
            found |= {(w, max(heights)), (max(heights), w)}
    return sorted(found)


def test_reference_lists_and_counts():
    got = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert " ".join(f"{w}x{h}" for w, h in got) == REFERENCE_512
    assert len(make_bucket_resolutions((1024, 1024), 256, 2048, 64)) == 41
    sdxl_1024 = make_bucket_resolutions((1024, 1024), 256, 1024, 64)
    assert len(sdxl_1024) == 25 and all(1024 in b for b in sdxl_1024 if b != (1024, 1024))


@pytest.mark.parametrize("reso,min_size,max_size,step", [((512, 512), 256, 1024, 64), ((768, 768), 320, 1536, 64),
                                                         ((1024, 1024), 256, 2048, 32), ((640, 448), 256, 1024, 64)])
def test_buckets_match_brute_force(reso, min_size, max_size, step):
    got = make_bucket_resolutions(reso, min_size, max_size, step)
    assert got == brute_force_buckets(*reso, min_size, max_size, step)
    assert all(w * h <= reso[0] * reso[1] and w % step == 0 and h % step == 0 for w, h in got)


def test_min_max_rounding_and_resolution_check():
    manager = BucketManager(512, enabled=True, min_size=250, max_size=1000, step=64)
    assert (manager.min_size, manager.max_size) == (192, 1024)
    with pytest.raises(ValueError, match="min_bucket_reso"):
        BucketManager(512, enabled=True, min_size=640, max_size=1024)


@pytest.mark.parametrize("size", [(1000, 600), (600, 1000), (512, 512), (300, 1200), (4000, 1000), (777, 555),
                                  (64, 80)])
def test_select_closest_ratio_and_cover(size):
    manager = BucketManager(512, enabled=True)
    assignment = manager.select(*size)
    aspect = size[0] / size[1]
    best = min(abs(w / h - aspect) for w, h in manager.predefined)
    assert abs(assignment.bucket[0] / assignment.bucket[1] - aspect) == pytest.approx(best)
    # resized covers the bucket, one side matches exactly, aspect kept within rounding
    (rw, rh), (bw, bh) = assignment.resized, assignment.bucket
    assert rw >= bw and rh >= bh and (rw == bw or rh == bh)
    assert abs(rw / rh - aspect) < 2 / min(rw, rh) + 1e-9
    assert assignment.ar_error == pytest.approx(bw / bh - aspect)


def test_exact_bucket_size_is_kept():
    manager = BucketManager(512, enabled=True)
    assert manager.select(384, 640).bucket == (384, 640) and manager.select(384, 640).resized == (384, 640)


def test_no_upscale_never_enlarges_and_reference_example():
    manager = BucketManager(1024, enabled=True, no_upscale=True)
    # peer-trainers.md 1b: the known weakness, 3072x3000 -> 960x960
    assert manager.select(3072, 3000).bucket == (960, 960)
    small = manager.select(300, 500)
    assert small.resized == (300, 500) and small.bucket == (256, 448)
    for size in [(2000, 1000), (1500, 1500), (5000, 700)]:
        a = manager.select(*size)
        assert a.resized[0] <= size[0] and a.resized[1] <= size[1]
        assert a.resized[0] * a.resized[1] <= 1024 * 1024 * 1.01
        assert a.bucket[0] % 64 == 0 and a.bucket[1] % 64 == 0
        assert a.bucket[0] <= a.resized[0] < a.bucket[0] + 64 and a.bucket[1] <= a.resized[1] < a.bucket[1] + 64


def test_fixed_mode_covers_resolution():
    manager = BucketManager([640, 384], enabled=False)
    a = manager.select(1000, 1000)
    assert a.bucket == (640, 384) and a.resized == (640, 640)
    a = manager.select(500, 100)
    assert a.bucket == (640, 384) and a.resized[1] == 384 and a.resized[0] == math.floor(500 * 384 / 100 + 0.5)
