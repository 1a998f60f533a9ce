"""The audit next to the derived series: a DICOM Parametric Map of the risk map and a Segmentation
of the flagged regions, in the source's study in the PACS (Orthanc, DICOMweb and DIMSE; found by
QIDO-RS, not listed as inputs, not duplicated by a re-run) and beside the derived series folder in
a local store; each one passes dciodvfy and references the derived series' instances."""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from store_fixtures import CLIENT_AET, dicomweb_url, make_mr_series, study_series

from domainsr.engine import PatchInferer, enhance_image
from domainsr.image import SpatialImage
from domainsr.io import write_image
from domainsr.io.dicom import read_dicom_series
from domainsr.io.nifti import companion_meta, risk_map_meta
from domainsr.models import build_model
from domainsr.stores.local import LocalStore
from domainsr.stores.pacs import PacsStore

SCALE = (1, 1, 2)
PM_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.30"
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"


def enhance_and_map(img, folder: Path):
    """The cubic x2 through-plane output and the audit's files on its grid, as the audit writes
    them: a risk map (band 1 risk: a position-dependent ramp, so each plane differs, and a block;
    band 2 class), a region label map (region 1, fail: the block; region 2, pass) and the JSON
    report's regions. Returns the output, the extras and the risk and label arrays."""
    model = build_model("cubic", spatial_dims=3, in_channels=1, scale=SCALE)
    sr = enhance_image(img, PatchInferer(model, device="cpu", threads=1))
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in sr.spatial_shape), indexing="ij")
    risk = 0.01 * i + 0.02 * j + 0.05 * k
    risk[12:22, 10:20, 4:10] += 2.5
    labels = np.zeros(risk.shape, np.uint16)
    labels[12:22, 10:20, 4:10] = 1
    labels[30:34, 2:6, 0:3] = 2
    data = np.stack([risk, np.where(risk > 1, 4.0, 1.0)]).astype(np.float32)
    risk_img = SpatialImage(data=data, domain=sr.domain, geometry=sr.geometry, band_names=("risk", "class"),
                            meta={"storage_dtype": "float32", **risk_map_meta(sr)})
    label_img = SpatialImage(data=labels[None], domain=sr.domain, geometry=sr.geometry, band_names=("region",),
                             meta={"storage_dtype": "uint16", **companion_meta(sr, descrip="regions", intent="label")})
    folder.mkdir(parents=True, exist_ok=True)
    report = folder / "audit.json"
    report.write_text(json.dumps({"regions": [{"id": 1, "verdict": "fail"}, {"id": 2, "verdict": "pass"}]}))
    extras = {"risk.nii.gz": Path(write_image(risk_img, folder / "risk.nii.gz")),
              "regions.nii.gz": Path(write_image(label_img, folder / "regions.nii.gz")), "audit.json": report}
    return sr, extras, risk, labels


def check_segmentation(seg: pydicom.Dataset, derived: list[pydicom.Dataset], labels: np.ndarray) -> None:
    """``seg`` segments the fail region (label 1) of ``labels`` on the ``derived`` planes, and
    nothing for the region that passed."""
    import highdicom as hd

    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == derived[0].SeriesInstanceUID
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["fail region(s)"]
    by_uid = {d.SOPInstanceUID: int(d.InstanceNumber) - 1 for d in derived}
    got = np.zeros(labels.shape, bool)
    for frame, groups in zip(hd.seg.Segmentation.from_dataset(seg).pixel_array, seg.PerFrameFunctionalGroupsSequence):
        got[:, :, by_uid[groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]] |= (
            frame.T.astype(bool))
    np.testing.assert_array_equal(got, labels == 1)


