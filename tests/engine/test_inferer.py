"""Patch inference: no seams (tiled == whole image), exact constants under blending, nodata tiles
skipped, NaN contained, batching neutral, geometry/provenance of enhanced images."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from engine_testmodels import ConvSR, Counting, NearestUp, whole

from domainsr.engine import PatchInferer, enhance_image, log_progress
from domainsr.errors import ConfigError, ModelCardMismatch, ModelError
from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage


@pytest.mark.parametrize("overlap", [0, 6])
def test_seam_2d_tiled_equals_whole(rng, overlap):
    model = ConvSR(2, channels=3, scale=(2, 2), depth=4)  # radius 5 < halo
    x = rng.normal(size=(3, 157, 203)).astype(np.float32)
    inf = PatchInferer(model, tile=48, overlap=overlap, batch_size=4)
    out = inf.run(x)
    assert inf.stats.computed > 9  # really tiled
    assert out.shape == (3, 314, 406)
    np.testing.assert_allclose(out, whole(model, x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("overlap", [0, 4])
def test_seam_3d_anisotropic_tiled_equals_whole(rng, overlap):
    model = ConvSR(3, channels=2, scale=(1, 1, 4), depth=2, feats=6)
    x = rng.normal(size=(2, 45, 38, 21)).astype(np.float32)
    inf = PatchInferer(model, tile=(20, 18, 16), overlap=overlap)
    out = inf.run(x)
    assert inf.stats.computed >= 8
    assert out.shape == (2, 45, 38, 84)
    np.testing.assert_allclose(out, whole(model, x), atol=1e-5, rtol=0)


def test_reflect_border_equals_whole_image_of_reflect_padded_input(rng):
    model = ConvSR(2, channels=1, scale=(3, 3), depth=3)
    x = rng.normal(size=(1, 90, 70)).astype(np.float32)
    inf = PatchInferer(model, tile=32, border="reflect")
    h = 4  # the halo = receptive radius
    ref = whole(model, np.pad(x, ((0, 0), (h, h), (h, h)), mode="reflect"))[:, 3 * h:-3 * h, 3 * h:-3 * h]
    np.testing.assert_allclose(inf.run(x), ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["cubic", "linear", "rescnn"])
def test_registry_models_tile_without_seams(rng, name):
    from domainsr.models.registry import build_model

    kw = {"n_blocks": 2, "n_feats": 8} if name == "rescnn" else {}
    model = build_model(name, spatial_dims=2, in_channels=2, scale=2, **kw)
    torch.manual_seed(0)
    for p in model.parameters():  # a non-trivial residual (rescnn's tail starts at zero)
        p.data.normal_(0, 0.1)
    x = rng.random((2, 120, 100)).astype(np.float32)
    inf = PatchInferer(model, tile=40)
    np.testing.assert_allclose(inf.run(x), whole(model, x), atol=1e-5, rtol=0)
    assert inf.stats.computed > 1


@pytest.mark.parametrize("shape,scale", [((1, 83, 97), (2, 2)), ((1, 30, 26, 19), (1, 2, 3))])
@pytest.mark.parametrize("value", [0.1, 1 / 3, 1234.5678])
def test_constant_input_stays_exactly_constant_with_blending(shape, scale, value):
    # no receptive radius declared -> the engine blends over an overlap (beyond its halo)
    inf = PatchInferer(NearestUp(scale), tile=16, overlap=5)
    out = inf.run(np.full(shape, value, np.float32))
    assert inf.plan(shape[1:]).blended and inf.stats.computed > 4
    assert (out == np.float32(value)).all()


@pytest.mark.parametrize("name", ["linear", "cubic"])
def test_constant_stays_constant_through_registry_baselines_with_blending(name):
    from domainsr.models.registry import build_model

    model = build_model(name, spatial_dims=2, in_channels=1, scale=2)
    inf = PatchInferer(model, tile=32, overlap=8, blend="gaussian")
    x = np.full((1, 100, 77), 0.37, np.float32)
    out = inf.run(x)
    assert inf.stats.computed > 4
    np.testing.assert_array_equal(out, whole(model, x))
    assert np.ptp(out) <= 1e-6


def test_unknown_radius_defaults_to_blending():
    inf = PatchInferer(NearestUp((2, 2)))
    plan = inf.plan((2000, 1500))
    assert plan.blended and plan.halo == (32, 32) and plan.overlap == (64, 64)


def test_nodata_tiles_are_skipped_and_mask_applied(rng):
    base = ConvSR(2, channels=2, scale=(2, 2), depth=2)  # radius 3
    model = Counting(base)
    x = rng.normal(size=(2, 160, 160)).astype(np.float32)
    mask = np.ones((160, 160), bool)
    mask[:, :80] = False  # left half is nodata
    inf = PatchInferer(model, tile=40, batch_size=1)
    out = inf.run(x, mask=mask, fill=-999.0)
    plan = inf.plan((160, 160))
    all_invalid = sum(not mask[t.region].any() for t in plan)
    assert all_invalid >= 4 and inf.stats.skipped == all_invalid
    assert model.tiles == len(plan) - all_invalid == inf.stats.computed
    assert (out[:, :, :160] == -999.0).all()
    # away from the nodata edge (> radius) the result is the plain one
    ref = whole(base, x)
    np.testing.assert_allclose(out[:, :, 2 * 84:], ref[:, :, 2 * 84:], atol=1e-5)
    assert np.isfinite(out).all()


def test_nan_does_not_blank_its_tile(rng):
    model = ConvSR(2, channels=3, scale=(2, 2), depth=3)  # radius 4
    x = rng.normal(size=(3, 64, 64)).astype(np.float32)
    ref = whole(model, x)
    xn = x.copy()
    xn[1, 20, 30] = np.nan
    xn[0, 50, 5] = np.inf
    out = PatchInferer(model, tile=64).run(xn)  # one tile: a poisoned tile would be all NaN
    bad = ~np.isfinite(out)
    assert bad.sum() == 8  # the two pixels' 2x2 footprints, in their own band only
    assert bad[1, 40:42, 60:62].all() and bad[0, 100:102, 10:12].all()
    far = np.ones((64, 64), bool)
    far[20 - 5:20 + 6, 30 - 5:30 + 6] = False
    far[50 - 5:50 + 6, 5 - 5:5 + 6] = False
    far_hr = far.repeat(2, 0).repeat(2, 1)
    np.testing.assert_allclose(out[:, far_hr], ref[:, far_hr], atol=1e-5)
    # near the NaN the filled input gives finite, sensible values (not a blown-up patch)
    near = out[1, 34:48, 54:68]
    assert np.isfinite(near[~bad[1, 34:48, 54:68]]).all()
    assert np.abs(near[np.isfinite(near)]).max() < 10 * np.abs(ref).max()


def test_batch_size_does_not_change_the_result(rng):
    model = ConvSR(2, channels=4, scale=(2, 2), depth=3)
    x = rng.normal(size=(4, 130, 110)).astype(np.float32)
    one = PatchInferer(model, tile=40, batch_size=1).run(x)
    many = PatchInferer(model, tile=40, batch_size=7).run(x)
    np.testing.assert_allclose(many, one, atol=1e-6, rtol=0)


def test_progress_reports_every_tile(rng, caplog):
    calls: list[tuple[int, int]] = []
    inf = PatchInferer(ConvSR(2, channels=1, depth=1), tile=24, batch_size=3,
                       progress=lambda d, t: calls.append((d, t)))
    inf.run(rng.random((1, 60, 60)).astype(np.float32))
    total = len(inf.plan((60, 60)))
    assert calls[-1] == (total, total) and all(t == total for _, t in calls)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    logger = logging.getLogger("test.engine.progress")
    with caplog.at_level(logging.INFO, logger="test.engine.progress"):
        inf.progress = log_progress("sr", every_s=0.0, logger=logger)
        inf.run(rng.random((1, 60, 60)).astype(np.float32))
    assert any(f"{total}/{total} tiles" in r.message and "ETA" in r.message for r in caplog.records)


def test_rich_progress_bar_reaches_the_end(rng):
    import io

    from rich.console import Console

    from domainsr.engine import rich_progress

    buf = io.StringIO()
    with rich_progress("enhance", console=Console(file=buf, width=100, force_terminal=False)) as cb:
        inf = PatchInferer(ConvSR(2, channels=1, depth=1), tile=24, progress=cb)
        inf.run(rng.random((1, 50, 50)).astype(np.float32))
    total = len(inf.plan((50, 50)))
    assert f"{total}/{total}" in buf.getvalue() and "ETA" in buf.getvalue()


def test_bad_inputs_raise_typed_errors(rng):
    model = ConvSR(2, channels=3, depth=2)
    with pytest.raises(ModelCardMismatch, match="3 channels"):
        PatchInferer(model, tile=32).run(rng.random((4, 40, 40)).astype(np.float32))
    with pytest.raises(ModelCardMismatch, match="2D"):
        PatchInferer(model, tile=32).run(rng.random((3, 20, 20, 20)).astype(np.float32))
    with pytest.raises(ConfigError, match="no core"):
        PatchInferer(model, tile=6).run(rng.random((3, 40, 40)).astype(np.float32))
    with pytest.raises(ConfigError, match="scale"):
        PatchInferer(torch.nn.Identity())
    with pytest.raises(ModelError, match="spatial shape"):
        PatchInferer(torch.nn.Identity(), scale=2, halo=0, tile=16).run(
            rng.random((1, 40, 40)).astype(np.float32))


def test_enhance_image_volume_geometry_mask_and_provenance(rng):
    model = ConvSR(3, channels=1, scale=(1, 1, 4), depth=1)
    affine = np.array([[0, 0, 3.0, 10], [-0.9, 0, 0, 20], [0, 1.1, 0, -5], [0, 0, 0, 1]])
    data = (rng.random((1, 24, 20, 9)) * 1000).astype(np.int16)
    mask = np.ones((24, 20, 9), bool)
    mask[:4] = False
    img = SpatialImage(data, "ct", MedicalGeometry(affine, (24, 20, 9)), units="HU", nodata=-1024, mask=mask,
                       provenance={"source": "ct.nii.gz"}, meta={"storage_dtype": "int16"})
    sr = enhance_image(img, PatchInferer(model, tile=16))
    assert sr.data.dtype == np.float32 and sr.data.shape == (1, 24, 20, 36)
    assert sr.geometry.almost_equal(img.geometry.scaled((1, 1, 4)))
    np.testing.assert_allclose(sr.geometry.extent(), img.geometry.extent(), atol=1e-9)
    assert sr.meta["storage_dtype"] == "int16" and sr.units == "HU" and sr.nodata == -1024
    assert sr.mask.shape == (24, 20, 36) and not sr.mask[:4].any() and sr.mask[4:].all()
    assert (sr.data[:, :4] == -1024).all()
    step = sr.provenance["history"][-1]
    assert step["step"] == "enhance" and step["model"] == "ConvSR" and step["scale"] == [1, 1, 4]
    assert img.provenance["history"] == []  # the input is untouched


def test_enhance_image_raster_checks_the_model_card(rng):
    from affine import Affine

    img = SpatialImage(rng.random((3, 30, 40)).astype(np.float32), "optical",
                       GeoGeometry("EPSG:32618", Affine(10, 0, 5e5, 0, -10, 4e6), (30, 40)),
                       provenance={"source": "scene.tif"})
    sr = enhance_image(img, PatchInferer(ConvSR(2, channels=3, depth=1), tile=16))
    assert sr.geometry.res == (5.0, 5.0) and sr.geometry.bounds == img.geometry.bounds
    assert sr.mask is None and sr.band_names == img.band_names
    with pytest.raises(ModelCardMismatch, match="scene.tif.*4 channels"):
        enhance_image(img, PatchInferer(ConvSR(2, channels=4, depth=1), tile=16))


@pytest.mark.parametrize("overlap", [0, 4])
def test_volume_needs_one_output_buffer_not_more(rng, overlap):
    import tracemalloc

    model = ConvSR(3, channels=1, scale=(1, 1, 4), depth=1, feats=2)
    x = rng.random((1, 128, 128, 64), dtype=np.float32)
    inf = PatchInferer(model, tile=32, overlap=overlap)
    tracemalloc.start()
    try:
        out = inf.run(x)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.nbytes == 16 * 2**20 and inf.stats.computed > 50
    # one float32 output plus tile-sized temporaries (no weight map, no float64 accumulator)
    assert peak < 1.5 * out.nbytes, peak / out.nbytes


def test_default_window_is_the_largest_that_fits_memory(monkeypatch, caplog):
    from domainsr.engine.inferer import LIVE_ACTIVATIONS, MEMORY_FRACTION, WINDOW_BOUNDS

    model = ConvSR(2, channels=4, feats=64, depth=35)  # radius 36, largest activation 64 ch
    monkeypatch.setattr(PatchInferer, "_free_memory", lambda self: 16 * 2**30)
    big = PatchInferer(model, device="cpu")
    assert 0.95 * WINDOW_BOUNDS[2][1] <= big.plan((20000, 20000)).window[0] <= WINDOW_BOUNDS[2][1]
    assert big.plan((900, 700)).grid == (1, 1)  # small images are one tile
    monkeypatch.setattr(PatchInferer, "_free_memory", lambda self: 200 * 2**20)
    tight = PatchInferer(model, device="cpu")
    w = tight.plan((20000, 20000)).window[0]
    assert 0.8 * w**2 * LIVE_ACTIVATIONS * 64 * 4 <= MEMORY_FRACTION * 200 * 2**20 < (w + 8) ** 2 * LIVE_ACTIVATIONS * 256
    assert "recompute" not in caplog.text
    monkeypatch.setattr(PatchInferer, "_free_memory", lambda self: 30 * 2**20)
    PatchInferer(model, device="cpu").plan((5000, 5000))
    assert "recompute" in caplog.text  # a tiny window for such a halo deserves a warning
