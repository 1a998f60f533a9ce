"""The command line on real files: an input is never overwritten, band aliases and --band-map,
baseline aliases, usage errors answered in one line before any flow starts, --version, and the exit
codes enhance and audit share (4 on a FAIL verdict)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import rasterio
import typer
from typer.testing import CliRunner

from domainsr.cli import (
    EXIT_AUDIT_FAIL,
    EXIT_CODES,
    EXIT_OK,
    EXIT_PARTIAL,
    EXIT_USAGE,
    _finish_audit,
    _finish_batch,
    app,
    outcome_code,
)

runner = CliRunner()
DOMAINSR = Path(sys.executable).with_name("domainsr")


def _fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_an_input_is_never_overwritten(prefect_home, small_inputs, tmp_path):
    """The bug: `enhance DIR/lr.tif --out DIR` wrote the output over the input, exit 0."""
    folder = tmp_path / "scene"
    folder.mkdir()
    lr = folder / "lr.tif"
    shutil.copy(small_inputs / "field.tif", lr)
    before = _fingerprint(lr)
    base = ["enhance", str(lr), "--model", "bicubic", "--scale", "2", "--out", str(folder), "--no-progress"]

    res = runner.invoke(app, base)
    verdict = json.loads((folder / "lr_sr.audit.json").read_text())["verdict"]
    assert res.exit_code == (EXIT_AUDIT_FAIL if verdict == "fail" else EXIT_OK), res.output
    assert _fingerprint(lr) == before and (folder / "lr_sr.tif").is_file()
    assert f"lr: enhanced -> {folder / 'lr_sr.tif'}" in res.output
    assert f"audit {verdict.upper()}: " in res.output and f"(report {folder / 'lr_sr.audit.html'})" in res.output

    for extra in ([], ["--overwrite"]):  # an empty suffix would name the input itself: refused, always
        res = runner.invoke(app, [*base, "--suffix", "", "--json", *extra])
        assert res.exit_code == EXIT_PARTIAL, res.output
        (row,) = _json(res.stdout)["items"]
        assert row["status"] == "failed" and row["error"] == "OutputRefused" and "input" in row["message"]
        assert _fingerprint(lr) == before

    theirs = folder / "lr_x.tif"  # somebody else's file at the output name: only with --overwrite
    theirs.write_bytes(b"not a DomainSR output")
    res = runner.invoke(app, [*base, "--suffix", "_x"])
    assert res.exit_code == EXIT_PARTIAL and "--overwrite" in res.output and str(theirs) in res.output
    assert theirs.read_bytes() == b"not a DomainSR output"
    res = runner.invoke(app, [*base, "--suffix", "_x", "--overwrite"])
    assert res.exit_code in (EXIT_OK, EXIT_AUDIT_FAIL) and "lr: enhanced" in res.output, res.output
    assert rasterio.open(theirs).count == 4 and _fingerprint(lr) == before


def _copy_raster(src: Path, dst: Path, descriptions: list[str | None]) -> Path:
    with rasterio.open(src) as ds:
        profile, data = {**ds.profile, "driver": "GTiff"}, ds.read()
    with rasterio.open(dst, "w", **profile) as out:
        out.write(data)
        for i, d in enumerate(descriptions, start=1):
            if d:
                out.set_band_description(i, d)
    return dst


def test_band_aliases_and_band_map_fit_the_model_card(prefect_home, small_inputs, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    _copy_raster(small_inputs / "field.tif", inputs / "exported.tif", ["B2", "B3", "B4", "B8"])
    _copy_raster(small_inputs / "field.tif", inputs / "plain.tif", [None] * 4)
    args = ["enhance", str(inputs), "--model", "sentinel2-rgbn-x2", "--out", str(tmp_path / "out"), "--json",
            "--no-audit"]
    res = runner.invoke(app, args)
    rows = {r["item_id"]: r for r in _json(res.stdout)["items"]}
    assert rows["exported"]["status"] == "enhanced", rows["exported"]["message"]  # B2 is B02
    assert rows["plain"]["status"] == "failed" and "--band-map 1=B02,2=B03,3=B04,4=B08" in rows["plain"]["message"]
    assert res.exit_code == EXIT_PARTIAL
    res = runner.invoke(app, [*args, "--band-map", "1=B02,2=B03,3=B04,4=B08"])
    assert res.exit_code == EXIT_OK, res.output
    rows = {r["item_id"]: r for r in _json(res.stdout)["items"]}
    assert rows["plain"]["status"] == "enhanced"
    with rasterio.open(rows["plain"]["output"]) as ds:
        assert ds.descriptions == ("B02", "B03", "B04", "B08")


@pytest.mark.parametrize("args, message", [
    (["--model", "cubc", "--scale", "2"], "did you mean cubic?"),
    (["--model", "sentinel2_rgbn_x3"], "did you mean sentinel2-rgbn-x2?"),
    (["--model", "cubic"], "give a scale"),
    (["--model", "bicubic"], "give a scale"),
    (["--model", "unet_discriminator", "--scale", "2"], "cannot enhance"),
    (["--model", "cubic", "--scale", "two"], "scale 'two'"),
    (["--model", "cubic", "--scale", "2", "--band-map", "1=B02,2=B2"], "bands 1 and 2"),
    (["--model", "cubic", "--scale", "2", "--band-map", "B02"], "INDEX=NAME"),
    (["--model", "cubic", "--scale", "2", "--suffix", "../x"], "--suffix"),
])
def test_usage_errors_are_one_line_before_any_flow(args, message, small_inputs):
    res = runner.invoke(app, ["enhance", str(small_inputs), "--out", "o", *args])
    assert res.exit_code == EXIT_USAGE and message in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output


def test_config_errors_are_one_line_too(small_inputs, tmp_path):
    cfg = tmp_path / "task.yaml"
    cfg.write_text("name: t\nmodel: {name: lanczso, scale: 2}\n")
    res = runner.invoke(app, ["enhance", str(small_inputs), "--config", str(cfg)])
    assert res.exit_code == EXIT_USAGE and "did you mean lanczos?" in res.output
    cfg.write_text("name: t\nmodel: {name: cubic}\nband_map: '0=B02'\n")
    res = runner.invoke(app, ["enhance", str(small_inputs), "--config", str(cfg)])
    assert res.exit_code == EXIT_USAGE and "band_map" in res.output and "task.yaml" in res.output
    assert len(res.output.strip().splitlines()) == 1
    (tmp_path / "file").write_text("x")
    res = runner.invoke(app, ["enhance", str(small_inputs), "--model", "cubic", "--scale", "2",
                              "--out", str(tmp_path / "file")])
    assert res.exit_code == EXIT_USAGE and "must be a folder" in res.output
    res = runner.invoke(app, ["audit", "heldout", str(small_inputs / "field.tif"), "--model", "cubc"])
    assert res.exit_code == EXIT_USAGE and "did you mean cubic?" in res.output
    res = runner.invoke(app, ["models", "show", "lanczo"])
    assert res.exit_code == EXIT_USAGE and "did you mean lanczos?" in res.output


def test_the_installed_command_answers_a_usage_error_with_one_line(tmp_path):
    """As a person or a scheduler sees it: no Prefect start, no traceback, the closest name."""
    res = subprocess.run([str(DOMAINSR), "enhance", "x.tif", "--model", "cubc", "--out", "o"], cwd=tmp_path,
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == EXIT_USAGE
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "did you mean cubic?" in lines[0], res.stderr
    assert not (tmp_path / "o").exists()
    res = subprocess.run([str(DOMAINSR), "--version"], check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("domainsr ") and res.stdout.split()[1][0].isdigit()


def test_importing_the_cli_does_not_import_prefect():
    code = "import sys, domainsr.cli; print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'torch')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_baseline_aliases_are_listed():
    res = runner.invoke(app, ["models", "list", "--json"])
    specs = {m["name"]: m for m in json.loads(res.stdout)["registry"]}
    assert specs["cubic"]["aliases"] == ["bicubic", "tricubic"]
    assert specs["linear"]["aliases"] == ["bilinear", "trilinear"]
    res = runner.invoke(app, ["models", "show", "trilinear", "--json"])
    assert res.exit_code == EXIT_OK and json.loads(res.stdout)["registry"]["name"] == "linear"


def _state(data: dict) -> SimpleNamespace:
    return SimpleNamespace(result=lambda raise_on_failure=False: data)


def _item(item_id: str, status: str = "enhanced", verdict: str | None = "pass") -> dict:
    return {"item_id": item_id, "kind": "raster", "status": status, "output": f"/out/{item_id}_sr.tif",
            "extras": {"audit.html": f"/out/{item_id}_sr.audit.html"} if verdict else {},
            "verdict": verdict, "reasons": [f"{verdict} because of {item_id}"] if verdict else [],
            "seconds": 1.0, "message": "boom" if status == "failed" else "", "error": "InputError" if status == "failed"
            else None}


@pytest.mark.parametrize("items, code", [
    ([_item("a"), _item("b", verdict="review")], EXIT_OK),
    ([_item("a"), _item("b", "failed", None)], EXIT_PARTIAL),
    ([_item("a", verdict="fail"), _item("b", verdict="review")], EXIT_AUDIT_FAIL),
    ([_item("a", "skipped", "fail"), _item("b", "failed", None)], EXIT_AUDIT_FAIL),  # FAIL wins over 1
    ([_item("a", verdict=None)], EXIT_OK),
])
def test_enhance_prints_each_verdict_with_its_reason_and_report_and_exits_by_the_shared_rule(items, code, capsys):
    summary = {"task": "t", "run_key": "k", "model": "cubic", "output": "/out", "total": len(items),
               "enhanced": sum(r["status"] == "enhanced" for r in items),
               "skipped": sum(r["status"] == "skipped" for r in items),
               "failed": sum(r["status"] == "failed" for r in items), "items": items}
    with pytest.raises(typer.Exit) as done:
        _finish_batch(_state(summary), as_json=False)
    assert done.value.exit_code == code
    out = capsys.readouterr()
    for r in items:
        if r["verdict"]:
            assert f"audit {r['verdict'].upper()}: {r['reasons'][0]} (report {r['extras']['audit.html']})" in out.out
    if code != EXIT_OK:
        assert f"exit {code}: {EXIT_CODES[code]}" in out.err
    audits = {"audits": [{"reference": r["item_id"], "verdict": r["verdict"], "reasons": r["reasons"],
                          "html": "/a.html", "regions": 0} for r in items if r["verdict"]],
              "errors": ["x failed"] * sum(r["status"] == "failed" for r in items)}
    with pytest.raises(typer.Exit) as done:
        _finish_audit(_state(audits), as_json=True)
    assert done.value.exit_code == code


def test_outcome_rule():
    assert outcome_code([], 0) == EXIT_OK and outcome_code(["review"], 0) == EXIT_OK
    assert outcome_code([None, "pass"], 2) == EXIT_PARTIAL
    assert outcome_code(["fail"], 3) == EXIT_AUDIT_FAIL
    assert set(EXIT_CODES) == {0, 1, 2, 3, 4, 130}
