"""Tile plans: cores partition the image, windows are equal and carry the halo, blend weights sum
to one and the running merge equals the weighted sum."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.engine.tiling import TilePlan, plan_axis
from domainsr.errors import ConfigError


@pytest.mark.parametrize("border", ["model", "reflect"])
@pytest.mark.parametrize("length,window,halo", [(1000, 256, 20), (257, 256, 5), (100, 256, 7), (97, 40, 9)])
def test_halo_cores_partition_and_keep_context(length, window, halo, border):
    pad = halo if border == "reflect" else 0
    a = plan_axis(length, window, halo, pad=min(pad, length - 1))
    cover = np.zeros(length, int)
    for s, lo, hi in zip(a.starts, a.lo, a.hi):
        cover[lo:hi] += 1
        assert hi > lo
        e = s + a.window
        # halo of context on both sides, unless the core touches an image border without padding
        assert lo - s >= halo or lo == 0 and s == -min(pad, length - 1)
        assert e - hi >= halo or hi == length and e == length + min(pad, length - 1)
    assert (cover == 1).all()
    assert len(set(np.diff(a.starts))) <= 2  # evenly spaced
    virtual = length + 2 * min(pad, length - 1)
    assert a.window <= min(window, virtual)
    # as few windows as the size limit allows, and no larger than that count needs
    assert a.count == 1 or (a.count - 2) * (window - 2 * halo) + window < virtual
    assert a.count == 1 or a.count * (a.window - 1) - (a.count - 1) * 2 * halo < virtual


def test_plan_tiles_map_regions_to_output_and_crops():
    p = TilePlan.build((130, 90, 33), scale=(1, 2, 4), window=(40, 32, 16), halo=(3, 3, 2))
    out = np.zeros(p.out_shape, int)
    for t in p:
        out[t.out] += 1
        for r, o, c, f, w in zip(t.region, t.out, t.crop, p.scale, p.out_window):
            assert (o.start, o.stop) == (r.start * f, r.stop * f)
            assert c.stop - c.start == o.stop - o.start and c.start >= 0 and c.stop <= w
        assert all(s.stop - s.start + sum(pd) == w for s, pd, w in zip(t.src, t.pad, p.window))
    assert (out == 1).all()
    assert len(p) == np.prod(p.grid)


@pytest.mark.parametrize("blend", ["cosine", "gaussian"])
def test_blend_weights_partition_unity_and_running_merge(blend):
    p = TilePlan.build((150, 121), scale=(2, 3), window=48, halo=4, overlap=10, blend=blend, border="reflect")
    assert p.blended
    rng = np.random.default_rng(0)
    values = rng.normal(size=len(p))
    weighted = np.zeros(p.out_shape)
    wsum = np.zeros(p.out_shape)
    running = np.zeros(p.out_shape, np.float64)
    for v, t in zip(values, p):
        w = p.weight(t)
        assert w.min() >= 0 and w.max() <= 1 + 1e-12
        weighted[t.out] += w * v
        wsum[t.out] += w
        view = running[t.out]
        view += p.running_alpha(t) * (v - view)
    np.testing.assert_allclose(wsum, 1.0, atol=1e-12)
    np.testing.assert_allclose(running, weighted, atol=1e-6)
    # the weights ramp smoothly over the overlap: no jump larger than the ramp step
    row = p.weight(p.tile((1, 1)))[:, :1].ravel()
    assert np.abs(np.diff(row)).max() < 0.2


def test_constant_merge_is_exact():
    p = TilePlan.build((70, 55, 40), scale=(1, 1, 4), window=24, halo=2, overlap=6)
    for c in (0.1, 1 / 3, 1234.567, -7.25e-5):
        acc = np.zeros(p.out_shape, np.float32)
        for t in p:
            view = acc[t.out]
            view += p.running_alpha(t) * (np.float32(c) - view)
        assert (acc == np.float32(c)).all()


def test_bad_plans_are_refused():
    with pytest.raises(ConfigError, match="no core"):
        TilePlan.build((500, 500), scale=2, window=40, halo=20)
    with pytest.raises(ConfigError, match="whole scale"):
        TilePlan.build((50, 50), scale=1.5, window=20, halo=2)
    with pytest.raises(ConfigError, match="spatial axes"):
        TilePlan.build((50, 50), scale=(2, 2, 2), window=20)
    with pytest.raises(ConfigError, match="blend"):
        TilePlan.build((50, 50), scale=2, window=20, blend="hann")  # type: ignore[arg-type]


@pytest.mark.parametrize("border", ["model", "reflect"])
def test_aligned_cores_start_on_block_multiples(border):
    p = TilePlan.build((1000, 700), scale=2, window=300, halo=18, border=border, align=128)
    assert p.window == (2 * 18 + 256,) * 2  # cores of 256 LR px = one 512 px output block
    cover = np.zeros(p.out_shape, int)
    for t in p:
        cover[t.out] += 1
        for r, s, pd in zip(t.region, t.src, t.pad):
            assert r.start % 128 == 0 and (r.stop % 128 == 0 or r.stop in (1000, 700))
            lo, hi = s.start - pd[0], s.stop + pd[1]  # window in image coordinates
            assert r.start - lo >= 18 or lo <= 0 and r.start == 0
            assert hi - r.stop >= 18 or r.stop in (1000, 700)
    assert (cover == 1).all()


@pytest.mark.parametrize("length,window,halo,multiple,minimum", [
    (118, 120, 41, 4, 2), (45, 18, 5, 2, 0), (7, 64, 3, 4, 16), (200, 50, 8, 8, 0), (33, 33, 0, 4, 0)])
def test_size_rules_give_aligned_multiple_windows_over_the_padded_axis(length, window, halo, multiple, minimum):
    """A network that needs windows of a multiple of k (e.g. it pixel-unshuffles by k): every window
    is a multiple of k and starts on one, cores still partition the real axis with their halo, and
    windows reach past the end only into the virtual extension to the next multiple."""
    a = plan_axis(length, window, halo, multiple=multiple, minimum=minimum)
    k, h = multiple, -(-halo // multiple) * multiple
    virtual = max(-(-length // k) * k, -(-minimum // k) * k)
    assert a.window % k == 0 and a.window >= minimum
    cover = np.zeros(length, int)
    for s, lo, hi in zip(a.starts, a.lo, a.hi):
        assert s % k == 0 and 0 <= s and s + a.window <= virtual
        assert lo - s >= h or (lo == 0 and s == 0)
        assert s + a.window - hi >= h or s + a.window == virtual
        cover[lo:hi] += 1
    assert (cover == 1).all()


def test_size_rules_in_blend_mode_and_tiles_pad_the_extension():
    a = plan_axis(101, 40, 4, overlap=8, blend="cosine", multiple=4)
    assert all(s % 4 == 0 for s in a.starts) and a.window % 4 == 0
    total = np.zeros(101)
    for lo, hi, w in zip(a.lo, a.hi, a.weights):
        total[lo:hi] += w
    np.testing.assert_allclose(total, 1.0)
    plan = TilePlan.build((30, 30), scale=2, window=16, halo=3, multiple=4)
    assert plan.halo == (4, 4)
    last = plan.tile([plan.grid[0] - 1, plan.grid[1] - 1])
    assert last.pad == ((0, 2), (0, 2)) and last.region[0].stop == 30  # 30 -> 32, the pad reads past the end
