"""The command line: enhance (outputs, skip, exit codes), models, schedule, audit, demo set-up, help."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domainsr.cli import EXIT_AUDIT_FAIL, EXIT_INPUT, EXIT_OK, EXIT_PARTIAL, app
from domainsr.io.nifti import read_nifti
from domainsr.io.raster import read_raster

runner = CliRunner()


def _json(output: str) -> dict:
    return json.loads(output[output.index("{"):])


def test_enhance_outputs_skips_and_exit_codes(prefect_home, small_inputs, tmp_path):
    inputs = tmp_path / "in"
    shutil.copytree(small_inputs, inputs)
    out = tmp_path / "out"
    args = ["enhance", str(inputs), "--model", "cubic", "--scale", "2", "--out", str(out), "--json", "--no-audit"]
    res = runner.invoke(app, args)
    assert res.exit_code == EXIT_OK, res.output
    summary = _json(res.stdout)
    assert (summary["enhanced"], summary["failed"]) == (2, 0)
    head_in, head_out = read_nifti(inputs / "head.nii.gz"), read_nifti(out / "head_sr.nii.gz")
    assert head_out.geometry.almost_equal(head_in.geometry.scaled(2))
    assert read_raster(out / "field_sr.tif").spatial_shape == (128, 144)

    (inputs / "cut.tif").write_bytes(b"II*\x00garbage")  # a truncated TIFF
    res = runner.invoke(app, args)
    assert res.exit_code == EXIT_PARTIAL, res.output
    rows = {r["item_id"]: r["status"] for r in _json(res.stdout)["items"]}
    assert rows == {"head": "skipped", "field": "skipped", "cut": "failed"}


def test_enhance_with_progress_bars_and_a_config(prefect_home, small_inputs, tmp_path):
    cfg = tmp_path / "task.yaml"
    cfg.write_text("name: head-x2\ndomain: mri\nmodel: {name: linear, scale: [2, 2, 1]}\n"
                   "audit: {tta: 'off'}\nstore: {query: {kinds: [nifti]}}\n")
    res = runner.invoke(app, ["enhance", str(small_inputs), "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert res.exit_code == EXIT_OK, res.output
    assert "head-x2" in res.output and "enhanced" in res.output and "ETA" in res.output
    out = read_nifti(tmp_path / "o" / "head_sr.nii.gz")
    assert out.spatial_shape == (64, 72, 28) and (tmp_path / "o" / "head_sr.audit.html").exists()
    assert not (tmp_path / "o" / "field_sr.tif").exists()  # the query kept only NIfTI items


@pytest.mark.parametrize("args, message", [
    (["enhance", "x.nii.gz", "--out", "o"], "either --config"),
    (["enhance", "no/such/file.nii.gz", "--model", "cubic", "--scale", "2"], "no such file"),
    (["enhance", ".", "--model", "cubic", "--runner", "spark"], "--runner"),
])
def test_enhance_usage_errors_exit_2(args, message):
    res = runner.invoke(app, args)
    assert res.exit_code == EXIT_INPUT and message in res.output


def test_enhance_bad_model_or_config_exit_2(prefect_home, small_inputs, tmp_path):
    res = runner.invoke(app, ["enhance", str(small_inputs), "--model", "super-resnet-9000", "--scale", "2",
                              "--out", str(tmp_path)])
    assert res.exit_code == EXIT_INPUT and "super-resnet-9000" in res.output
    bad = tmp_path / "typo.yaml"
    bad.write_text("name: x\nmodel: {name: cubic, scale: 2}\ntilling: {tile: 64}\n")
    res = runner.invoke(app, ["enhance", str(small_inputs), "--config", str(bad), "--out", str(tmp_path)])
    assert res.exit_code == EXIT_INPUT and "typo.yaml" in res.output and "tilling" in res.output
    assert not list(tmp_path.glob("*.nii.gz"))


def test_audit_output_of_a_third_party_file(prefect_home, small_inputs, tmp_path):
    sr = tmp_path / "sr"
    assert runner.invoke(app, ["enhance", str(small_inputs / "field.tif"), "--model", "lanczos", "--scale", "2",
                               "--out", str(sr), "--no-audit", "--no-progress"]).exit_code == EXIT_OK
    res = runner.invoke(app, ["audit", "output", str(sr / "field_sr.tif"), str(small_inputs / "field.tif"),
                              "--out", str(tmp_path / "audit"), "--json"])
    assert res.exit_code in (EXIT_OK, EXIT_AUDIT_FAIL), res.output
    (row,) = _json(res.stdout)["audits"]
    assert row["verdict"] in ("pass", "review", "fail") and Path(row["html"]).is_file()
    assert res.exit_code == (EXIT_AUDIT_FAIL if row["verdict"] == "fail" else EXIT_OK)


def test_models_and_schedules():
    res = runner.invoke(app, ["models", "list", "--json"])
    assert res.exit_code == EXIT_OK
    names = {m["name"]: m for m in json.loads(res.output)["registry"]}
    assert names["cubic"]["family"] == "baseline" and "rescnn" in names
    res = runner.invoke(app, ["models", "show", "lanczos", "--json"])
    assert res.exit_code == EXIT_OK and json.loads(res.output)["registry"]["name"] == "lanczos"
    assert runner.invoke(app, ["models", "show", "no-such-model"]).exit_code == EXIT_INPUT
    res = runner.invoke(app, ["schedule", "list", "--json"])
    assert res.exit_code == EXIT_OK
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["nightly-ct-thick-slices"]["schedules"][0]["cron"] == "0 2 * * *"
    assert len(rows["sentinel2-new-scenes"]["schedules"][0]["next"]) == 3
    assert runner.invoke(app, ["schedule", "list", "no-such-deployment"]).exit_code == EXIT_INPUT


def test_help_explains_commands_and_exit_codes():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for word in ("enhance", "train", "audit", "models", "data", "info", "schedule", "demo", "Exit codes"):
        assert word in res.output
    res = runner.invoke(app, ["enhance", "--help"])
    assert "--model cubic --scale 2" in res.output and "DICOM" in res.output


def _fake_checkpoint(folder: Path, name: str) -> None:
    from domainsr.models import build_model
    from domainsr.models.checkpoints import Architecture, FixedNormalization, ModelCard, save_checkpoint

    net = build_model("rescnn", spatial_dims=2, in_channels=4, scale=2, n_blocks=1, n_feats=4)
    card = ModelCard(name=name, architecture=Architecture(name="rescnn", kwargs={"n_blocks": 1, "n_feats": 4}),
                     domain="optical", spatial_dims=2, scale=(2, 2), in_channels=4, out_channels=4,
                     bands=["B02", "B03", "B04", "B08"], units="DN", input_range=(0, 10000),
                     normalization=FixedNormalization(offset=[1000] * 4, scale=[500] * 4),
                     receptive_radius=tuple(int(r) for r in net.receptive_radius))
    save_checkpoint(net, card, folder / name)


def test_demo_uses_shipped_checkpoints_else_falls_back_with_a_warning(sample_data, tmp_path, monkeypatch):
    from domainsr import demo
    from domainsr.config import load_enhance_config
    from domainsr.models import names

    monkeypatch.setattr(names, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setenv("DOMAINSR_CHECKPOINTS", str(tmp_path / "user"))
    runs, warnings = demo.demo_runs(tmp_path / "demo", sample_data)
    assert len(warnings) == 2 and all("bicubic" in w for w in warnings)
    cfgs = [load_enhance_config(r["config"]) for r in runs]
    assert [c.model.name for c in cfgs] == ["cubic", "cubic"] and cfgs[0].bands == ["B02", "B03", "B04", "B08"]
    assert all(c.audit["tta"] == "off" for c in cfgs)
    assert runs[0]["inputs"] == [str(sample_data["sentinel2"])] and runs[1]["inputs"] == [str(sample_data["mni152"])]

    _fake_checkpoint(tmp_path / "shipped", "sentinel2_rgbn_x2")
    runs, warnings = demo.demo_runs(tmp_path / "demo", sample_data)
    assert len(warnings) == 1 and "mri_t1_x2" in warnings[0]
    assert load_enhance_config(runs[0]["config"]).model.name == "sentinel2_rgbn_x2"


def test_demo_prints_each_verdict_with_its_reason_and_report(sample_data, tmp_path, monkeypatch):
    """``domainsr demo`` says each task's audit verdict (the flow's rows, read by run_demo), and a
    FAIL verdict does not fail ``make demo`` (exit 0)."""
    import flows.demo
    from domainsr import demo

    def row(name: str, verdict: str, reason: str) -> dict:
        out = tmp_path / name
        return {"item_id": name, "status": "enhanced", "output": str(out), "message": "", "verdict": verdict,
                "reasons": [reason], "extras": {"audit.html": str(out) + ".audit.html"}}

    summaries = {"a": {"items": [row("s2_sr.tif", "fail", "3 region(s) LR-inconsistent")]},
                 "b": {"items": [row("t1_sr.nii.gz", "review", "2 flagged region(s) need attention")]}}

    class State:
        def result(self, raise_on_failure: bool = False) -> dict:
            return summaries

    monkeypatch.setattr(demo, "fetch_sample_data", lambda: sample_data)
    monkeypatch.setattr(demo, "demo_runs", lambda out, data: ([], []))
    monkeypatch.setattr(flows.demo, "demo_flow", lambda runs, return_state: State())
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "demo")])
    assert res.exit_code == EXIT_OK, res.output
    text = " ".join(res.output.split())
    assert f"Sentinel-2 10 m bands x2: audit FAIL: 3 region(s) LR-inconsistent (report {tmp_path}/s2_sr.tif.audit.html)" \
        in text
    assert "MNI152 T1 x2: audit REVIEW: 2 flagged region(s) need attention" in text


def test_train_usage_and_config_errors_exit_2(prefect_home, tmp_path):
    assert runner.invoke(app, ["train", str(tmp_path / "missing.yaml")]).exit_code == EXIT_INPUT
    cfg = tmp_path / "t.yaml"
    cfg.write_text("domain: optical\nmodel: {name: rescnn}\nsteps: 1\n")
    res = runner.invoke(app, ["train", str(cfg), "--set", "steps"])
    assert res.exit_code == EXIT_INPUT and "key=value" in res.output
    res = runner.invoke(app, ["train", str(cfg), "--set", "stepz=3", "--no-progress"])
    assert res.exit_code == EXIT_INPUT and "t.yaml" in res.output


def test_models_list_shows_installed_checkpoints(tmp_path, monkeypatch):
    from domainsr.models import names

    monkeypatch.setattr(names, "SHIPPED_DIR", tmp_path / "shipped")
    monkeypatch.setenv("DOMAINSR_CHECKPOINTS", str(tmp_path / "user"))
    _fake_checkpoint(tmp_path / "user", "my_s2_model")
    res = runner.invoke(app, ["models", "list", "--json"])
    (ck,) = json.loads(res.stdout)["checkpoints"]
    assert ck["name"] == "my_s2_model" and ck["scale"] == [2, 2] and ck["bands"][0] == "B02"
    res = runner.invoke(app, ["models", "show", "my-s2-model", "--json"])  # '-' and '_' are interchangeable
    assert res.exit_code == EXIT_OK and json.loads(res.stdout)["units"] == "DN"
