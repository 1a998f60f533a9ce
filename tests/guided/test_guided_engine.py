"""Guided patch inference: tiled == whole image, masks, geometry, refusals, nesting of two grids."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from guided_testdata import GUIDE, TARGET, card_for, scene, tiny_net

from domainsr.engine.guided import (
    GuidedSource,
    enhance_band_set,
    enhance_guided,
    guided_inferer,
    nest_grids,
    run_guided,
)
from domainsr.errors import ConfigError, GeometryError, ModelCardMismatch
from domainsr.image import MultiResolutionImage
from domainsr.models.checkpoints import save_checkpoint
from domainsr.models.guided import GuidedCardModel, pack


def _whole(net, lr, guide):
    with torch.no_grad():
        return net(torch.from_numpy(lr)[None], torch.from_numpy(guide)[None])[0].numpy()


def test_tiled_equals_whole_image():
    rng = np.random.default_rng(0)
    net = tiny_net(jitter=0.05)
    lr = rng.normal(size=(3, 70, 90)).astype(np.float32)
    guide = rng.normal(size=(2, 140, 180)).astype(np.float32)
    inf = guided_inferer(net, tile=32, batch_size=3, threads=1)
    out = run_guided(inf, lr, guide)
    assert out.shape == (3, 140, 180) and inf.stats.computed >= 9  # really tiled
    assert inf.stats.plan["halo"] == list(net.receptive_radius)
    np.testing.assert_allclose(out, _whole(net, lr, guide), atol=1e-5, rtol=0)


def test_source_packs_the_matching_guide_window():
    rng = np.random.default_rng(1)
    lr, guide = rng.random((3, 10, 12), dtype=np.float32), rng.random((2, 20, 24), dtype=np.float32)
    src = GuidedSource(lr, guide, (2, 2))
    x, invalid = src.read((slice(2, 7), slice(3, 11)))
    ref = pack(torch.from_numpy(lr[:, 2:7, 3:11])[None], torch.from_numpy(guide[:, 4:14, 6:22])[None],
               (2, 2))[0]
    assert invalid is None and src.channels == x.shape[0] == 11
    np.testing.assert_array_equal(x, ref.numpy())
    with pytest.raises(ModelCardMismatch, match="does not cover"):
        GuidedSource(lr, guide[:, :-2], (2, 2))


def test_enhance_guided_keeps_grid_bands_and_masks():
    s = scene(rows=40, cols=36)
    lr, g = s.groups["20m"], s.groups["10m"]
    net = tiny_net(jitter=0.02)
    model = GuidedCardModel(net, card_for(net))
    g_mask = np.ones(g.spatial_shape, bool)
    g_mask[21, 31] = False  # inside LR pixel (10, 15)
    lr_mask = np.ones(lr.spatial_shape, bool)
    lr_mask[30, 5] = False
    lr, g = lr.derive(lr.data, mask=lr_mask), g.derive(g.data, mask=g_mask)
    out = enhance_guided(lr, g, guided_inferer(model, tile=24, threads=1))
    assert out.band_names == TARGET and out.geometry.almost_equal(lr.geometry.scaled((2, 2)))
    assert out.data.shape == (3, 80, 72) and out.nodata == 0
    bad = ~out.mask
    assert bad.sum() == 8 and bad[20:22, 30:32].all() and bad[60:62, 10:12].all()
    assert np.all(out.data[:, bad] == 0)
    with torch.no_grad():
        ref = model(torch.from_numpy(lr.data)[None], torch.from_numpy(g.data)[None])[0].numpy()
    far = out.mask.copy()
    far[10:32, 20:42] = far[50:72, 0:22] = False  # outside the receptive field of the filled pixels
    np.testing.assert_allclose(out.data[:, far], ref[:, far], atol=1e-3, rtol=0)
    assert out.provenance["history"][-1]["model"] == "tiny-guided"
    with pytest.raises(ModelCardMismatch, match="differ from the model's"):
        enhance_guided(lr.derive(lr.data, band_names=("T1", "T2", "X")), g, guided_inferer(model))


def test_blending_and_reflect_borders_are_refused():
    with pytest.raises(ConfigError, match="halo mode"):
        guided_inferer(tiny_net(), overlap=4)
    with pytest.raises(ConfigError, match="halo mode"):
        guided_inferer(tiny_net(), border="reflect")


def test_nesting_crops_whole_pixel_offsets_and_resamples_fractional_ones():
    s = scene(rows=30, cols=28)
    lr, g = s.groups["20m"], s.groups["10m"]
    # guide starting one 10 m pixel east and two south of the LR grid's corner: crop both
    g_off = g.derive(g.data[:, 2:, 1:], geometry=g.geometry.cropped((2, 1), (58, 55)))
    lr2, g2 = nest_grids(lr, g_off, (2, 2))
    assert g2.geometry.almost_equal(lr2.geometry.scaled((2, 2)))
    assert lr2.spatial_shape == (29, 27)
    np.testing.assert_array_equal(lr2.data, lr.data[:, 1:, 1:])
    np.testing.assert_array_equal(g2.data, g.data[:, 2:, 2:])
    # half a guide pixel off (Landsat 8 pan): refused unless resampled; a linear ramp survives the move
    yy, xx = np.mgrid[0:60, 0:56].astype(np.float32)
    ramp = np.stack([1000 + 3 * yy + 2 * xx] * 2)
    half = g.derive(ramp, geometry=g.geometry.cropped((0.5, 0.5), (60, 56)))
    with pytest.raises(GeometryError, match="not whole"):
        nest_grids(lr, half, (2, 2))
    lr3, g3 = nest_grids(lr, half, (2, 2), resample=True)
    assert g3.geometry.almost_equal(lr3.geometry.scaled((2, 2)))
    rows, cols = g3.spatial_shape
    # the LR grid is cropped by one pixel (the ramp's grid starts half a guide pixel in)
    want = 1000 + 3 * (np.arange(rows)[:, None] + 1.5) + 2 * (np.arange(cols)[None] + 1.5)
    inner = (slice(None), slice(2, -2), slice(2, -2))
    np.testing.assert_allclose(g3.data[inner], np.broadcast_to(want, g3.data.shape)[inner], atol=1e-2)
    other = g.derive(np.ones((2, 120, 112), np.float32), geometry=g.geometry.scaled((2, 2)))  # 5 m pixels
    with pytest.raises(GeometryError, match="divided by"):
        nest_grids(lr, other, (2, 2))


def test_enhance_band_set_from_a_checkpoint(tmp_path):
    net = tiny_net(jitter=0.02)
    save_checkpoint(net, card_for(net), tmp_path / "tiny-guided")
    s = scene(rows=24, cols=20)
    out = enhance_band_set(s, str(tmp_path / "tiny-guided"), threads=1)
    assert out.band_names == TARGET and out.geometry.almost_equal(s.groups["10m"].geometry)
    with pytest.raises(ModelCardMismatch, match=r"needs bands \['G2'\]"):
        only = MultiResolutionImage({"20m": s.groups["20m"], "10m": s.select(["G1"])})
        enhance_band_set(only, str(tmp_path / "tiny-guided"))
    assert set(GUIDE) <= set(s.band_names)
