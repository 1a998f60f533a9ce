"""``domainsr enhance SCAN --model self-supervised``: output, geometry, card and audit; usage errors."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from domainsr.cli import EXIT_OK, EXIT_PARTIAL, EXIT_USAGE, app
from domainsr.degrade.mri import slice_profile
from domainsr.io.nifti import read_nifti
from domainsr.models.checkpoints import load_checkpoint, read_card

runner = CliRunner()


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def _phantom_scan(path, shape=(40, 40, 40), k=4, axis=1):
    """Bright balls in scanner-like units, thick slices (x ``k``) along ``axis``; an oblique affine."""
    rng = np.random.default_rng(1)
    grid = np.stack(np.mgrid[tuple(slice(0, n) for n in shape)]).astype(np.float32)
    vol = np.zeros(shape, np.float32)
    for _ in range(14):
        c = rng.uniform(6, min(shape) - 6, 3)[:, None, None, None]
        vol += rng.uniform(40, 160) * (((grid - c) ** 2).sum(0) < rng.uniform(3, 9) ** 2)
    thick = slice_profile(vol[None], axis, k, "gaussian", float(k))[0] * 250.0 + 800.0
    aff = np.diag([0.9, 0.9, 0.9, 1.0])
    aff[:3, axis] *= k
    c, s = np.cos(0.3), np.sin(0.3)
    aff[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ aff[:3, :3]
    aff[:3, 3] = (-12.0, 30.0, 4.5)
    nib.save(nib.Nifti1Image(thick.astype(np.float32), aff), str(path))
    return path


def test_enhance_trains_on_the_scan_and_writes_output_card_and_audit(prefect_home, tmp_path):
    (tmp_path / "in").mkdir()
    scan = _phantom_scan(tmp_path / "in" / "scan.nii.gz")
    out = tmp_path / "out"
    res = runner.invoke(app, ["enhance", str(scan), "--model", "self-supervised", "--scale", "1,4,1",
                              "--budget", "3", "--out", str(out), "--json"])
    assert res.exit_code == EXIT_OK, res.output
    row = _json(res.stdout)["items"][0]
    assert row["status"] == "enhanced" and row["verdict"] in ("pass", "review"), row
    lr, sr = read_nifti(scan), read_nifti(out / "scan_sr.nii.gz")
    assert sr.spatial_shape == (40, 40, 40)
    assert sr.geometry.almost_equal(lr.geometry.scaled((1, 4, 1)))
    assert np.allclose(sr.geometry.spacing, (0.9, 0.9, 0.9), atol=1e-5)  # 3.6 mm / 4 along the thick axis
    # the scan's own units, mapped back: the background (800) stays within 2 % of the scan's range
    # (after a 3-second training its level moves by ~0.1 % of the 1e5 range, either way)
    span = float(np.ptp(np.asarray(lr.data)))
    assert abs(float(np.median(sr.data)) - float(np.median(lr.data))) < 0.02 * span, (np.median(sr.data), span)

    card = read_card(out / "scan_sr.card.json")
    assert card.application == "slicewise" and tuple(card.scale) == (1, 4) and "val" in card.metrics
    assert card.training.seconds <= 3.5 and card.training.extra["budget_s"] == 3.0
    assert "scan.nii" not in (out / "scan_sr.card.json").read_text()  # pseudonymous: no file names
    load_checkpoint(out / "scan_sr.card.json")  # weights beside it, verified by their sha256

    report = json.loads((out / "scan_sr.audit.json").read_text())
    deg = report["provenance"]["degradation"]
    assert deg["spec"] == f"card:{card.name}", deg
    assert deg["operator"]["kind"] == "mri" and deg["operator"]["scale"] == [1, 4, 1]
    prov = json.loads((out / "scan_sr.nii.gz.provenance.json").read_text())["provenance"]["model"]
    assert prov["kind"] == "self-supervised" and prov["self_supervised"]["card"] == card.name

    # the card is a checkpoint: the stand-alone audit can use its degradation
    res = runner.invoke(app, ["audit", "--sr", str(out / "scan_sr.nii.gz"), "--lr", str(scan),
                              "--degradation", f"card:{out / 'scan_sr.card.json'}", "--out", str(tmp_path / "a"),
                              "--json"])
    assert res.exit_code in (EXIT_OK, 4), res.output
    again = json.loads((tmp_path / "a" / "report.json").read_text())["provenance"]["degradation"]
    assert again["operator"]["kind"] == "mri" and again["operator"]["scale"] == [1, 4, 1]
    # --degradation auto finds the per-scan card beside the output (and names it by file name only)
    from domainsr.app.degradation import provenance_model

    assert provenance_model(out / "scan_sr.nii.gz") is not None
    assert Path(provenance_model(out / "scan_sr.nii.gz")[0]).name == "scan_sr.card.json"
    res = runner.invoke(app, ["audit", "--sr", str(out / "scan_sr.nii.gz"), "--lr", str(scan),
                              "--out", str(tmp_path / "b"), "--json"])
    assert res.exit_code in (EXIT_OK, 4), res.output
    auto = json.loads((tmp_path / "b" / "report.json").read_text())["provenance"]["degradation"]
    assert auto["operator"]["scale"] == [1, 4, 1] and str(tmp_path) not in json.dumps(auto), auto


@pytest.mark.parametrize("args, message", [
    (["--scale", "2,2,1"], "integer K >= 2"),
    (["--scale", "1"], "integer K >= 2"),
    (["--scale", "1,1,2.5"], "not an integer"),
    (["--scale", "1,1,4", "--budget", "0"], "budget"),
    (["--scale", "1,1,4", "--budget", "5"], None),
])
def test_bad_scale_or_budget_is_a_usage_error(tmp_path, args, message):
    scan = _phantom_scan(tmp_path / "s.nii.gz")
    model = ["--model", "self-supervised"] if message else ["--model", "cubic"]
    res = runner.invoke(app, ["enhance", str(scan), *model, *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == EXIT_USAGE, res.output
    assert (message or "--budget applies to --model self-supervised") in res.output


def test_a_2d_input_fails_naming_the_file(prefect_home, tmp_path):
    flat = tmp_path / "flat_slice.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((32, 32, 1), dtype=np.float32) * 100,
                             np.diag([1.0, 1.0, 5.0, 1.0])), str(flat))
    res = runner.invoke(app, ["enhance", str(flat), "--model", "self-supervised", "--scale", "1,1,4",
                              "--budget", "2", "--out", str(tmp_path / "o"), "--json"])
    assert res.exit_code == EXIT_PARTIAL, res.output
    row = _json(res.stdout)["items"][0]
    assert row["status"] == "failed" and "flat_slice" in row["message"] and "2D" in row["message"], row


def test_thick_axis_from_the_scale_or_the_spacing():
    from domainsr.app.models import self_supervised_axis
    from domainsr.errors import InputError
    from domainsr.image import MedicalGeometry, SpatialImage

    def image(spacing, shape=(16, 16, 8), domain="mri"):
        return SpatialImage(np.zeros((1, *shape), np.float32), domain, MedicalGeometry(np.diag([*spacing, 1.0]), shape))

    assert self_supervised_axis(image((1.0, 5.0, 1.0)), 4, "scan") == (1, 4)
    assert self_supervised_axis(image((1.0, 1.0, 5.0)), [1, 1, 3], "scan") == (2, 3)
    with pytest.raises(InputError, match="MRI and CT") as err:
        self_supervised_axis(image((1.0, 1.0, 5.0), domain="optical"), 4, "tile_7")
    assert "tile_7" in str(err.value)
    with pytest.raises(InputError, match="2D"):
        self_supervised_axis(image((1.0, 1.0, 5.0), shape=(16, 16, 1)), 4, "one")
    with pytest.raises(InputError, match="3 axes"):
        self_supervised_axis(image((1.0, 1.0, 5.0)), [1, 4], "scan")
