"""Smoke test of benchmarks/quality.py: --quick on one shipped model, real held-out data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.benchmarks.loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


def _load_quality():
    return load_benchmark("quality", "quality_benchmark")


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
    e = m["model"]["extremes"]
    assert 0.0 <= e["invented"] <= e["output_leaves"] <= 1.0 and 0.0 <= e["truth_leaves"] <= 1.0
    assert report["models"]["no-such-model"] == {"status": "not shipped"}
    assert report["targets"]["mri-t1-x2"]["target"].startswith(">= +1.0 dB vs linear")
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert saved["models"]["mri-t1-x2"]["metrics"]["model"]["psnr"] == pytest.approx(m["model"]["psnr"])
    md = (tmp_path / "quality.md").read_text()
    assert "| mri-t1-x2 |" in md and "not shipped" in md and "invented extremes" in md
    assert "## Issue 16 floors" in md and "| mri-t1-x2 | " in md.split("## Issue 16 floors")[1]
    from domainsr.data import available_samples

    if "pyradiomics_brain2" in available_samples():  # the kept-out subject: a generalisation row
        g = report["generalisation"]["mri-t1-x2"]
        assert g["source"] == "pyradiomics_brain2" and g["metrics"]["model"]["psnr"] > 10.0
        assert g["gain_vs_best"] == pytest.approx(g["metrics"]["model"]["psnr"]
                                                  - g["metrics"][g["best_baseline"]]["psnr"])
        assert "## Generalisation" in md and "pyradiomics_brain2" in md
    if "colin27_t1" in available_samples():  # the other isotropic T1 subject, never trained on
        (c,) = [g for g in report["generalisation_more"] if g["model"] == "mri-t1-x2"]
        assert c["source"] == "colin27_t1" and c["metrics"]["model"]["psnr"] > 10.0
        assert "| mri-t1-x2 | colin27_t1 |" in md


def test_a_kept_out_source_the_card_was_trained_on_is_refused() -> None:
    q = _load_quality()
    from domainsr.errors import ConfigError
    from domainsr.models.checkpoints import read_card

    path = q.shipped(["mri-t1-x2"])["mri-t1-x2"]
    if path is None:
        pytest.skip("checkpoint mri-t1-x2 is not shipped in this checkout")
    card = read_card(path)
    assert q.kept_out(card)[0] == "pyradiomics_brain2"
    split = {**card.training_data.split, "holdout": [{"source": "mni152"}]}
    bad = card.model_copy(update={"training_data": card.training_data.model_copy(update={"split": split})})
    with pytest.raises(ConfigError, match="trained on mni152"):
        q.kept_out(bad)
    # a further never-seen source (ALSO_KEPT_OUT) is refused the same way once trained on
    colin = card.training_data.files[0].model_copy(update={"path": "/cache/mricron/colin27_t1.nii.gz"})
    trained = card.model_copy(update={"training_data": card.training_data.model_copy(
        update={"files": [*card.training_data.files, colin]})})
    assert ("colin27_t1", None) in q.ALSO_KEPT_OUT["mri-t1-x2"]
    with pytest.raises(ConfigError, match="trained on colin27_t1"):
        q.refuse_trained(trained, "colin27_t1")


@pytest.mark.slow
def test_quality_quick_with_data_consistency(tmp_path: Path) -> None:
    q = _load_quality()
    if q.shipped(["mri-t1-x2"])["mri-t1-x2"] is None:
        pytest.skip("checkpoint mri-t1-x2 is not shipped in this checkout")
    report = q.main(["--quick", "--models", "mri-t1-x2", "--no-robustness", "--no-generalisation",
                     "--out", str(tmp_path), "--consistency", "iterations=1,clamp_margin=0.25", "--consistency", "off"])
    r = report["models"]["mri-t1-x2"]
    dc, off = r["consistency"]
    assert off["settings"] is None and off["psnr"] == pytest.approx(r["metrics"]["model"]["psnr"])  # card has none
    assert dc["extremes"]["output_leaves"] == 0.0  # the clamp keeps every pixel within 25 % of its range
    assert dc["gain_vs_best"] == pytest.approx(dc["psnr"] - r["metrics"][r["best_baseline"]]["psnr"])
    assert report["consistency"][0]["clamp_margin"] == dc["settings"]["clamp_margin"] == 0.25
    md = (tmp_path / "quality.md").read_text()
    assert "## Data consistency" in md and "| mri-t1-x2 | held-out (card's degradation) | off |" in md
