"""Aspect-ratio buckets, the centre crop transform and the one-bucket-per-batch sampler."""

from __future__ import annotations

import bisect
import math
import random

import pytest
from PIL import Image

from kl_autoencoder.latents.buckets import BucketBatchSampler, Transform, center_crop_box, make_buckets, nearest_bucket


def test_sdxl_buckets_shape():
    area = 1024 * 1024
    b = make_buckets(area)
    assert (1024, 1024) in b
    for sdxl in [(896, 1152), (832, 1216), (768, 1344), (1152, 896), (1216, 832), (1344, 768)]:  # SDXL paper, table 6
        assert sdxl in b
    for w, h in b:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.85 * area <= w * h <= area
        assert 0.25 <= w / h <= 4.0
        assert (h, w) in b  # symmetric
    assert len(set(b)) == len(b)
    with pytest.raises(ValueError, match="smaller than one 64x64"):
        make_buckets(1000)


@pytest.mark.parametrize("area", [256 * 256, 512 * 512, 1024 * 1024])
def test_assignment_within_half_a_bucket_step(area):
    buckets = make_buckets(area)
    logs = sorted(math.log(w / h) for w, h in buckets)
    rng = random.Random(0)
    for _ in range(500):
        r = math.exp(rng.uniform(logs[0], logs[-1]))
        W = rng.randint(64, 3000)
        H = max(1, round(W / r))
        r = math.log(W / H)
        if not logs[0] <= r <= logs[-1]:
            continue
        j = min(max(bisect.bisect_right(logs, r) - 1, 0), len(logs) - 2)  # logs[j] <= r <= logs[j+1]
        step = logs[j + 1] - logs[j]
        bw, bh = nearest_bucket(W, H, buckets)
        err = abs(math.log(bw / bh) - r)
        assert err <= 0.5 * step + 1e-12, (W, H, (bw, bh))
        assert err <= min(abs(lg - r) for lg in logs) + 1e-12  # and it is the nearest one
    # outside the range: the extreme bucket
    assert nearest_bucket(10000, 10, buckets) == max(buckets, key=lambda b: b[0] / b[1])


def test_center_crop_box_and_transform():
    assert center_crop_box(200, 100, (64, 64)) == (50, 0, 150, 100)
    assert center_crop_box(100, 300, (64, 64)) == (0, 100, 100, 200)
    assert center_crop_box(64, 64, (64, 64)) == (0, 0, 64, 64)
    t = Transform.bucketed(256 * 256)
    for W, H in [(481, 321), (321, 481), (1000, 250), (300, 300), (50, 70)]:
        img = Image.new("RGB", (W, H), (10, 20, 30))
        out, box, bucket = t(img)
        assert out.size == bucket and bucket in t.buckets
        left, top, right, bottom = box
        assert 0 <= left and 0 <= top and right <= W and bottom <= H
        assert abs((left + right) - W) <= 1 and abs((top + bottom) - H) <= 1  # centred
        assert abs((right - left) / (bottom - top) - bucket[0] / bucket[1]) < 2.0 / min(right - left, bottom - top) + 1e-9
    with pytest.raises(ValueError, match="multiple of 8"):
        Transform.fixed(100)


def test_batch_sampler_never_mixes_buckets():
    rng = random.Random(1)
    labels = [rng.choice([(64, 64), (128, 64), (64, 128)]) for _ in range(103)]
    s = BucketBatchSampler(labels, 8, seed=5)
    batches = list(s)
    assert len(batches) == len(s)
    assert sorted(i for b in batches for i in b) == list(range(103))  # every index exactly once
    for b in batches:
        assert 1 <= len(b) <= 8
        assert len({labels[i] for i in b}) == 1
    assert list(BucketBatchSampler(labels, 8, seed=5)) == batches  # same seed, same epoch: same order
    s.set_epoch(1)
    assert list(s) != batches
    d = BucketBatchSampler(labels, 8, seed=5, drop_last=True)
    assert all(len(b) == 8 for b in d) and len(list(d)) == len(d) == sum(labels.count(k) // 8 for k in set(labels))
    assert list(BucketBatchSampler(labels, 8, shuffle=False))[0] == sorted(list(BucketBatchSampler(labels, 8, shuffle=False))[0])
