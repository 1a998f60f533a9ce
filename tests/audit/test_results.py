"""The typed results: the shipped reports round-trip through them unchanged, and the flat rows of
``domainsr audit`` keep their documented names."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from domainsr.audit import AuditHeadline, AuditOutcome, AuditSummary, MetricGain, MetricMeans, Region
from domainsr.audit.report import evidence_text
from domainsr.audit.results import MapBox, RegionEvidence, jsonable

SHIPPED = sorted((Path(__file__).parents[2] / "benchmarks" / "results" / "audits").glob("*.audit.json"))


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_reports_round_trip_through_the_typed_summary(path):
    data = json.loads(path.read_text(encoding="utf-8"))
    summary = AuditSummary.model_validate(data)
    assert jsonable(summary) == data  # every documented field kept, none added
    assert summary.metrics.reference is not None and summary.fractions.headline is summary.fractions.reference
    psnr = summary.metrics.reference.per_metric.psnr
    assert psnr.gain_mean == pytest.approx(data["metrics"]["reference"]["per_metric"]["psnr"]["gain_mean"])
    assert [name for name, _ in summary.metrics.lr_consistency.items()] == ["lr_psnr", "lr_rmse_sigma"]


def test_metric_gain_is_signed_so_that_positive_is_better():
    per_band = MetricGain.compare([0.2, 0.4], [0.3, 0.6], higher_is_better=False)
    assert per_band.gain == pytest.approx([0.1, 0.2]) and per_band.gain_mean == pytest.approx(0.15)
    spectral = MetricGain.compare(2.0, 3.0, higher_is_better=False)
    assert jsonable(spectral) == {"model": 2.0, "baseline": 3.0, "gain": 1.0, "higher_is_better": False}
    assert spectral.means() == MetricMeans(model_mean=2.0, baseline_mean=3.0, gain_mean=1.0)


def test_region_world_and_evidence_serialise_as_documented():
    box = {"id": 1, "kind": "inconsistency", "size": 4, "physical_size": 400.0, "physical_unit": "m²",
           "bbox_index": [[0, 1], [0, 1]], "centroid_index": [0.5, 0.5], "peak_risk": 2.0, "mean_risk": 1.0,
           "verdict": "review"}
    assert jsonable(Region(**box))["world"] == {}  # no geometry
    assert "score" not in jsonable(Region(**box)) and jsonable(Region(**box, score=0.7))["score"] == 0.7
    with pytest.raises(ValueError):
        Region(**{**box, "kind": "lr-inconsistency"})  # the contract's kinds only
    local = MapBox(space="LOCAL", min=[0.0, 0.0], max=[1.0, 1.0], centroid=[0.5, 0.5], lonlat_centroid=None)
    assert jsonable(Region(**box, world=local))["world"] == {"space": "LOCAL", "min": [0.0, 0.0], "max": [1.0, 1.0],
                                                             "centroid": [0.5, 0.5], "lonlat_centroid": None}
    ev = RegionEvidence(lr_inconsistent=1.0, uncertainty_sigma=12.5, unstable=0.75, agreement=True)
    assert jsonable(RegionEvidence(lr_inconsistent=0.5)) == {"lr_inconsistent": 0.5}
    assert evidence_text(ev) == ("100 % LR-inconsistent, spread 12.5 σ, 75 % unstable, "
                                 "LR-inconsistent and unstable agree")


def test_audit_outcome_rows_keep_their_flat_names():
    held_out = AuditOutcome(verdict="review", reasons=["r"], html="a.html", json_path="a.json", risk_map="a.tif",
                            model="m", scale=[2, 2], domain="optical", regions=1,
                            psnr=MetricMeans(model_mean=30.0, baseline_mean=29.0, gain_mean=1.0),
                            ssim=MetricMeans(model_mean=0.9, baseline_mean=0.8, gain_mean=0.1))
    row = held_out.to_row()
    assert row == {"verdict": "review", "reasons": ["r"], "html": "a.html", "json": "a.json", "risk_map": "a.tif",
                   "model": "m", "scale": [2, 2], "domain": "optical", "psnr": 30.0, "psnr_baseline": 29.0,
                   "psnr_gain_db": 1.0, "ssim": 0.9, "ssim_baseline": 0.8, "regions": 1}
    back = AuditOutcome.model_validate(row)
    assert back.psnr == held_out.psnr and back.json_path == "a.json" and back.ssim.baseline_mean == 0.8
    output = AuditOutcome(verdict="pass", html="b.html", json_path="b.json", risk_map="b.tif", sr="x_sr.tif",
                          reference="")
    assert set(output.to_row()) == {"reference", "sr", "verdict", "reasons", "html", "json", "risk_map", "regions"}
    assert AuditOutcome.model_validate({"verdict": "fail", "html": "/a.html", "regions": 0}).psnr is None


def test_headline_of_a_written_report(tmp_path):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"verdict": "fail", "reasons": ["why"], "future_field": 1}))
    assert AuditHeadline.read(good) == AuditHeadline(verdict="fail", reasons=["why"])
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "odd.json").write_text(json.dumps({"verdict": "maybe"}))
    for name in ("bad.json", "odd.json", "missing.json"):
        assert AuditHeadline.read(tmp_path / name) is None


def test_summary_states_calibration_and_conformal_bound():
    from domainsr.audit.calibration import NEUTRAL
    from domainsr.audit.results import ConformalReport

    data = json.loads((SHIPPED[0]).read_text(encoding="utf-8")) if SHIPPED else None
    if data is None:
        pytest.skip("no shipped report")
    bound = ConformalReport(alpha=0.1, q=1.8, coverage_holdout=0.91, median_bound=[12.5], bands=["band1"],
                            scale_rule="u = ...")
    summary = AuditSummary.model_validate({**data, "calibration": NEUTRAL.describe("mri"), "conformal": bound})
    out = json.loads(summary.to_json())
    assert out["conformal"] == {"alpha": 0.1, "q": 1.8, "coverage_holdout": 0.91, "median_bound": [12.5],
                                "bands": ["band1"], "scale_rule": "u = ..."}
    assert out["calibration"]["kinds"]["hallucination"] == {"review": 1.0, "fail": 2.0}
    assert AuditSummary.model_validate(out) == summary
