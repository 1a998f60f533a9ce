"""Patch datasets: leak-free spatial split, determinism, background skipping, 2.5D planes."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.degrade import build_degradation
from domainsr.errors import ConfigError
from domainsr.models.checkpoints import InputNormalization
from domainsr.train.datasets import PatchDataset, augment_axes, eval_pairs, split_regions


def block_mean(scale):
    """Block mean over ``scale`` (ANCHORS.md's operator with sigma 0) from the registry."""
    return build_degradation({"kind": "gaussian_mean", "scale": list(scale), "sigma": 0.0})


IDENT = InputNormalization(np.zeros(2, np.float32), np.ones(2, np.float32))


def test_split_is_disjoint_with_gap_and_patches_stay_inside():
    rng = np.random.default_rng(0)
    data = rng.random((2, 200, 64)).astype(np.float32)
    gap = 40
    regions = split_regions(200, axis=0, fractions={"train": 0.6, "val": 0.1, "test": 0.3},
                            order=("train", "val", "test"), gap=gap)
    tr, va, te = regions["train"], regions["val"], regions["test"]
    assert (tr.start, te.stop) == (0, 200) and te.start == 140  # test keeps its nominal 30 %
    assert va.start - tr.stop >= gap and va.stop <= te.start
    sets = {n: set(range(r.start, r.stop)) for n, r in regions.items()}
    assert not (sets["train"] & sets["val"]) and not (sets["train"] & sets["test"]) and not (sets["val"] & sets["test"])

    ds = PatchDataset(data, tr, scale=(2, 2), patch=(16, 16), degradation=block_mean((2, 2)), norm=IDENT,
                      margin=2, seed=3)
    rows_seen = set()
    for i in range(300):
        box = ds.sample_box(i)
        assert box[0].stop - box[0].start == 16 + 2 * 2 * 2  # patch plus the margin on both sides
        rows_seen |= set(range(box[0].start, box[0].stop))
        lr, hr = ds[i]
        assert tuple(lr.shape) == (2, 8, 8) and tuple(hr.shape) == (2, 16, 16)
    assert rows_seen <= sets["train"]
    assert min(abs(r - v) for r in rows_seen for v in sets["val"] | sets["test"]) > gap - 1
    assert max(rows_seen) == tr.stop - 1  # the sampler reaches the edge of its region, not beyond


def test_reversed_order_takes_gap_from_train():
    regions = split_regions(100, axis=1, fractions={"train": 0.5, "val": 0.2, "test": 0.3},
                            order=("test", "val", "train"), gap=10)
    assert (regions["test"].start, regions["test"].stop) == (0, 30)
    assert (regions["val"].start, regions["val"].stop) == (30, 50)
    assert regions["train"].start == 60 and regions["train"].stop == 100
    with pytest.raises(ConfigError, match="train region"):
        split_regions(100, axis=0, fractions={"train": 0.2, "val": 0.4, "test": 0.4},
                      order=("train", "val", "test"), gap=15, min_sizes={"train": 16})


def test_items_are_deterministic_per_seed_and_index():
    data = np.random.default_rng(1).random((2, 64, 64)).astype(np.float32)
    region = split_regions(64, axis=0, fractions={"train": 0.7, "val": 0.1, "test": 0.2},
                           order=("train", "val", "test"), gap=0)["train"]
    kw = {"scale": (2, 2), "patch": (8, 8), "degradation": block_mean((2, 2)), "norm": IDENT}
    a, b, c = (PatchDataset(data, region, seed=s, **kw) for s in (5, 5, 6))
    for i in (0, 7, 123):
        assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a[i], b[i]))
    assert not np.array_equal(a[0][1].numpy(), c[0][1].numpy())
    assert not np.array_equal(a[0][1].numpy(), a[1][1].numpy())


def test_rotations_only_between_axes_of_equal_scale():
    assert augment_axes((2, 2), (16, 16)) == [(0, 1)]
    assert augment_axes((1, 4), (16, 16)) == []
    assert augment_axes((1, 1, 4), (16, 16, 16)) == [(0, 1)]
    assert augment_axes((2, 2), (16, 32)) == []


def test_background_patches_are_skipped():
    data = np.zeros((1, 96, 96), np.float32)
    data[0, 60:90, 10:40] = np.random.default_rng(2).uniform(50, 100, (30, 30))
    region = split_regions(96, axis=0, fractions={"train": 1.0, "val": 0.0, "test": 0.0},
                           order=("train", "val", "test"), gap=0)["train"]
    fg = data[0] > 0
    norm = InputNormalization(np.zeros(1, np.float32), np.ones(1, np.float32))
    ds = PatchDataset(data, region, scale=(2, 2), patch=(16, 16), degradation=block_mean((2, 2)), norm=norm,
                      foreground=fg, min_foreground=0.75, margin=0, augment=False)
    for i in range(100):
        box = ds.sample_box(i)
        assert fg[box].mean() >= 0.75
    with pytest.raises(ConfigError, match="foreground"):
        PatchDataset(data, region, scale=(2, 2), patch=(32, 32), degradation=block_mean((2, 2)), norm=norm,
                     foreground=fg, min_foreground=1.0, margin=0)


def test_planes_give_2d_items_from_a_volume():
    vol = np.random.default_rng(3).random((1, 40, 30, 24)).astype(np.float32)
    region = split_regions(40, axis=0, fractions={"train": 0.6, "val": 0.2, "test": 0.2},
                           order=("train", "val", "test"), gap=4)["train"]
    norm = InputNormalization(np.zeros(1, np.float32), np.ones(1, np.float32))
    ds = PatchDataset(vol, region, scale=(1, 4), patch=(8, 16), degradation=block_mean((1, 4)), norm=norm,
                      planes=[(0, 2), (1, 2)], margin=1, seed=0)
    seen = set()
    for i in range(40):
        box = ds.sample_box(i)
        ext = [s.stop - s.start for s in box]
        assert ext[2] == 16 + 2 * 4 and sorted(ext[:2]) == [1, 8 + 2]
        seen.add(ext.index(1))
        assert box[0].stop <= region.stop
        lr, hr = ds[i]
        assert tuple(hr.shape) == (1, 8, 16) and tuple(lr.shape) == (1, 8, 4)
    assert seen == {0, 1}  # both orientations are drawn
    pairs = eval_pairs(vol, region, scale=(1, 4), degradation=block_mean((1, 4)), norm=norm,
                       planes=[(0, 2), (1, 2)], max_planes=6)
    assert len(pairs) == 6 and all(p.hr.shape[2] == 24 and p.lr.shape[2] == 6 for p in pairs)
