"""The training and audit flows, and a freshly trained checkpoint used by the enhancement flow (the
model card decides which bands are enhanced and refuses an input of another domain)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from flow_inputs import crop, write_geotiff_crop, write_nifti_crop

from domainsr.io.raster import read_raster


@pytest.fixture(scope="module")
def trained(prefect_home, sample_data, tmp_path_factory):
    from domainsr.io import read_image
    from domainsr.io.raster import write_raster
    from flows.train import train_flow

    root = tmp_path_factory.mktemp("train")
    s2 = read_image(sample_data["sentinel2"]).select(["B04", "B08"])
    source = write_raster(crop(s2, (500, 600), (176, 96)), root / "s2_b04_b08.tif")
    config = {
        "domain": "optical", "model": {"name": "rescnn", "kwargs": {"n_blocks": 1, "n_feats": 8}},
        "data": {"source": str(source), "split": {"axis": 0, "train": 0.6, "val": 0.1, "test": 0.3}},
        "degradation": {"kind": "gaussian_mean", "scale": [2, 2], "sigma": 1.0}, "scale": [2, 2],
        "patch_size": [16, 16], "batch_size": 4, "steps": 4, "val_every": 2, "save_every": 2, "threads": 1,
        "card": {"units": "DN"},
        "output": {"name": "tiny_s2", "dir": str(root / "ckpt"), "run_dir": str(root / "runs")}}
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return train_flow(str(path), return_state=True)


def test_train_flow_saves_a_checkpoint_and_reports_metrics(trained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state = trained
    assert state.is_completed()
    summary = state.result()
    assert summary["steps"] == 4 and Path(summary["checkpoint"]).is_file()
    assert summary["test"]["baseline"] in ("linear", "cubic", "lanczos") and summary["scale"] == [2, 2]
    with get_client(sync_client=True) as client:
        (art,) = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["domainsr-train-tiny-s2"])), limit=1)
    rows = {r["region"]: r for r in json.loads(art.data)}
    assert rows["test"]["gain_db"] == pytest.approx(summary["test"]["gain_db"])


def test_enhance_flow_with_the_trained_checkpoint(trained, sample_data, tmp_path):
    from flows.enhance import enhance_flow

    state = trained
    card = state.result()["checkpoint"]
    inputs = tmp_path / "in"
    write_geotiff_crop(sample_data, inputs / "scene.tif")  # B02 B03 B04 B08: the card picks B04 B08
    write_nifti_crop(sample_data, inputs / "brain.nii.gz")  # an MRI volume: refused by the optical card
    run = enhance_flow(inputs=[str(inputs)], out=str(tmp_path / "out"), model=card, return_state=True)
    rows = {r["item_id"]: r for r in run.result(raise_on_failure=False)["items"]}
    assert rows["scene"]["status"] == "enhanced" and rows["brain"]["status"] == "failed"
    assert rows["brain"]["error"] == "ModelCardMismatch" and "optical" in rows["brain"]["message"]
    out = read_raster(rows["scene"]["output"])
    assert out.band_names == ("B04", "B08") and out.spatial_shape == (192, 160)
    prov = json.loads(Path(rows["scene"]["output"] + ".provenance.json").read_text())["provenance"]
    sha = json.loads(Path(card).read_text())["weights_sha256"]
    assert prov["model"]["kind"] == "checkpoint" and prov["model"]["sha256"] == sha


def _check_report(path: Path) -> dict:
    """tests/audit/schema_check.py's check_report (loaded by path: tests/ is no package)."""
    spec = importlib.util.spec_from_file_location("domainsr_tests_schema_check",
                                                  Path(__file__).resolve().parents[1] / "audit" / "schema_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.check_report(path)


def test_heldout_audit_flow(prefect_home, sample_data, tmp_path):
    from flows.audit import audit_flow

    nifti = write_nifti_crop(sample_data, tmp_path / "brain.nii.gz")
    state = audit_flow(references=[str(nifti)], model="cubic", scale=2, out=str(tmp_path / "audit"),
                       audit={"tta": "off"}, return_state=True)
    (row,) = state.result(raise_on_failure=False)["audits"]
    # the model is the baseline itself: no gain, and the report says so
    assert row["psnr_gain_db"] == pytest.approx(0.0, abs=1e-6) and row["scale"] == [2, 2, 2]
    assert row["json"] == str(tmp_path / "audit" / "report.json")  # one reference: straight into out
    report = _check_report(Path(row["json"]))
    assert report["mode"] == "held-out" and Path(row["html"]).exists() and Path(row["risk_map"]).exists()

    bad = audit_flow(references=[str(tmp_path / "missing.nii.gz")], model="cubic", scale=2,
                     out=str(tmp_path / "audit"), return_state=True)
    error = bad.result(raise_on_failure=False)["errors"][0]  # a medical path is pseudonymised, its position named
    assert bad.is_failed() and "reference #1" in error and "no such file" in error and "missing" not in error
