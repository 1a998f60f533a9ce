"""One unattended batch over every awkward input at once (the enhancement flow under Prefect):
every bad input fails alone with a typed error naming its file and leaves no output; inputs with a
documented handling (gantry tilt, rotated geotransform, NaN/Inf) are enhanced as documented; an
all-nodata raster is refused before any work; the good items come out as if they were alone."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import yaml
from rasterio.transform import Affine

from domainsr import errors
from domainsr.io import read_image
from domainsr.io.dicom import read_dicom_series
from domainsr.io.raster import read_raster
from domainsr.stores.local import LocalStore

_spec = importlib.util.spec_from_file_location("_bad_input_cases", Path(__file__).with_name("test_bad_inputs.py"))
_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_cases)
_dicom = _cases._dicom

TILT_DEG = 15.0


def _tilted_ct_series(folder: Path) -> Path:
    """An oblique CT series acquired with a tilted gantry: each slice is shifted along the column
    direction by ``k * gap * tan(tilt)``, as scanners store tilted acquisitions."""
    block = _cases._mni_block()
    for ds in _dicom.make_ct_series(folder, block)["datasets"]:
        col = np.asarray(ds.ImageOrientationPatient[3:], float)
        k = ds.InstanceNumber - 1
        ds.ImagePositionPatient = [float(v) for v in
                                   np.asarray(ds.ImagePositionPatient, float) + k * _dicom.GAP * np.tan(
                                       np.deg2rad(TILT_DEG)) * col]
        ds.GantryDetectorTilt = TILT_DEG
        ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def _raster(path: Path, data: np.ndarray, transform: Affine, nodata: float | None = None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", dtype=data.dtype.name, count=data.shape[0], height=data.shape[1],
                       width=data.shape[2], crs="EPSG:32618", transform=transform, nodata=nodata) as out:
        out.write(data)
    return path


@pytest.fixture(scope="module")
def night(prefect_home, small_geotiff, small_nifti, small_nifti_gz, small_jp2, tmp_path_factory):
    """The folder, the flow's summary, and what each input was."""
    root = tmp_path_factory.mktemp("night")
    inbox, out = root / "inbox", root / "out"
    inbox.mkdir()
    real = {"nii": small_nifti, "niigz": small_nifti_gz, "tif": small_geotiff, "jp2": small_jp2}
    bad = {}
    for n, (case, (make, expected)) in enumerate(_cases.CASES.items()):
        folder = inbox / f"bad{n:02d}"
        folder.mkdir()
        bad[case] = (make(folder, real), expected)
    with rasterio.open(small_geotiff) as src:
        pixels, transform = src.read(), src.transform
    refl = pixels.astype(np.float32) / 10000
    refl[0, 5, 5], refl[0, 20, 30], refl[0, 40, 2] = np.nan, np.inf, -np.inf
    handled = {
        "good nifti": inbox / "good" / "brain.nii.gz",
        "good geotiff": inbox / "good" / "scene.tif",
        "rotated geotransform": _raster(inbox / "rotated.tif", pixels,
                                        transform * Affine.rotation(25.0)),
        "NaN and Inf": _raster(inbox / "nan_inf.tif", refl, transform),
        "gantry tilt": _tilted_ct_series(inbox / "tilted_ct"),
    }
    handled["good nifti"].parent.mkdir()
    handled["good nifti"].write_bytes(small_nifti_gz.read_bytes())
    handled["good geotiff"].write_bytes(small_geotiff.read_bytes())
    empty = _raster(inbox / "empty.tif", np.full((1, 32, 24), -9999.0, np.float32), transform, nodata=-9999.0)
    config = root / "night.yaml"
    config.write_text(yaml.safe_dump({
        "name": "night-batch", "model": {"name": "cubic", "scale": 2},
        "runner": {"memory_budget_gb": _cases.BUDGET_GB, "retries": 0},
    }))
    from flows.enhance import enhance_flow

    state = enhance_flow(config=str(config), inputs=[str(inbox)], out=str(out), return_state=True)
    summary = state.result(raise_on_failure=False)
    items = {i.id: i for i in LocalStore(inbox).list_items()}
    return {"state": state, "summary": summary, "out": out, "bad": bad, "handled": handled, "items": items,
            "empty": empty}


def _files_of(item) -> set[str]:
    return {str(Path(f).resolve()) for f in item.meta.get("files", [item.uri])}


def _item_of(night, path: Path) -> str:
    """The id of the item a bad input (file or series folder) became."""
    target = {str(p.resolve()) for p in (path.rglob("*.dcm") if path.is_dir() else [path])}
    ids = {i for i, item in night["items"].items() if _files_of(item) & target}
    assert len(ids) == 1, (path, ids)
    return ids.pop()


