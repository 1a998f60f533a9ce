"""The audit contract: ``domainsr audit --sr SR --lr LR [--reference HR] [--degradation SPEC] --out DIR``
writes DIR/report.html, DIR/report.json (valid against docs/audit.schema.json) and the risk map, on
a real Sentinel-2 crop and a real MNI152 block; a batch writes DIR/<item>/report.* and survives a
bad item (exit 1); ``audit output`` and ``audit heldout`` are aliases that write report.* too."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from domainsr.cli import EXIT_AUDIT_FAIL, EXIT_OK, EXIT_PARTIAL, app

runner = CliRunner()


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def _code(rows: list[dict], failed: bool) -> int:
    """The exit code docs/cli.md promises for these rows."""
    if any(r["verdict"] == "fail" for r in rows):
        return EXIT_AUDIT_FAIL
    return EXIT_PARTIAL if failed else EXIT_OK


def _cubic_sr(lr_path: Path, sr_path: Path, model: str | None = None) -> Path:
    """A cubic x2 output of the file at ``lr_path`` (written as a DomainSR output of ``model`` when given)."""
    from domainsr.audit import interpolation_enhancer
    from domainsr.io import read_image, write_image

    lr = read_image(lr_path)
    sr = interpolation_enhancer("cubic", lr.channels, (2,) * lr.spatial_dims)(lr)
    sr = sr.derive(np.clip(np.rint(sr.data), 0, None).astype(lr.data.dtype) if lr.data.dtype.kind == "u"
                   else sr.data.astype(np.float32), mask=None)
    if model:
        sr.provenance["model"] = {"kind": "checkpoint", "name": model}
    return Path(write_image(sr, sr_path))


def _block_mean_lr(hr_path: Path, lr_path: Path) -> Path:
    from domainsr.audit import area_average
    from domainsr.io import read_image, write_image

    hr = read_image(hr_path)
    f = (2,) * hr.spatial_dims
    lr = hr.derive(area_average(f)(np.asarray(hr.data, np.float32)), geometry=hr.geometry.scaled([0.5] * len(f)),
                   mask=None)
    return Path(write_image(lr, lr_path))


@pytest.fixture(scope="module")
def pairs(small_inputs, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    lr = small_inputs / "field.tif"
    head_lr = _block_mean_lr(small_inputs / "head.nii.gz", root / "head_lr.nii.gz")
    return {"lr": lr, "sr": _cubic_sr(lr, root / "field_sr.tif"),
            "tagged": _cubic_sr(lr, root / "tagged_sr.tif", model="sentinel2-rgbn-x2"),
            "head_hr": small_inputs / "head.nii.gz", "head_lr": head_lr,
            "head_sr": _cubic_sr(head_lr, root / "head_sr.nii.gz")}


def _files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_the_contract_on_a_sentinel2_crop(prefect_home, pairs, tmp_path, check_report):
    out = tmp_path / "DIR"
    res = runner.invoke(app, ["audit", "--sr", str(pairs["sr"]), "--lr", str(pairs["lr"]), "--out", str(out),
                              "--json"])
    (row,) = _json(res.stdout)["audits"]
    assert res.exit_code == _code([row], False), res.output
    assert {"report.html", "report.json", "risk.tif", "regions.geojson"} <= _files(out)  # + the regions for QGIS
    assert row["html"] == str(out / "report.html") and row["json"] == str(out / "report.json")
    report = check_report(out / "report.json")
    assert report["mode"] == "output" and report["scale"] == [2, 2] and report["bands"] == ["B02", "B03", "B04", "B08"]
    used = report["provenance"]["degradation"]
    assert (used["spec"], used["asked"]) == ("area", "auto") and "no DomainSR provenance" in used["why"]
    assert row["degradation"]["spec"] == "area"
    assert all(r["kind"] in ("inconsistency", "uncertain") for r in report["regions"])  # no reference
    html = (out / "report.html").read_text(encoding="utf-8")
    assert report["verdict"].upper() in html and 'href="risk.tif"' in html and 'href="regions.geojson"' in html

    # the same SR as a DomainSR output of the shipped model: `auto` audits it against that model's card
    res = runner.invoke(app, ["audit", "--sr", str(pairs["tagged"]), "--lr", str(pairs["lr"]), "--out",
                              str(tmp_path / "auto"), "--no-progress"])
    report = check_report(tmp_path / "auto" / "report.json")
    assert res.exit_code == _code([report], False), res.output
    used = report["provenance"]["degradation"]
    assert used["spec"] == "card:sentinel2-rgbn-x2" and used["operator"]["kind"] == "optical"
    assert "degradation card:sentinel2-rgbn-x2: auto:" in " ".join(res.output.split())
    res = runner.invoke(app, ["audit", "--sr", str(pairs["tagged"]), "--lr", str(pairs["lr"]), "--degradation",
                              "gaussian:1", "--out", str(tmp_path / "g"), "--json"])
    report = check_report(tmp_path / "g" / "report.json")
    assert report["provenance"]["degradation"]["spec"] == "gaussian:1"  # an explicit spec wins


def test_the_contract_on_a_nifti_volume_with_a_reference(prefect_home, pairs, tmp_path, check_report):
    out = tmp_path / "DIR"
    res = runner.invoke(app, ["audit", "--sr", str(pairs["head_sr"]), "--lr", str(pairs["head_lr"]),
                              "--reference", str(pairs["head_hr"]), "--degradation", "area", "--out", str(out),
                              "--json"])
    (row,) = _json(res.stdout)["audits"]
    assert res.exit_code == _code([row], False), res.output
    assert {"report.html", "report.json", "risk.nii.gz", "regions.nii.gz"} <= _files(out)  # + the label map
    report = check_report(out / "report.json")
    assert report["domain"] == "mri" and report["scale"] == [2, 2, 2] and "reference" in report["metrics"]
    assert row["psnr_gain_db"] == pytest.approx(0.0, abs=0.05)  # cubic output (rounded to the file dtype) vs the cubic baseline
    assert report["provenance"]["degradation"]["spec"] == "area"
    for region in report["regions"]:
        assert len(region["bbox_index"]) == 3 and region["kind"] in ("hallucination", "omission", "inconsistency",
                                                                    "uncertain")


def test_a_batch_survives_a_bad_item(prefect_home, pairs, tmp_path, check_report):
    lr_dir, sr_dir, out = tmp_path / "lr", tmp_path / "sr", tmp_path / "DIR"
    lr_dir.mkdir()
    sr_dir.mkdir()
    for name in ("a", "b", "cut", "lonely"):
        shutil.copy(pairs["lr"], lr_dir / f"{name}.tif")
    shutil.copy(pairs["sr"], sr_dir / "a_sr.tif")
    shutil.copy(pairs["sr"], sr_dir / "b.tif")  # the same stem as its LR
    (sr_dir / "cut_sr.tif").write_bytes(b"II*\x00garbage")  # a truncated TIFF
    res = runner.invoke(app, ["audit", "--sr", str(sr_dir), "--lr", str(lr_dir), "--out", str(out), "--json"])
    data = _json(res.stdout)
    rows = {r["item"]: r for r in data["audits"]}
    assert set(rows) == {"a", "b"} and len(data["errors"]) == 2, data
    assert res.exit_code == _code(list(rows.values()), True), res.output
    assert any(e.startswith("lonely: no SR image") for e in data["errors"])
    assert any("cut" in e for e in data["errors"])
    for item in ("a", "b"):
        assert {"report.html", "report.json", "risk.tif"} <= _files(out / item)
        assert rows[item]["json"] == str(out / item / "report.json")
        check_report(out / item / "report.json")
    assert not (out / "cut").exists() and not (out / "report.json").exists()

    # several pairs on the command line: a batch too
    res = runner.invoke(app, ["audit", "--sr", str(pairs["sr"]), "--lr", str(pairs["lr"]), "--sr",
                              str(pairs["head_sr"]), "--lr", str(pairs["head_lr"]), "--out", str(tmp_path / "two"),
                              "--json", "--no-progress"])
    data = _json(res.stdout)
    items = [r["item"] for r in data["audits"]]
    assert res.exit_code == _code(data["audits"], False) and not data["errors"], res.output
    assert items[0] == "field" and items[1].startswith("anon-")  # a medical name is a pseudonym
    for item in items:
        check_report(tmp_path / "two" / item / "report.json")


def test_the_aliases_write_the_contracts_files(prefect_home, pairs, small_inputs, tmp_path, check_report):
    res = runner.invoke(app, ["audit", "output", str(pairs["sr"]), str(pairs["lr"]), "--out", str(tmp_path / "o"),
                              "--json"])
    (row,) = _json(res.stdout)["audits"]
    assert res.exit_code == _code([row], False) and row["json"] == str(tmp_path / "o" / "report.json"), res.output
    check_report(row["json"])

    res = runner.invoke(app, ["audit", "heldout", str(small_inputs / "field.tif"), "--model", "cubic", "--scale", "2",
                              "--out", str(tmp_path / "h"), "--json", "--config", str(_no_tta(tmp_path))])
    (row,) = _json(res.stdout)["audits"]
    assert res.exit_code == _code([row], False), res.output
    assert {"report.html", "report.json", "risk.tif"} <= _files(tmp_path / "h")
    report = check_report(tmp_path / "h" / "report.json")
    assert report["mode"] == "held-out" and report["provenance"]["degradation"]["asked"] == "heldout"

    res = runner.invoke(app, ["audit", "heldout", str(small_inputs / "field.tif"), str(small_inputs / "head.nii.gz"),
                              "--model", "cubic", "--scale", "2", "--out", str(tmp_path / "hb"), "--json",
                              "--config", str(_no_tta(tmp_path))])
    data = _json(res.stdout)
    assert res.exit_code == _code(data["audits"], False) and not data["errors"], res.output
    items = sorted(r["item"] for r in data["audits"])
    assert items[1] == "field" and items[0].startswith("anon-")
    for item in items:
        check_report(tmp_path / "hb" / item / "report.json")


def _no_tta(tmp_path: Path) -> Path:
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("name: audit\nmodel: {name: cubic, scale: 2}\naudit: {tta: 'off'}\n")
    return cfg


def test_the_audit_stage_reports_its_progress(pairs, tmp_path):
    """The progress bar of the audit stage: ``"windows"`` events of each audited item (app level,
    no flow), ending at done == total."""
    from domainsr.app import listen
    from domainsr.app.audits import output_audit
    from domainsr.app.progress import audit_progress

    events: list[tuple[str, str, int, int]] = []
    with listen(lambda *e: events.append(e)):
        for name, sr, lr in (("field", pairs["sr"], pairs["lr"]), ("head", pairs["head_sr"], pairs["head_lr"])):
            output_audit(sr, lr, tmp_path / name, audit={"tta": "off"}, progress=audit_progress(name))
    for name in ("field", "head"):
        mine = [e for e in events if e[:2] == ("windows", name)]
        assert mine and mine[-1][2] == mine[-1][3] >= 1, events