def dciodvfy_errors(path: Path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        return []  # the IOD check needs dicom3tools (tests/stores/install_services.sh); the rest still runs
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


def check_map(pm: pydicom.Dataset, derived: list[pydicom.Dataset], risk: np.ndarray) -> None:
    """``pm`` is a Parametric Map of ``risk`` on the planes of the ``derived`` series."""
    first = derived[0]
    assert pm.SOPClassUID == PM_SOP_CLASS
    assert (pm.StudyInstanceUID, pm.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
    (ref,) = pm.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == {d.SOPInstanceUID for d in derived}
    by_uid = {d.SOPInstanceUID: d for d in derived}
    frames = pm.pixel_array
    for f, groups in enumerate(pm.PerFrameFunctionalGroupsSequence):
        ds = by_uid[groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        np.testing.assert_allclose(frames[f], risk[:, :, int(ds.InstanceNumber) - 1].T, rtol=1e-6)
    assert frames.max() > 0


def _orthanc_file(server, instance_id: str) -> pydicom.Dataset:
    r = requests.get(f"{server.http_url}/instances/{instance_id}/file", auth=(server.username, server.password),
                     timeout=30)
    r.raise_for_status()
    return pydicom.dcmread(io.BytesIO(r.content))


def _qido(server, path: str, **params) -> list[dict]:
    r = requests.get(f"{server.http_url}/dicom-web/{path}", params=params, auth=(server.username, server.password),
                     headers={"Accept": "application/dicom+json"}, timeout=30)
    r.raise_for_status()
    return r.json() if r.content else []


def _value(record: dict, tag: str):
    return (record.get(tag) or {}).get("Value", [None])[0]


@pytest.mark.parametrize("protocol", ["dicomweb", "dimse"])
def test_risk_map_is_stored_as_parametric_map_in_the_derived_series_study(protocol, pacs_env, mr_in_pacs, tmp_path):
    if protocol == "dicomweb":
        store = PacsStore.from_url(dicomweb_url(pacs_env), extras_dir=str(tmp_path / "extras"))
    else:
        store = PacsStore.from_url(f"dimse://127.0.0.1:{pacs_env.dicom_port}", called_aet=pacs_env.aet,
                                   calling_aet=CLIENT_AET, extras_dir=str(tmp_path / "extras"))
    (item,) = store.list_items({"study_uid": mr_in_pacs["study"]})
    sr, extras, risk, labels = enhance_and_map(store.read(item), tmp_path / "audit")
    written = store.write(item, sr, f"run-map-{protocol}", extras=extras)
    study = mr_in_pacs["study"]
    derived_uid = written.uri.rsplit("/", 1)[-1]

    # QIDO-RS (independent of the code under test): four series in the study; each map is one instance
    series = {_value(s, "0020000E"): s for s in _qido(pacs_env, f"studies/{study}/series")}
    maps = set(series) - {mr_in_pacs["series"], derived_uid}
    assert len(series) == 4 and len(maps) == 2
    classes = {}
    for uid in maps:
        (instance,) = _qido(pacs_env, f"studies/{study}/series/{uid}/instances")
        classes[_value(instance, "00080016")] = uid
    assert set(classes) == {PM_SOP_CLASS, SEG_SOP_CLASS}

    orthanc_series = {s["MainDicomTags"]["SeriesInstanceUID"]: s for s in study_series(pacs_env, study)}
    derived = [_orthanc_file(pacs_env, i) for i in orthanc_series[derived_uid]["Instances"]]
    (pm_id,) = orthanc_series[classes[PM_SOP_CLASS]]["Instances"]
    pm = _orthanc_file(pacs_env, pm_id)
    check_map(pm, derived, risk)
    (seg_id,) = orthanc_series[classes[SEG_SOP_CLASS]]["Instances"]
    check_segmentation(_orthanc_file(pacs_env, seg_id), derived, labels)
    kept = Path(written.extras["risk.dcm"])  # copies beside the reports
    assert kept.is_file() and pydicom.dcmread(kept).SOPInstanceUID == pm.SOPInstanceUID
    assert dciodvfy_errors(kept) == [] and dciodvfy_errors(Path(written.extras["regions.seg.dcm"])) == []

    # the map series is no input; a re-run stores nothing new
    assert [i.id for i in store.list_items({"study_uid": study})] == [item.id]
    assert len(store.list_items({"study_uid": study, "include_derived": True})) == 4
    assert store.write(item, sr, f"run-map-{protocol}", extras=extras) == written
    assert len(study_series(pacs_env, study)) == 4


def test_local_store_puts_the_parametric_map_beside_the_derived_series(mri_block, tmp_path):
    make_mr_series(tmp_path / "in", mri_block)
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    sr, extras, risk, labels = enhance_and_map(store.read(item), tmp_path / "audit")
    written = store.write(item, sr, "run-local-map", extras=extras)
    folder = Path(written.uri)
    pm_path = Path(written.extras["risk.dcm"])
    assert pm_path == folder.with_name(folder.name + ".risk.dcm") and pm_path.is_file()
    derived = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    check_map(pydicom.dcmread(pm_path), derived, risk)
    assert dciodvfy_errors(pm_path) == []
    seg_path = Path(written.extras["regions.seg.dcm"])
    assert seg_path == folder.with_name(folder.name + ".regions.seg.dcm")
    check_segmentation(pydicom.dcmread(seg_path), derived, labels)
    assert dciodvfy_errors(seg_path) == []
    assert store.existing(item, "run-local-map") == written
    # the output folder is still one series, and a listing of the outputs skips the map
    assert read_dicom_series(folder).data.shape == (1, *risk.shape)
    dicom = [i for i in LocalStore(tmp_path / "out").list_items() if i.kind == "dicom"]
    assert len(dicom) == 1 and str(pm_path) not in dicom[0].meta["files"]


def test_a_risk_map_off_the_series_grid_is_left_out_not_fatal(mri_block, tmp_path, caplog):
    make_mr_series(tmp_path / "in", mri_block)
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    sr, extras, _, _ = enhance_and_map(store.read(item), tmp_path / "audit")
    shifted = sr.derive(sr.data, geometry=sr.geometry.cropped((1, 0, 0), sr.geometry.shape))  # one voxel off
    written = store.write(item, shifted, "run-off-grid", extras=extras)
    assert not {"risk.dcm", "regions.seg.dcm"} & set(written.extras) and "risk.nii.gz" in written.extras
    assert "not stored as a DICOM Parametric Map" in caplog.text and "reaches outside" in caplog.text
    assert "not stored as a DICOM Segmentation" in caplog.text
