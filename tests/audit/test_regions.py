"""Region flags: connected components, sizes, verdicts and world coordinates on known grids."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from pydantic import ValidationError

from domainsr.audit import AuditThresholds
from domainsr.audit.calibration import Calibration, DomainCalibration, KindThresholds
from domainsr.audit.hallucination import (
    agreed_risk,
    box_iou,
    find_regions,
    make_region,
    rank_regions,
    upsample_nearest,
)
from domainsr.image import GeoGeometry, MedicalGeometry

# raw score -> risk: review at 1 (risk 1), fail at 4 (risk 2); inconsistency reviews at 0.5
CAL = Calibration(domains={"default": DomainCalibration(kinds={
    "hallucination": KindThresholds(review=1.0, fail=4.0), "omission": KindThresholds(review=1.0),
    "inconsistency": KindThresholds(review=0.5, fail=4.0), "uncertain": KindThresholds(review=2.0)})})


def test_medical_region_world_box_follows_an_oblique_lps_affine():
    # axes permuted and flipped, anisotropic voxels, arbitrary origin
    aff = np.array([[-0.8, 0.0, 0.0, 90.0], [0.0, 0.0, 1.2, -100.0], [0.0, 0.9, 0.0, -50.0], [0, 0, 0, 1]])
    geom = MedicalGeometry(aff, (40, 30, 20))
    flagged = np.zeros(geom.shape, bool)
    flagged[5:9, 10:14, 3:6] = True
    risk = flagged * 2.0
    risk[6, 11, 4] = 7.0
    (reg,) = find_regions(flagged, risk.astype(np.float32), kind="hallucination", min_size=8, domain="mri",
                          geometry=geom, calibration=CAL)
    assert reg.bbox_index == [[5, 8], [10, 13], [3, 5]]
    assert reg.size == 4 * 4 * 3
    assert reg.physical_size == pytest.approx(48 * 0.8 * 0.9 * 1.2)
    assert reg.score == pytest.approx(7.0)  # raw peak score
    assert reg.peak_risk == pytest.approx(1.0 + (7.0 - 1.0) / 3.0) and reg.verdict == "fail"
    mean_score = (47 * 2.0 + 7.0) / 48
    assert reg.mean_risk == pytest.approx(1.0 + (mean_score - 1.0) / 3.0, abs=1e-4)  # rounded to 4 decimals
    corners = np.array([[i, j, k] for i in (4.5, 8.5) for j in (9.5, 13.5) for k in (2.5, 5.5)])
    world = corners @ aff[:3, :3].T + aff[:3, 3]
    assert np.allclose(reg.world.min, world.min(0)) and np.allclose(reg.world.max, world.max(0))
    assert np.allclose(reg.world.centroid, aff[:3, :3] @ [6.5, 11.5, 4.0] + aff[:3, 3])
    assert reg.world.space == "RAS+ mm"


def test_map_region_has_crs_and_lonlat_coordinates():
    from pyproj import Transformer

    geom = GeoGeometry("EPSG:32618", Affine(10.0, 0.0, 441730.0, 0.0, -10.0, 4167460.0), (100, 120))
    flagged = np.zeros(geom.shape, bool)
    flagged[20:25, 30:40] = True
    (reg,) = find_regions(flagged, flagged.astype(np.float32), kind="inconsistency", min_size=4, domain="optical",
                          geometry=geom, calibration=CAL)
    assert reg.verdict == "review" and reg.peak_risk == pytest.approx(1.0 + 0.5 / 3.5, abs=1e-4)
    assert reg.world.min == [441730.0 + 300.0, 4167460.0 - 250.0]
    assert reg.world.max == [441730.0 + 400.0, 4167460.0 - 200.0]
    assert reg.physical_size == pytest.approx(50 * 100.0) and reg.physical_unit == "m²"
    lon, lat = Transformer.from_crs("EPSG:32618", "EPSG:4326", always_xy=True).transform(
        441730.0 + 350.0, 4167460.0 - 225.0)
    assert reg.world.lonlat_centroid == pytest.approx([lon, lat], abs=1e-6)


def test_small_regions_are_dropped_and_regions_are_ordered_worst_first():
    flagged = np.zeros((50, 50), bool)
    risk = np.zeros((50, 50), np.float32)
    flagged[2:4, 2:4] = True  # 4 px: too small
    flagged[10:20, 10:20] = True
    risk[10:20, 10:20] = 0.5
    flagged[30:36, 30:36] = True
    risk[30:36, 30:36] = 9.0
    flagged[40, 0:10] = flagged[41, 10:20] = True  # diagonal contact joins one region
    risk[40:42] = 2.0
    regs = find_regions(flagged, risk, kind="hallucination", min_size=9, domain="optical", calibration=CAL)
    assert [r.verdict for r in regs] == ["fail", "review", "pass"]
    assert [r.size for r in regs] == [36, 20, 100]
    assert [r.id for r in regs] == [1, 2, 3]
    assert box_iou(regs[0].bbox_index, [[30, 35], [30, 35]]) == 1.0


def _region(kind, score, size=10, **evidence):
    return make_region(kind=kind, size=size, bbox=[[0, 3], [0, 3]], centroid=[1.5, 1.5], peak_score=score,
                       mean_score=score / 2, evidence=evidence, geometry=None, domain="optical", calibration=CAL)


def test_verdict_is_monotone_in_peak_risk_across_kinds():
    rng = np.random.default_rng(0)
    kinds = ["hallucination", "omission", "inconsistency", "uncertain"]
    regs = [_region(kinds[i % 4], float(s), size=int(rng.integers(4, 40)),
                    **({"unstable": 0.8, "uncertainty_peak_sigma": float(rng.uniform(0, 6))} if i % 3 == 0 else {}))
            for i, s in enumerate(rng.uniform(0, 12, 200))]
    ranked = rank_regions(regs)
    risks = [r.peak_risk for r in ranked]
    assert risks == sorted(risks, reverse=True) and [r.id for r in ranked] == list(range(1, 201))
    order = {"pass": 0, "review": 1, "fail": 2}
    levels = [order[r.verdict] for r in ranked]
    assert levels == sorted(levels, reverse=True)  # no lower risk ever has a worse verdict
    assert all((r.verdict == "fail") == (r.peak_risk >= 2.0) for r in ranked)
    assert all(r.verdict != "fail" for r in ranked if r.kind in ("omission", "uncertain"))


def test_agreement_raises_the_risk_by_the_stated_rule():
    alone = _region("inconsistency", 0.5)  # risk 1.0: review
    agreed = _region("inconsistency", 0.5, unstable=0.75, uncertainty_peak_sigma=2.0)  # uncertain risk 1.0
    mostly_stable = _region("inconsistency", 0.5, unstable=0.25, uncertainty_peak_sigma=2.0)
    assert alone.peak_risk == pytest.approx(1.0) and alone.verdict == "review"
    assert agreed.peak_risk == pytest.approx(agreed_risk(1.0, 1.0), abs=1e-4) == pytest.approx(np.sqrt(2), abs=1e-4)
    assert agreed.evidence.agreement is True and agreed.verdict == "review"
    assert mostly_stable.peak_risk == pytest.approx(1.0) and mostly_stable.evidence.agreement is None
    strong = _region("inconsistency", 2.25, unstable=1.0, uncertainty_peak_sigma=6.0)  # 1.5 and ~1.6
    assert strong.verdict == "fail" and strong.peak_risk >= 2.0
    assert agreed_risk(1.2, 0.0) == pytest.approx(1.2) and agreed_risk(1.0, 1.5) >= 1.5


def test_uncertain_and_omission_alone_are_at_most_a_review_also_with_user_thresholds():
    for th in (AuditThresholds(), AuditThresholds(review_risk=0.5, fail_risk=1.2)):
        for kind in ("uncertain", "omission"):
            r = make_region(kind=kind, size=9, bbox=[[0, 2], [0, 2]], centroid=[1, 1], peak_score=1e6, mean_score=1.0,
                            evidence={}, geometry=None, domain="ct", thresholds=th, calibration=CAL)
            assert r.verdict == "review" and r.peak_risk < th.fail_risk
    low = make_region(kind="hallucination", size=9, bbox=[[0, 2], [0, 2]], centroid=[1, 1], peak_score=0.6,
                      mean_score=0.3, evidence={}, geometry=None, domain="ct",
                      thresholds=AuditThresholds(review_risk=0.5, fail_risk=1.2), calibration=CAL)
    assert low.verdict == "review"  # a user's lower review threshold is honoured


def test_box_iou_and_upsampling():
    assert box_iou([[0, 9], [0, 9]], [[5, 14], [0, 9]]) == pytest.approx(50 / 150)
    assert box_iou([[0, 1], [0, 1]], [[5, 6], [5, 6]]) == 0.0
    up = upsample_nearest(np.array([[1, 2], [3, 4]]), (2, 3))
    assert up.shape == (4, 6) and up[3, 5] == 4 and up[0, 2] == 1


def test_thresholds_config_is_strict():
    with pytest.raises(ValidationError):
        AuditThresholds(min_region_sise=4)  # misspelt key
    with pytest.raises(ValidationError):
        AuditThresholds(review_risk=5.0, fail_risk=1.0)
    with pytest.raises(ValidationError):
        AuditThresholds(noise_method="fixed")
    assert AuditThresholds(noise_method="fixed", noise_sigma=[3.0]).noise_sigma == [3.0]
    assert (AuditThresholds().review_risk, AuditThresholds().fail_risk) == (1.0, 2.0)
    with pytest.raises(TypeError):
        find_regions(np.zeros((4, 4), bool), np.zeros((4, 4)), kind="hallucination", min_size=1, domain="ct",
                     review=1.0)  # the old signature: thresholds come from the calibration now
