"""The local LR range and issue 16's invented-extremes measure, on cases with known answers."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from domainsr.engine.consistency import invented_extremes, local_range, upsample_nearest_nd
from domainsr.errors import ConfigError


def test_local_range_is_the_3x3_neighbourhood_on_the_sr_grid():
    lr = np.zeros((1, 4, 4), np.float32)
    lr[0, 1, 1] = 8.0
    lo, hi = local_range(lr, (2, 2))
    assert lo.shape == hi.shape == (1, 8, 8) and not lo.any()
    want = np.zeros((4, 4))
    want[:3, :3] = 8.0  # every LR pixel within one of (1, 1)
    np.testing.assert_array_equal(hi[0], np.kron(want, np.ones((2, 2))))
    lo3, hi3 = local_range(np.arange(8, dtype=np.float32).reshape(1, 2, 2, 2), (1, 1, 3))
    assert lo3.shape == (1, 2, 2, 6) and np.all(lo3 == 0) and np.all(hi3 == 7)


def test_invented_extremes_counts_only_far_outside_and_far_worse_than_interpolation():
    lr = np.zeros((1, 4, 4), np.float32)
    lr[0, 1, 1] = 8.0  # local range [0, 8] around it, [0, 0] far from it
    hr = upsample_nearest_nd(lr, (2, 2)).copy()
    interp = hr + 1.0  # interpolation errs by 1 everywhere
    sr = hr.copy()
    sr[0, 2, 2] = 12.0  # range [0, 8]: 4 above (> 25 % = 2), error 4 > 3 x 1: invented
    sr[0, 3, 3] = 10.5  # leaves (> 10), error 2.5 < 3: not invented
    sr[0, 7, 7] = 0.5  # range [0, 0]: leaves, error 0.5: not invented
    sr[0, 6, 0] = -5.0  # range [0, 0]: leaves, error 5: invented
    sr[0, 2, 3] = 9.5  # inside the widened range [-2, 10]
    e = invented_extremes(sr, hr, interp, lr, (2, 2))
    assert e.n == 64
    assert e.invented == pytest.approx(2 / 64) and e.output_leaves == pytest.approx(4 / 64)
    assert e.truth_leaves == 0.0
    hr2 = hr.copy()
    hr2[0, 7, 7] = 3.0  # the truth leaves too
    assert invented_extremes(sr, hr2, interp, lr, (2, 2)).truth_leaves == pytest.approx(1 / 64)
    mask = np.zeros((8, 8), bool)
    mask[4:, :4] = True  # only the (-5) pixel's quadrant: 1 invented of 16
    assert invented_extremes(sr, hr, interp, lr, (2, 2), mask).invented == pytest.approx(1 / 16)
    with pytest.raises(ConfigError, match="shapes differ"):
        invented_extremes(sr[:, :6], hr, interp, lr, (2, 2))


# ---------------------------------------------------------------------------------------------
# the data-consistency stage

def _op(spec: dict, scale, channels: int = 2):
    from domainsr.degrade import noise_free_operator

    return noise_free_operator(spec, scale, channels)


def _gauss(scale=(2, 2), sigma: float = 1.0) -> dict:
    return {"kind": "gaussian_mean", "scale": list(scale), "sigma": sigma}


def test_reach_of_the_operators():
    from domainsr.engine.consistency import _Upsampler, operator_reach, upsampler_reach

    assert operator_reach(_op(_gauss(sigma=0.0), (2, 2)), (2, 2), 2) == (0, 0)  # block mean: its own cell
    assert operator_reach(_op(_gauss(sigma=1.0), (2, 2)), (2, 2), 2) == (2, 2)  # 4 HR px of blur
    assert operator_reach(_op(_gauss((1, 2, 2), 1.0), (1, 2, 2), 1), (1, 2, 2), 1) == (0, 2, 2)
    assert upsampler_reach(_Upsampler("cubic", (2, 2), 1), (2, 2), 1) == (2, 2)
    assert upsampler_reach(_Upsampler("nearest", (2, 2), 1), (2, 2), 1) == (0, 0)
    with pytest.raises(ConfigError, match="local degradation"):
        operator_reach(_op({"kind": "kspace", "scale": [2, 2]}, (2, 2)), (2, 2), 2)


def _stage(spec: dict, scale, channels: int = 2, **settings):
    from domainsr.engine.consistency import DataConsistency
    from domainsr.models.card import ConsistencySettings

    return DataConsistency.build(_op(spec, scale, channels), ConsistencySettings(**settings), scale, channels)


def test_back_projection_fits_the_lr_and_the_clamp_bounds_the_output(rng):
    lr = rng.uniform(0, 100, (2, 10, 12)).astype(np.float32)
    sr = rng.uniform(-50, 150, (2, 20, 24)).astype(np.float32)
    mean = _op(_gauss(sigma=0.0), (2, 2))
    one = _stage(_gauss(sigma=0.0), (2, 2), iterations=1, upsampler="nearest")
    np.testing.assert_allclose(mean(one(sr, lr)), lr, atol=1e-4)  # block mean + nearest: exact in one step
    blur = _op(_gauss(), (2, 2))
    before = np.abs(blur(sr) - lr).mean()
    after = [np.abs(blur(_stage(_gauss(), (2, 2), iterations=k)(sr, lr)) - lr).mean() for k in (1, 5)]
    assert after[1] < 0.5 * after[0] < 0.5 * before
    clamped = _stage(_gauss(), (2, 2), iterations=2, clamp_margin=0.1)(sr, lr)
    lo, hi = local_range(lr, (2, 2))
    assert np.all(clamped >= lo - 0.1 * (hi - lo) - 1e-4) and np.all(clamped <= hi + 0.1 * (hi - lo) + 1e-4)
    assert invented_extremes(clamped, sr, sr, lr, (2, 2)).output_leaves == 0.0


@pytest.mark.parametrize("nd", [2, 3])
def test_tiled_equals_whole_image_with_the_stage(rng, nd):
    from domainsr.engine import PatchInferer
    from tests.engine.engine_testmodels import ConvSR

    scale = (2,) * nd
    net = ConvSR(spatial_dims=nd, channels=2, scale=scale, depth=2)
    stage = _stage(_gauss(scale, 1.0), scale, iterations=2, clamp_margin=0.25)
    x = rng.uniform(0, 1, (2, *((40, 36) if nd == 2 else (40, 6, 5)))).astype(np.float32)
    tile = 24 if nd == 2 else (24, 64, 64)
    whole = PatchInferer(net, device="cpu", threads=1, consistency=stage, tile=200).run(x)
    inf = PatchInferer(net, device="cpu", threads=1, consistency=stage, tile=tile)
    tiled = inf.run(x)
    assert inf.stats.computed > 1 and inf.stats.plan["consistency"]["halo"] == [8] * nd
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    plain = PatchInferer(net, device="cpu", threads=1, tile=200).run(x)
    assert np.abs(whole - plain).max() > 1e-2  # the stage changes the output
    short = dataclasses.replace(stage, halo=(0,) * nd)  # without its halo the tiles would differ
    assert np.abs(PatchInferer(net, device="cpu", threads=1, consistency=short, tile=tile).run(x)
                  - whole).max() > 1e-4


def test_the_card_enables_the_stage_and_the_engine_overrides_it():
    from domainsr.engine.inferer import consistency_stage
    from domainsr.models.card import ModelCard
    from domainsr.models.descriptor import ModelDescriptor
    from tests.engine.engine_testmodels import ConvSR

    base = {"name": "tiny", "architecture": {"name": "rescnn"}, "domain": "optical", "spatial_dims": 2,
            "scale": (2, 2), "in_channels": 2, "out_channels": 2, "units": "DN",
            "normalization": {"kind": "fixed", "offset": [0.0, 0.0], "scale": [1.0, 1.0]},
            "receptive_radius": (3, 3), "degradation": _gauss()}
    off = ModelCard.model_validate(base)
    on = ModelCard.model_validate({**base, "consistency": {"iterations": 2, "clamp_margin": 0.25}})
    net = ConvSR(channels=2, depth=2)

    def desc(card):
        return ModelDescriptor(module=net, name=card.name, kind="checkpoint", architecture="convsr", scale=(2, 2), spatial_dims=2,
                               in_channels=2, out_channels=2, receptive_radius=(3, 3), card=card)

    assert consistency_stage(desc(off), None) is None
    assert consistency_stage(desc(on), None).halo == (8, 8)
    assert consistency_stage(desc(on), False) is None
    assert consistency_stage(desc(off), True).settings.iterations == 3  # the defaults
    with pytest.raises(ValueError, match="direct model"):
        ModelCard.model_validate({**base, "spatial_dims": 2, "application": "slicewise", "scale": (1, 2),
                                  "consistency": {}})
    with pytest.raises(ValueError, match="does nothing"):
        ModelCard.model_validate({**base, "consistency": {"iterations": 0}})
    kspace = ModelCard.model_validate({**base, "degradation": {"kind": "kspace", "scale": [2, 2]}})
    with pytest.raises(ConfigError, match="local"):
        consistency_stage(desc(kspace), True)


def test_streamed_raster_equals_in_memory_with_the_stage(tmp_path, rng):
    import rasterio
    from rasterio.transform import from_origin

    from domainsr.engine import PatchInferer, enhance_image, enhance_raster_file
    from domainsr.io.raster import read_raster, write_raster
    from tests.engine.engine_testmodels import ConvSR

    data = (rng.random((2, 300, 280)) * 3000 + 50).astype(np.uint16)
    scene = tmp_path / "scene.tif"
    with rasterio.open(scene, "w", driver="GTiff", width=280, height=300, count=2, dtype="uint16",
                       crs="EPSG:32618", transform=from_origin(600000, 4200000, 10, 10), tiled=True,
                       blockxsize=128, blockysize=128) as ds:
        ds.write(data)
    stage = _stage(_gauss(), (2, 2), iterations=2, clamp_margin=0.5)
    inferer = PatchInferer(ConvSR(channels=2, depth=2), device="cpu", threads=1, tile=(100, 128),
                           consistency=stage)
    out = enhance_raster_file(scene, tmp_path / "sr.tif", inferer, overviews=False)
    assert inferer.stats.computed > 1
    ref = write_raster(enhance_image(read_raster(scene), inferer), tmp_path / "mem.tif")
    with rasterio.open(out) as a, rasterio.open(ref) as b:
        np.testing.assert_array_equal(a.read(), b.read())


def test_residuals_within_the_noise_are_left_alone(rng):
    from domainsr.engine.consistency import noise_level

    assert noise_level({"kind": "optical", "scale": [2, 2], "noise_sigma": 3.0}) == 3.0
    assert noise_level({"kind": "one_of", "options": [{"kind": "compose", "steps": [
        {"kind": "thick_slices", "scale": [1, 4]}, {"kind": "hu_noise", "sigma_hu": 12.0}]}]}) == 12.0
    assert noise_level({"kind": "gaussian_mean", "scale": [2, 2], "sigma": 1.0}) is None
    hr = rng.uniform(0, 100, (2, 20, 24)).astype(np.float32)
    blur = _op(_gauss(), (2, 2))
    lr = blur(hr)
    noisy = lr + rng.uniform(-1.0, 1.0, lr.shape).astype(np.float32)  # |noise| < 1
    stage = _stage(_gauss(), (2, 2), iterations=3)
    tolerant = dataclasses.replace(stage, tolerance=1.0)
    np.testing.assert_array_equal(tolerant(hr, noisy), hr)  # consistent within the noise: unchanged
    assert np.abs(stage(hr, noisy) - hr).max() > 0.1  # the exact projection fits the noise
    with pytest.raises(ConfigError, match="noise level"):
        _stage(_gauss(), (2, 2), iterations=1, noise_tolerance=1.0)


def test_the_task_config_switches_the_stage_for_a_shipped_card():
    """The shipped S2 card switches the stage on (1 step, residuals within 2 noise std left alone);
    ``tiling.consistency: false`` in a task config turns it off, ``true`` keeps the card's settings,
    and a card without settings of its own gets the defaults (3 steps)."""
    from domainsr.app.enhance import patch_inferer
    from domainsr.config import EnhanceConfig
    from domainsr.models.checkpoints import load_checkpoint
    from domainsr.models.descriptor import ModelDescriptor

    module, card = load_checkpoint("sentinel2-rgbn-x2")

    def desc(card):
        return ModelDescriptor(module=module, name=card.name, kind="checkpoint", architecture=card.architecture.name,
                               scale=tuple(card.scale), spatial_dims=2, in_channels=4, out_channels=4,
                               receptive_radius=tuple(card.receptive_radius), card=card)

    base = {"name": "dc-switch", "model": {"name": "sentinel2-rgbn-x2"}}
    own = patch_inferer(desc(card), EnhanceConfig.model_validate(base), None).consistency
    assert own is not None and own.settings.iterations == 1
    assert own.tolerance == pytest.approx(2.0 * card.degradation["noise_sigma"])
    off = EnhanceConfig.model_validate({**base, "tiling": {"consistency": False}})
    assert patch_inferer(desc(card), off, None).consistency is None
    on = EnhanceConfig.model_validate({**base, "tiling": {"consistency": True}})
    assert patch_inferer(desc(card), on, None).consistency.settings == card.consistency
    bare = card.model_copy(update={"consistency": None})
    assert patch_inferer(desc(bare), EnhanceConfig.model_validate(base), None).consistency is None
    stage = patch_inferer(desc(bare), on, None).consistency
    assert stage is not None and stage.settings.iterations == 3
