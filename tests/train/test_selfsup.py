"""Per-scan self-supervised thick-slice SR: settings, slice profile, held-out split, budget, card."""
from __future__ import annotations

import json

import numpy as np
import pytest

from domainsr.degrade import build_degradation
from domainsr.degrade.mri import slice_profile
from domainsr.errors import ConfigError, InputError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.models.checkpoints import load_checkpoint, read_card
from domainsr.train.selfsup import (
    check_factor,
    estimate_profile,
    is_self_supervised,
    parse_settings,
    patch_shape,
    plane_data,
    train_self_supervised,
)


def phantom(shape=(40, 40, 40), seed=0) -> np.ndarray:
    """Random bright balls on a dark background: in-plane detail at every orientation."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.mgrid[tuple(slice(0, n) for n in shape)]).astype(np.float32)
    vol = np.zeros(shape, np.float32)
    for _ in range(14):
        c = rng.uniform(6, min(shape) - 6, 3)[:, None, None, None]
        vol += rng.uniform(40, 160) * (((grid - c) ** 2).sum(0) < rng.uniform(3, 9) ** 2)
    return vol


def thick_image(domain="mri", k=4, spacing=4.0, meta=None, source="/data/Jane_Doe_head.nii.gz",
                offset=0.0, gain=1.0) -> SpatialImage:
    vol = phantom()
    thick = slice_profile(vol[None], 2, k, "gaussian", float(k))
    aff = np.diag([1.0, 1.0, spacing, 1.0])
    return SpatialImage(thick * gain + offset, domain, MedicalGeometry(aff, thick.shape[1:]),
                        units="a.u." if domain == "mri" else "HU", provenance={"source": source}, meta=meta or {})


def test_names_settings_and_factors():
    assert is_self_supervised("self-supervised") and is_self_supervised("selfsup?budget=3")
    assert not is_self_supervised("cubic")
    s = parse_settings("self-supervised?budget=12&fwhm=3.5", {"budget": 99, "n_feats": 16})
    assert (s.budget, s.fwhm, s.n_feats) == (12.0, 3.5, 16)
    with pytest.raises(ConfigError, match="budgte"):
        parse_settings("self-supervised?budgte=3")
    with pytest.raises(ConfigError, match="budget"):
        parse_settings("self-supervised?budget=-1")
    assert check_factor(3) == 3 and check_factor([1, 1, 4]) == [1, 1, 4] and check_factor([1, 5, 1]) == [1, 5, 1]
    for bad in (None, 1, [1, 1, 1], [2, 2, 1], [1, 1, 0]):
        with pytest.raises(ConfigError, match="integer K >= 2"):
            check_factor(bad)


def test_slice_profile_from_the_header_or_contiguous():
    s = parse_settings()
    p = estimate_profile(thick_image(), 2, 4, s)
    assert (p.profile, p.fwhm, p.source.startswith("contiguous")) == ("gaussian", 4.0, True)
    # DICOM: 6 mm slices every 4 mm, x4 -> FWHM 6 output slices; CT -> box (thick_slices average)
    p = estimate_profile(thick_image("ct", meta={"dicom": {"slice_thickness": 6.0}}), 2, 4, s)
    assert (p.profile, p.fwhm) == ("box", 6.0) and "SliceThickness" in p.source
    spec = p.degradation("ct")
    assert spec["kind"] == "ct" and spec["thickness"] == 6.0
    deg = build_degradation(spec)
    assert deg(np.ones((1, 8, 16), np.float32), None).shape == (1, 8, 4)
    p = estimate_profile(thick_image(), 2, 3, parse_settings("selfsup?fwhm=2&profile=box"))
    assert (p.profile, p.fwhm) == ("box", 2.0) and p.degradation("mri")["kind"] == "mri"


def test_held_out_slices_and_patch_fit():
    img = thick_image(offset=5000.0, gain=300.0)  # scanner units far from any training range
    d = plane_data(img, 2, 0.1)
    assert d.stack.shape == (1, 10, 40, 40)
    assert d.val_idx.size >= 1 and not set(d.val_idx) & set(d.train_idx)
    assert sorted([*d.val_idx, *d.train_idx]) == list(range(10))
    norm = ((d.stack - d.offset[0]) / d.scale[0])[0]
    assert -0.01 < float(norm[d.valid].min()) and 0.9 < float(np.percentile(norm[d.fg], 99.5)) < 1.01
    (pa, pb), margin = patch_shape(40, 4, 4.0, 64, "x")
    assert pb % 4 == 0 and pb + 2 * margin * 4 <= 40 and pa + 2 * margin <= 40
    with pytest.raises(InputError, match="too small") as err:
        patch_shape(20, 4, 4.0, 64, "/in/scan.nii.gz")
    assert "scan.nii.gz" in str(err.value)


def test_training_keeps_the_budget_and_the_best_held_out_weights(tmp_path):
    img = thick_image(offset=5000.0, gain=300.0)
    res = train_self_supervised(img, 2, 4, parse_settings("selfsup?budget=4&n_blocks=2&n_feats=16"), tmp_path,
                                threads=1)
    assert res.seconds <= 4.0 + 0.5, res.seconds
    assert res.steps >= 1 and len(res.history) >= 2
    card = read_card(res.checkpoint)
    val = card.metrics["val"]
    assert card.application == "slicewise" and tuple(card.scale) == (1, 4) and card.spatial_dims == 2
    assert round(val.psnr, 3) == max(h["psnr"] for h in res.history)  # the best-so-far weights were kept
    assert card.training.steps == res.steps and card.training.seconds <= 4.5
    assert card.degradation["kind"] == "mri" and card.degradation["fwhm"] == 4.0
    text = json.dumps(card.model_dump(mode="json"))
    assert "Jane" not in text and "/data" not in text and card.name.startswith("selfsup-")
    model, _ = load_checkpoint(res.checkpoint)  # the weights verify against the card
    import torch

    x = torch.from_numpy(np.ascontiguousarray(img.data[:, :, 20:21, :].transpose(0, 2, 1, 3)))
    with torch.no_grad():
        y = model(x)
    assert y.shape == (1, 1, 40, 40) and 4000 < float(y.mean()) < 6e4  # in the scan's own units


def test_a_scan_with_too_few_slices_is_refused_by_name():
    img = thick_image()
    few = img.derive(img.data[:, :, :, :2], geometry=img.geometry.cropped((0, 0, 0), (40, 40, 2)), mask=None)
    with pytest.raises(InputError, match="at least 3") as err:
        plane_data(few, 2, 0.1)
    assert "Jane_Doe_head.nii.gz" in str(err.value)