def test_every_bad_input_fails_alone_with_a_typed_error_and_leaves_no_output(night, tally):
    rows = {r["item_id"]: r for r in night["summary"]["items"]}
    out = night["out"]
    for case, (path, expected) in night["bad"].items():
        tally("bad inputs tried")
        row = rows[_item_of(night, path)]
        assert row["status"] == "failed", (case, row)
        assert issubclass(getattr(errors, row["error"]), errors.DomainSRError), (case, row["error"])
        if path.is_file() and not case.startswith("DICOM"):  # DICOM items are named by their series id only
            assert path.name in row["message"] or row["item_id"] in row["message"], (case, row["message"])
        assert not [p for p in out.iterdir() if p.name.startswith(row["item_id"])], case
    # a CT_small copy corrupted three ways shares one series: the three files are one failed item
    failed = {i for i, r in rows.items() if r["status"] == "failed"}
    empty = next(i for i, it in night["items"].items() if Path(it.uri) == night["empty"])
    assert failed == {_item_of(night, p) for p, _ in night["bad"].values()} | {empty}
    assert night["state"].is_failed()
    assert night["summary"]["enhanced"] == len(night["handled"]) and night["summary"]["skipped"] == 0


def test_an_all_nodata_raster_is_refused_before_any_work(night):
    row = next(r for r in night["summary"]["items"] if r["item_id"] == "empty")
    assert row["status"] == "failed" and row["error"] == "InputError"
    assert "every pixel is nodata" in row["message"]
    assert not [p for p in night["out"].iterdir() if p.name.startswith("empty")]


def test_bad_inputs_raise_their_expected_error_types_in_the_batch(night):
    rows = {r["item_id"]: r for r in night["summary"]["items"]}
    for case, (path, expected) in night["bad"].items():
        row = rows[_item_of(night, path)]
        if case.startswith("DICOM") and "series" not in case:
            continue  # grouped with the other corrupt copies of CT_small: the first error found is reported
        assert issubclass(getattr(errors, row["error"]), expected), (case, row["error"], row["message"])


def _output(night, key: str) -> str:
    rows = {r["item_id"]: r for r in night["summary"]["items"]}
    path = night["handled"][key]
    row = rows[_item_of(night, path) if path.is_dir() else next(
        i for i, it in night["items"].items() if Path(it.uri) == path)]
    assert row["status"] == "enhanced", (key, row)
    return row["output"]


def test_rotated_geotransform_is_preserved(night):
    src = read_raster(night["handled"]["rotated geotransform"])
    sr = read_raster(_output(night, "rotated geotransform"))
    assert sr.geometry.is_rotated
    np.testing.assert_allclose(np.asarray(sr.geometry.transform)[:6],
                               np.asarray(src.geometry.transform * Affine.scale(0.5))[:6], atol=1e-9)
    np.testing.assert_allclose(sr.geometry.bounds, src.geometry.bounds, atol=1e-6)


def test_nan_and_inf_are_masked_never_invented(night):
    sr = read_raster(_output(night, "NaN and Inf"))
    valid = sr.valid_mask()
    data = np.asarray(sr.data, np.float64)
    assert np.isfinite(data[:, valid]).all()
    for r, c in ((5, 5), (20, 30), (40, 2)):  # each bad LR pixel's 2x2 block is invalid
        assert not valid[2 * r:2 * r + 2, 2 * c:2 * c + 2].any()
    assert valid.mean() > 0.99


def test_gantry_tilt_is_kept_as_a_sheared_grid_through_the_derived_series(night, tmp_path):
    src = read_dicom_series(night["handled"]["gantry tilt"])
    a = src.geometry.affine[:3, :3]
    tilt = np.degrees(np.arccos(abs(np.cross(a[:, 0], a[:, 1]) @ a[:, 2]) / (
        np.linalg.norm(np.cross(a[:, 0], a[:, 1])) * np.linalg.norm(a[:, 2]))))
    assert tilt == pytest.approx(TILT_DEG, abs=1e-3)  # the slice step leans by the gantry tilt
    out = Path(_output(night, "gantry tilt"))
    sr = read_dicom_series(out)
    np.testing.assert_allclose(sr.geometry.affine, src.geometry.scaled((2, 2, 2)).affine, atol=1e-3)
    record = json.loads(out.with_name(out.name + ".provenance.json").read_text())
    assert record["complete"]
    import pydicom

    ds = pydicom.dcmread(next(out.glob("*.dcm")), stop_before_pixels=True)
    assert float(ds.GantryDetectorTilt) == pytest.approx(TILT_DEG)
    assert "DERIVED" in ds.ImageType
    from domainsr.io.nifti import read_nifti, write_nifti

    nii = write_nifti(sr, tmp_path / "tilted.nii.gz")  # the shear survives in the sform
    np.testing.assert_allclose(read_nifti(nii, domain="ct").geometry.affine, sr.geometry.affine, atol=1e-5)


def test_good_items_come_out_as_if_alone(night, tmp_path):
    from domainsr.app.enhance import enhance_item
    from domainsr.app.runs import config_from_model, plan_run

    spec = plan_run(config_from_model("cubic", 2))
    for key in ("good nifti", "good geotiff"):
        alone = LocalStore([str(night["handled"][key])], output=str(tmp_path / key.replace(" ", "_")))
        item = alone.list_items()[0]
        expect = read_image(enhance_item(alone, item, spec).output)
        np.testing.assert_array_equal(np.asarray(read_image(_output(night, key)).data), np.asarray(expect.data))
