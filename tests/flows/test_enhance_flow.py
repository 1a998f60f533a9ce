"""End to end under an ephemeral Prefect: the enhancement flow over a folder of mixed real inputs
(a NIfTI, a DICOM series, a GeoTIFF and a corrupt file), its re-run, and the same run on a Dask
LocalCluster of 2 workers."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio

from domainsr.io.dicom import read_dicom_series
from domainsr.io.nifti import read_nifti
from domainsr.io.raster import read_raster


def _run(inputs: Path, out: Path, **kw):
    from flows.enhance import enhance_flow

    state = enhance_flow(inputs=[str(inputs)], out=str(out), model="cubic", scale=2, return_state=True, **kw)
    return state, state.result(raise_on_failure=False)


@pytest.fixture(scope="module")
def first_run(prefect_home, mixed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("enhanced")
    state, summary = _run(mixed_folder, out)
    return state, summary, out


def _by_id(summary):
    return {r["item_id"]: r for r in summary["items"]}


def test_mixed_folder_end_to_end(first_run, mixed_folder):
    state, summary, out = first_run
    assert state.is_failed() and state.message == "3 enhanced, 0 skipped, 1 failed of 4 item(s)"
    rows = _by_id(summary)
    assert {k: r["status"] for k, r in rows.items() if k != "broken"} == {
        "brain": "enhanced", "scene": "enhanced", next(k for k in rows if k.startswith("mr-")): "enhanced"}
    bad = rows["broken"]
    assert bad["status"] == "failed" and bad["error"] == "InputError" and "broken.nii.gz" in bad["message"]

    # NIfTI -> NIfTI on the x2 grid of the same extent
    src, dst = read_nifti(mixed_folder / "brain.nii.gz"), read_nifti(out / "brain_sr.nii.gz")
    assert dst.spatial_shape == (80, 88, 64) and dst.geometry.almost_equal(src.geometry.scaled(2))
    assert nib.load(out / "brain_sr.nii.gz").get_data_dtype() == np.uint8
    # DICOM series -> derived DICOM series, new series UID, geometry of the x2 grid
    mr = next(r for k, r in rows.items() if k.startswith("mr-"))
    src_s, dst_s = read_dicom_series(mixed_folder / "series"), read_dicom_series(mr["output"])
    assert Path(mr["output"]).is_dir() and dst_s.spatial_shape == (128, 128, 12)
    assert dst_s.geometry.almost_equal(src_s.geometry.scaled(2), atol=1e-3)
    assert dst_s.meta["dicom"]["series_instance_uid"] != src_s.meta["dicom"]["series_instance_uid"]
    # GeoTIFF -> COG with the CRS and the x2 geotransform, bands and dtype kept
    src_r, dst_r = read_raster(mixed_folder / "scene.tif"), read_raster(out / "scene_sr.tif")
    assert dst_r.geometry.crs == src_r.geometry.crs and dst_r.geometry.almost_equal(src_r.geometry.scaled(2))
    assert dst_r.band_names == ("B02", "B03", "B04", "B08") and dst_r.data.dtype == np.uint16
    with rasterio.open(out / "scene_sr.tif") as ds:
        assert ds.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # a cloud-optimised GeoTIFF

    # each output: an audit report (HTML + JSON), a risk map on the output grid, provenance last
    for r in (rows["brain"], rows["scene"], mr):
        report = json.loads(Path(r["extras"]["audit.json"]).read_text())
        assert report["mode"] == "output" and report["verdict"] == r["verdict"]
        assert Path(r["extras"]["audit.html"]).read_text().lstrip().lower().startswith("<!doctype html")
        prov = json.loads(Path(r["output"] + ".provenance.json").read_text())
        assert prov["run_key"] == summary["run_key"] and prov["provenance"]["model"]["name"] == "cubic"
    risk = read_raster(rows["scene"]["extras"]["risk.tif"])
    assert risk.geometry.almost_equal(dst_r.geometry) and risk.band_names == ("risk", "class")


def test_artifacts_link_outputs_and_reports(first_run):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state, summary, _ = first_run
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
            any_=["domainsr-enhance-cubic-x2", "domainsr-enhance-cubic-x2-report"])))
    # other tests in the same Prefect database publish under the same keys: keep this run's own
    kinds = {a.key: a for a in arts if a.flow_run_id == state.state_details.flow_run_id}
    table = json.loads(kinds["domainsr-enhance-cubic-x2"].data)
    assert {row["item"]: row["status"] for row in table}["broken"] == "failed"
    md = kinds["domainsr-enhance-cubic-x2-report"].data
    brain = _by_id(summary)["brain"]
    assert Path(brain["output"]).as_uri() in md and Path(brain["extras"]["audit.html"]).as_uri() in md


def test_rerun_skips_completed_items(first_run, mixed_folder):
    _, summary, out = first_run
    mtimes = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    state, again = _run(mixed_folder, out)
    assert state.message == "0 enhanced, 3 skipped, 1 failed of 4 item(s)"
    assert {r["item_id"]: r["status"] for r in again["items"]} == {
        r["item_id"]: ("failed" if r["status"] == "failed" else "skipped") for r in summary["items"]}
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes  # nothing rewritten
    assert _by_id(again)["brain"]["verdict"] == _by_id(summary)["brain"]["verdict"]


def _pixels(path: str) -> np.ndarray:
    p = Path(path)
    if p.is_dir():
        return read_dicom_series(p).data
    return read_nifti(p).data if p.name.endswith(".nii.gz") else read_raster(p).data


def test_dask_local_cluster_gives_the_same_outputs(first_run, mixed_folder, tmp_path):
    import dask
    from distributed import Client, LocalCluster, get_task_stream

    _, summary, _ = first_run
    # fork: the worker processes start with torch, Prefect and DomainSR already imported (seconds, not a minute)
    with dask.config.set({"distributed.worker.multiprocessing-method": "fork"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster, \
            Client(cluster) as client, get_task_stream(client) as stream:
        state, dask_summary = _run(mixed_folder, tmp_path / "dask", dask_address=cluster.scheduler_address,
                                   run_audit=False)
        cluster_workers = set(client.scheduler_info()["workers"])
    ran_on = {t["worker"] for t in stream.data}  # the stream is collected when its block ends
    assert state.message == "3 enhanced, 0 skipped, 1 failed of 4 item(s)"
    assert len(stream.data) >= 4 and ran_on and ran_on <= cluster_workers  # the items ran on the cluster
    ours, theirs = _by_id(dask_summary), _by_id(summary)
    for key, row in ours.items():
        if row["status"] == "failed":
            assert theirs[key]["status"] == "failed"
            continue
        np.testing.assert_array_equal(_pixels(row["output"]), _pixels(theirs[key]["output"]))
