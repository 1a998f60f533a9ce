"""Smoke test of benchmarks/audit_planted.py: --quick on tiny real crops (2D and 3D), plus its parts
that decide what "found" means."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.benchmarks.loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _load():
    return load_benchmark("audit_planted", "audit_planted_benchmark")


def test_detection_rule_localises() -> None:
    ap = _load()
    plant = [[10, 19], [10, 19]]
    assert ap.matches([[12, 21], [10, 19]], plant)  # IoU 0.67
    assert ap.matches([[5, 24], [5, 24]], plant)  # covers it, 4x its size
    assert not ap.matches([[0, 99], [0, 99]], plant)  # covers it but localises nothing
    assert ap.covers([[0, 99], [0, 99]], plant) and not ap.covers([[15, 30], [15, 30]], plant)
    assert not ap.matches([[15, 30], [15, 30]], plant)  # a quarter of it
    found, iou, extra = ap.judge([[[0, 99], [0, 99]], [[11, 20], [10, 19]]], ap.Plant("x", np.zeros(1), plant, 1, [], 1))
    assert found and iou == pytest.approx(90 / 110) and extra == 1


@pytest.mark.parametrize("kind", ["bright blob", "dark blob", "fake edge", "texture", "duplicate", "x1.08 shift"])
@pytest.mark.parametrize("dims", [2, 3])
def test_plants_change_only_their_box(kind: str, dims: int) -> None:
    ap = _load()
    rng = np.random.default_rng(1)
    shape = (2,) + (96,) * 2 if dims == 2 else (1,) + (40,) * 3
    base = (100.0 + 10.0 * rng.standard_normal(shape)).astype(np.float32)
    sigma = np.full(shape[0], 2.0)
    p = ap.make_plant(kind, base, np.random.default_rng(3), (2,) * dims, sigma, 16 if dims == 2 else 4, None)
    changed = np.any(np.abs(p.delta) > 0, axis=0)
    outside = changed.copy()
    outside[tuple(slice(a, b + 1) for a, b in p.box)] = False
    assert changed.any() and not outside.any()
    assert all(16 <= a and b < 80 for a, b in p.box) if dims == 2 else True  # off the 16 px frame
    lo, hi = ap.SIZES[kind][dims - 2]
    assert lo <= p.size_lr <= hi
    if kind in ("bright blob", "dark blob"):
        peak = p.delta.max() if kind == "bright blob" else -p.delta.min()
        assert peak >= ap.NOISE_K * 2.0 - 1e-3  # at least 5 noise sigma
    if kind == "x1.08 shift":
        inside = p.delta[:, changed] / base[:, changed]
        assert inside.max() == pytest.approx(0.08, rel=1e-4)
    assert p.effect_sigma > 0


@pytest.mark.slow
def test_quick_run_tables_and_honest_cubic(tmp_path: Path) -> None:
    ap = _load()
    report = ap.main(["--quick", "--no-opensr", "--out", str(tmp_path)])
    domains = {"Sentinel-2 10 m", "Landsat 8 30 m", "MNI152 T1 1 mm"}
    rows = report["planted"]["rows"]
    assert {r["domain"] for r in rows} == domains
    assert {r["kind"] for r in rows} == set(ap.KINDS)
    for r in rows:
        for col in ("with reference", "reference-free"):
            assert r[col]["n"] == 1 and r[col]["found"] in (0, 1)
    assert len(report["planted"]["plants"]) == len(rows)
    total = report["planted"]["total"]
    assert total["reference-free"]["n"] == len(rows)
    summary = {r["kind"]: r for r in report["planted"]["summary"]}
    assert list(summary) == [*ap.KINDS, "all"]
    assert summary["all"]["2D with reference"]["n"] == 3 * 6 and summary["all"]["3D reference-free"]["n"] == 2 * 6
    for col in ("with reference", "reference-free"):
        assert report["planted"]["covered"][col]["n"] == total[col]["n"]
    # honest cubic (Keys a = -0.75, not the audit's a = -0.5 baseline): no fail and no hallucination region
    cubic = [r for r in report["honest"] if r["output"] == "cubic"]
    assert {r["domain"] for r in cubic} == domains and len(cubic) == 2 * len(domains)
    for r in cubic:
        assert r["fail"] == 0 and r["hallucination_regions"] == 0, r
    assert {r["model"] for r in report["shipped"]} == {"sentinel2-rgbn-x2", "mri-t1-x2"}
    assert report["opensr_test"] == {"available": False, "status": "not run (--no-opensr)", "honest": []}
    saved = json.loads((tmp_path / "audit_planted.json").read_text())
    assert saved["planted"]["total"] == json.loads(json.dumps(total))
    md = (tmp_path / "audit_planted.md").read_text()
    assert "| Sentinel-2 10 m | cubic | bright blob |" in md and "| MNI152 T1 1 mm | mri-t1-x2 |" in md
    assert "## Honest outputs" in md and "not run (--no-opensr)" in md
