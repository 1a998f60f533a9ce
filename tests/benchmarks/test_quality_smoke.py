"""Smoke test of benchmarks/quality.py: --quick on one shipped model, real held-out data."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load_quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", ROOT / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_quality_quick_on_mri_x2(tmp_path: Path) -> None:
    q = _load_quality()
    if q.shipped(["mri-t1-x2"])["mri-t1-x2"] is None:
        pytest.skip("checkpoint mri-t1-x2 is not shipped in this checkout")
    report = q.main(["--quick", "--models", "mri-t1-x2", "no-such-model", "--no-robustness", "--out", str(tmp_path)])
    r = report["models"]["mri-t1-x2"]
    m = r["metrics"]
    assert set(m) == {"model", *q.BASELINES}
    for row in m.values():
        assert 10.0 < row["psnr"] < 60.0 and 0.0 < row["ssim"] <= 1.0 and row["grad_energy"] > 0.0
    # interpolation ranks as expected and the trained model beats nearest neighbour clearly
    assert m["nearest"]["psnr"] < m["linear"]["psnr"] < m["cubic"]["psnr"]
    assert m["model"]["psnr"] > m["nearest"]["psnr"] + 1.0
    assert r["gain_vs_linear"] == pytest.approx(m["model"]["psnr"] - m["linear"]["psnr"])
    assert m["model"]["lr_mpx_per_s"] > 0.0
    assert report["models"]["no-such-model"] == {"status": "not shipped"}
    assert report["targets"]["mri-t1-x2"]["target"].startswith(">= +1.0 dB vs linear")
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["models"]["mri-t1-x2"]["metrics"]["model"]["psnr"] == pytest.approx(m["model"]["psnr"])
    md = (tmp_path / "quality.md").read_text()
    assert "| mri-t1-x2 |" in md and "not shipped" in md
