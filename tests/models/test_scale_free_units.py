"""MR intensities are arbitrary units: a per-image normalised a.u. card takes any scale, and its
output scales with the input; physical units (HU, DN) keep their absolute range checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from domainsr.data import cache_root
from domainsr.errors import ModelCardMismatch
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.models import build_model
from domainsr.models.checkpoints import (
    CardModel,
    ModelCard,
    check_input,
    foreground_values,
    otsu_threshold,
    percentile_normalization,
    scale_free,
)


def _mri_card(**kw) -> ModelCard:
    base = {"name": "tiny_mri", "architecture": {"name": "rescnn", "kwargs": {"n_blocks": 1, "n_feats": 4}},
            "domain": "mri", "spatial_dims": 3, "scale": (2, 2, 2), "in_channels": 1, "out_channels": 1,
            "units": "a.u.", "input_range": (0.0, 226.0), "normalization": {"kind": "percentile"},
            "receptive_radius": (3, 3, 3)}
    base.update(kw)
    return ModelCard.model_validate(base)


def _volume(data: np.ndarray, domain: str = "mri", units: str = "") -> SpatialImage:
    img = SpatialImage(data.astype(np.float32), domain, MedicalGeometry(np.eye(4), data.shape[1:]), units=units)
    img.provenance["source"] = "/data/scanner_t1.nii.gz"
    return img


def _head(rng: np.random.Generator, n: int = 12) -> np.ndarray:
    """A bright ball (tissue, 80-220) in a dark, noisy background (0-5): ~75 % background."""
    z, y, x = np.mgrid[:n, :n, :n] - (n - 1) / 2
    ball = np.sqrt(x * x + y * y + z * z) < n / 3
    vol = rng.uniform(0, 5, (n, n, n))
    vol[ball] = rng.uniform(80, 220, int(ball.sum()))
    return vol[None]


def test_scanner_units_are_accepted_for_a_scale_free_card():
    card = _mri_card()
    assert scale_free(card)
    vol = _head(np.random.default_rng(0)) * 220.0  # 0 - 48,400: a scanner's units
    check_input(card, _volume(vol))
    check_input(card, _volume(vol, units="arbitrary units"))
    with pytest.raises(ModelCardMismatch, match="Hounsfield"):  # CT mislabelled as MR is still refused
        check_input(card, _volume(vol - 1024.0 * 220))


def test_physical_units_keep_their_range_check():
    ct = _mri_card(domain="ct", units="HU", input_range=(-1024.0, 3071.0),
                   normalization={"kind": "fixed", "offset": [0.0], "scale": [1000.0]})
    assert not scale_free(ct)
    with pytest.raises(ModelCardMismatch, match="far outside") as err:
        check_input(ct, _volume(np.full((1, 8, 8, 8), 40000.0), domain="ct"))
    assert "/data/scanner_t1.nii.gz" in str(err.value)
    # a fixed normalisation in a.u. has an absolute scale: also checked
    fixed = _mri_card(normalization={"kind": "fixed", "offset": [0.0], "scale": [200.0]})
    assert not scale_free(fixed)
    with pytest.raises(ModelCardMismatch, match="far outside"):
        check_input(fixed, _volume(_head(np.random.default_rng(1)) * 220.0))


def test_otsu_splits_two_modes_and_scales():
    rng = np.random.default_rng(2)
    v = np.concatenate([rng.normal(10, 2, 3000), rng.normal(100, 5, 1000)])
    t = otsu_threshold(v)
    assert 20 < t < 85
    assert otsu_threshold(v * 220.0) == pytest.approx(220.0 * t, rel=1e-6)
    fg = foreground_values(v)
    assert fg.size == 1000 and fg.min() > 80
    assert foreground_values(np.full(10, 3.0)).size == 10  # one value: all of it


def test_foreground_percentiles_ignore_the_share_of_background():
    rng = np.random.default_rng(3)
    tissue = rng.uniform(100, 200, 2000)
    small = np.concatenate([tissue, np.zeros(2000)])
    large = np.concatenate([tissue, np.zeros(60000)])
    img = [_volume(a.reshape(1, 1, 1, -1)) for a in (small, large)]
    fg = [percentile_normalization(i, 0.5, 99.5, "foreground") for i in img]
    assert fg[0].offset[0] == fg[1].offset[0] == pytest.approx(np.percentile(tissue, 0.5))
    assert fg[0].scale[0] == pytest.approx(fg[1].scale[0])
    valid = [percentile_normalization(i, 0.5, 99.5) for i in img]
    assert valid[1].scale[0] < 0.95 * valid[0].scale[0]  # the whole volume's percentiles move with it


@pytest.mark.parametrize("voxels", ["valid", "foreground"])
def test_output_scales_with_the_input(voxels):
    card = _mri_card(normalization={"kind": "percentile", "voxels": voxels})
    torch.manual_seed(0)
    net = build_model("rescnn", spatial_dims=3, in_channels=1, scale=(2, 2, 2), zero_init_tail=False,
                      n_blocks=1, n_feats=4).eval()
    model = CardModel(net, card).eval()
    vol = _head(np.random.default_rng(4))
    outs = []
    for k in (1.0, 220.0):
        x = vol * k
        with torch.no_grad():
            model.prepare(_volume(x))
            outs.append(model(torch.from_numpy(x.astype(np.float32))[None])[0].numpy())
    assert np.abs(outs[0]).max() > 1.0
    np.testing.assert_allclose(outs[1], 220.0 * outs[0], rtol=1e-4, atol=1e-3 * 220.0)


def test_tiles_share_the_whole_volume_statistics():
    from domainsr.engine import PatchInferer

    card = _mri_card(receptive_radius=(3, 3, 3))
    torch.manual_seed(0)
    net = build_model("rescnn", spatial_dims=3, in_channels=1, scale=(2, 2, 2), zero_init_tail=False,
                      n_blocks=1, n_feats=4).eval()
    model = CardModel(net, card).eval()
    vol = np.concatenate([_head(np.random.default_rng(5), 12), 3.0 * _head(np.random.default_rng(6), 12)], axis=1)
    with torch.no_grad():
        model.prepare(_volume(vol))
    tiled = PatchInferer(model, device="cpu", threads=1, tile=(10, 12, 12))
    out = tiled.run(vol.astype(np.float32))
    assert tiled.stats.computed > 1  # the dim and the bright half are tiles of their own
    whole = PatchInferer(model, device="cpu", threads=1, tile=64).run(vol.astype(np.float32))
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-3)


MNI = cache_root() / "data" / "mni152" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.mark.skipif(not MNI.exists(), reason="MNI152 not in the data cache (domainsr.data.fetch_sample_data)")
def test_shipped_mri_model_is_scale_equivariant_on_mni152():
    from domainsr.engine import PatchInferer
    from domainsr.io import read_image
    from domainsr.models.checkpoints import load_checkpoint

    model, _ = load_checkpoint("mri-t1-x2")
    img = read_image(MNI)
    c = [n // 2 for n in img.spatial_shape]
    crop = np.ascontiguousarray(img.data[:, c[0] - 12:c[0] + 12, c[1] - 12:c[1] + 12, c[2] - 12:c[2] + 12],
                                np.float32)
    outs = []
    for k in (1.0, 49724.0 / 226.0):  # the scanner volume of issue 16 spans 0-49,724
        x = crop * np.float32(k)
        with torch.inference_mode():
            model.prepare(img.derive(x, geometry=img.geometry.cropped([a - 12 for a in c], [24] * 3), mask=None))
        outs.append(PatchInferer(model, device="cpu", threads=1).run(x))
    k = 49724.0 / 226.0
    assert outs[0].max() > 50
    np.testing.assert_allclose(outs[1], k * outs[0], rtol=1e-4, atol=1e-3 * k)


BRAIN1 = cache_root() / "data" / "pyradiomics" / "brain1_image.nii.gz"


@pytest.mark.skipif(not BRAIN1.exists(), reason="pyradiomics brain1 not in the data cache")
def test_a_scanner_volume_is_accepted_by_the_shipped_mri_cards():
    from domainsr.io import read_image
    from domainsr.models.checkpoints import read_card, resolve_checkpoint

    img = read_image(BRAIN1)  # another scanner's T1, values 0 - 3,057 (the cards saw 0 - 226)
    assert float(np.percentile(img.data, 99.9)) > 3 * 226
    for name in ("mri-t1-x2", "mri-slices-x4"):
        norm = check_input(read_card(resolve_checkpoint(name)), img)
        assert norm.scale[0] > 500
