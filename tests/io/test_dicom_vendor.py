"""DICOM as scanners write it: rounded oblique cosines, GE positions rounded to 0.1 mm, Siemens
mosaics and multi-volume series, a contrast CT's modules, a single slice; and the slice axis that
thick-slice models upsample."""
from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_series import (
    LPS_RAS,
    ge_rounded_series,
    header_series,
    oblique_ct_series,
    siemens_mosaic_series,
)
from pydicom.data import get_testdata_file

from domainsr.app.enhance import enhance_item
from domainsr.app.models import load_model, slice_axis_of
from domainsr.app.runs import config_from_model, plan_run
from domainsr.config import ModelRef
from domainsr.errors import GeometryError, InputError, UnsupportedFormatError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.io.dicom import list_series, read_dicom_series, stack_axis, write_derived_series


def _upsampled(img: SpatialImage, factors: tuple[int, int, int]) -> SpatialImage:
    """What a model gives: ``img`` on the grid scaled by ``factors`` (nearest-neighbour values)."""
    data = img.data[0].astype(np.float32)
    for axis, f in enumerate(factors):
        data = np.repeat(data, f, axis=axis)
    return img.derive(data[None], geometry=img.geometry.scaled(factors), step={"op": "test"})


def _headers(folder) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(folder.glob("*.dcm"))]


# ---------------------------------------------------------------------------------------------
# oblique series: cosines with 6 digits


def test_oblique_cosines_are_normalised_so_spacings_are_exact(tmp_path):
    truth = oblique_ct_series(tmp_path / "oblique", shape=(40, 36, 12))
    stored = pydicom.dcmread(next((tmp_path / "oblique").glob("*.dcm")), stop_before_pixels=True)
    col = np.asarray(stored.ImageOrientationPatient[3:], float)
    assert np.linalg.norm(col) == pytest.approx(1.0000004548, abs=1e-10)  # 6-digit cosines, not unit

    img = read_dicom_series(tmp_path / "oblique")
    assert img.geometry.spacing == pytest.approx((1.0, 1.0, 1.0), abs=1e-12)
    d = img.geometry.direction
    np.testing.assert_allclose(d.T @ d, np.eye(3), atol=1e-12)  # exactly orthonormal
    np.testing.assert_allclose(img.geometry.affine, truth["affine"], atol=1e-4)

    out = write_derived_series(_upsampled(img, (2, 2, 4)), tmp_path / "derived", model_name="t")
    for ds in _headers(out)[:3]:
        assert [str(v) for v in ds.PixelSpacing] == ["0.5", "0.5"]  # not 0.50000022741195
        assert str(ds.SpacingBetweenSlices) == "0.25" and str(ds.SliceThickness) == "0.25"
        assert np.linalg.norm(np.asarray(ds.ImageOrientationPatient[:3], float)) == pytest.approx(1, abs=1e-11)
    back = read_dicom_series(out)
    assert back.geometry.spacing == pytest.approx((0.5, 0.5, 0.25), abs=1e-12)
    np.testing.assert_allclose(back.geometry.affine, img.geometry.scaled((2, 2, 4)).affine, atol=1e-9)


def test_ct_slices_x4_upsamples_the_slice_axis_of_an_oblique_series(tmp_path):
    """80 slices of 80x80, 1 mm isotropic, 12 degrees oblique: float noise once made axis 1 'thickest'
    and ct-slices-x4 wrote 80 images of 320x80. The slice axis is the stacking axis."""
    oblique_ct_series(tmp_path / "oblique")
    img = read_dicom_series(tmp_path / "oblique")
    assert img.data.shape == (1, 80, 80, 80)
    assert stack_axis(img) == 2 and slice_axis_of(img) == 2
    module, ident = load_model(ModelRef(name="ct_slices_x4"), img)
    assert tuple(module.scale) == (1, 1, 4) and ident["scale"] == [1, 1, 4]
    # the stacking axis follows the geometry, whatever the array order
    moved = img.derive(np.ascontiguousarray(np.moveaxis(img.data, 3, 1)),
                       geometry=MedicalGeometry(img.geometry.affine[:, [2, 0, 1, 3]], (80, 80, 80)))
    assert stack_axis(moved) == 0 and slice_axis_of(moved) == 0


def test_ct_slices_x4_end_to_end_writes_more_slices_not_wider_ones(tmp_path):
    from domainsr.engine import PatchInferer, enhance_image

    oblique_ct_series(tmp_path / "oblique", shape=(24, 24, 6))
    img = read_dicom_series(tmp_path / "oblique")
    module, _ = load_model(ModelRef(name="ct_slices_x4"), img)
    sr = enhance_image(img, PatchInferer(module, device="cpu", threads=1))
    assert sr.data.shape == (1, 24, 24, 24)
    out = write_derived_series(sr, tmp_path / "derived", model_name="ct-slices-x4")
    headers = _headers(out)
    assert len(headers) == 24 and {(h.Rows, h.Columns) for h in headers} == {(24, 24)}
    assert str(headers[0].SpacingBetweenSlices) == "0.25" and [str(v) for v in headers[0].PixelSpacing] == ["1", "1"]


@pytest.mark.parametrize("spacing,axis", [
    ((1.0, 1.0000004548, 1.0), 2),          # rounding noise is no thicker slice: the last axis on a tie
    ((0.8, 0.8000001, 3.2), 2),
    ((3.0000001, 0.7, 3.0), 2),
    ((3.2, 0.8, 0.8), 0),
])
def test_slice_axis_of_other_volumes_is_the_thickest_robust_to_rounding(spacing, axis):
    img = SpatialImage(np.zeros((1, 4, 5, 6), np.float32), "mri", MedicalGeometry(np.diag([*spacing, 1.0]), (4, 5, 6)))
    assert stack_axis(img) is None and slice_axis_of(img) == axis


def test_slice_axis_of_a_single_slice_is_refused():
    img = read_dicom_series(get_testdata_file("CT_small.dcm"))
    with pytest.raises(InputError, match="single slice"):
        slice_axis_of(img)


# ---------------------------------------------------------------------------------------------
# GE: positions rounded to 0.1 mm


def test_ge_positions_rounded_to_a_tenth_are_read_with_a_warning(tmp_path, caplog):
    truth = ge_rounded_series(tmp_path / "ge")
    headers = sorted(_headers(tmp_path / "ge"), key=lambda h: int(h.InstanceNumber))
    iop = np.asarray(headers[0].ImageOrientationPatient, float)
    gaps = np.diff([np.asarray(h.ImagePositionPatient, float) @ np.cross(iop[:3], iop[3:]) for h in headers])
    assert gaps.min() == pytest.approx(6.96, abs=0.005) and gaps.max() == pytest.approx(7.07, abs=0.005)
    assert np.abs(gaps - np.median(gaps)).max() > 0.01 * np.median(gaps)  # beyond the 1 % gap tolerance

    with caplog.at_level(logging.WARNING, logger="domainsr"):
        img = read_dicom_series(tmp_path / "ge")
    assert img.geometry.spacing[2] == pytest.approx(7.0, abs=1e-12)  # the simplest value the positions allow
    np.testing.assert_allclose(img.geometry.affine, truth["affine"], atol=0.1)
    warned = [r.getMessage() for r in caplog.records if r.name == "domainsr.io.dicom"]
    assert len(warned) == 1 and "gaps spread 6.958-7.067 mm" in warned[0] and "0.1 mm" in warned[0]
    assert warned[0].startswith("DICOM series #1:") and str(tmp_path) not in warned[0]  # no path in logs


@pytest.mark.parametrize("change,match", [({"skip": 11}, "missing 1 slice"),
                                          ({"shift": {k: 0.6 for k in range(12, 24)}}, "non-uniform")])
def test_ge_rounding_tolerance_still_refuses_true_gaps(tmp_path, change, match):
    ge_rounded_series(tmp_path / "ge_bad", **change)
    with pytest.raises(GeometryError, match=match) as err:
        read_dicom_series(tmp_path / "ge_bad")
    assert "ge_bad" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Siemens mosaics and multi-volume series


def test_siemens_mosaic_is_read_as_its_volume(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        from nibabel.nicom import dicomwrappers
    built = siemens_mosaic_series(tmp_path / "mosaic", names=("siemens_dwi_0.dcm.gz",))
    (path,) = built["files"]
    img = read_dicom_series(path)
    assert img.domain == "mri" and img.data.shape == (1, 128, 128, 48)  # not one 896x896 image
    np.testing.assert_array_equal(img.data[0], built["blocks"][0])  # each tile is its slice
    wrapper = dicomwrappers.wrapper_from_data(pydicom.dcmread(path))
    expected = LPS_RAS @ wrapper.affine[:, [1, 0, 2, 3]]  # nibabel indexes (row, column, slice)
    np.testing.assert_allclose(img.geometry.affine, expected, atol=1e-4)
    assert img.geometry.spacing == pytest.approx((1.796875, 1.796875, 3.0), abs=1e-12)
    dm = img.meta["dicom"]
    assert set(dm["sop_instance_uids"]) == {str(pydicom.dcmread(path).SOPInstanceUID)} and dm["volume"] is None
    out = write_derived_series(_upsampled(img, (1, 1, 2)), tmp_path / "derived", model_name="t")
    first = pydicom.dcmread(next(out.glob("*.dcm")))
    assert (first.Rows, first.Columns) == (128, 128) and "MOSAIC" not in first.ImageType
    assert len(first.SourceImageSequence) == 1  # the mosaic once, not once per tile
    assert (0x0029, 0x1010) not in first  # the CSA header describes the mosaic, not the derived slices
    np.testing.assert_array_equal(read_dicom_series(out).data[0], np.repeat(built["blocks"][0], 2, axis=2))


def test_multi_volume_series_is_one_item_per_volume(tmp_path):
    folder = tmp_path / "dwi"
    built = siemens_mosaic_series(folder)
    listing = list_series(folder)
    assert [(s.volume, s.n_volumes, s.volume_label.split()[0], s.n_frames) for s in listing] == [
        (0, 2, "b=0", 48), (1, 2, "b=1000", 48)]
    assert len({s.series_uid for s in listing}) == 1
    assert [s.files for s in listing] == [(built["files"][0],), (built["files"][1],)]
    with pytest.raises(UnsupportedFormatError, match="multi-volume series: 2 volumes") as err:
        read_dicom_series(folder)
    assert "duplicate" not in str(err.value) and "b=1000" in str(err.value) and "dwi" in str(err.value)
    b1000 = read_dicom_series(folder, volume=1)
    np.testing.assert_array_equal(b1000.data[0], built["blocks"][1])
    np.testing.assert_array_equal(read_dicom_series(folder, volume=0).data[0], built["blocks"][0])
    alone = read_dicom_series(listing[1].files, volume=1)  # a listed volume's own files hold just it
    np.testing.assert_array_equal(b1000.data, alone.data)
    assert b1000.meta["dicom"]["volume_label"].startswith("b=1000")
    with pytest.raises(InputError, match="volume 2 is not among"):
        read_dicom_series(folder, volume=2)
    out = write_derived_series(b1000, tmp_path / "derived", model_name="t")
    assert "volume b=1000" in pydicom.dcmread(next(out.glob("*.dcm"))).DerivationDescription


def test_classic_time_series_splits_by_temporal_position(tmp_path):
    folder = tmp_path / "dynamic"
    header_series(folder / "t1", "MR_small.dcm", n_slices=4, gap=3.0)
    uid = pydicom.dcmread(next((folder / "t1").glob("*.dcm"))).SeriesInstanceUID
    for f in (folder / "t1").glob("*.dcm"):  # the same slices again as time point 2
        ds = pydicom.dcmread(f)
        ds.TemporalPositionIdentifier = 1
        ds.save_as(f)
        ds.TemporalPositionIdentifier = 2
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.PixelData = (np.frombuffer(ds.PixelData, "<u2") // 2).astype("<u2").tobytes()
        ds.save_as(folder / f"t2_{f.name}")
    listing = list_series(folder)
    assert [s.volume_label for s in listing] == ["time point 1", "time point 2"]
    assert {s.series_uid for s in listing} == {uid} and all(s.n_frames == 4 for s in listing)
    one, two = (read_dicom_series(folder, volume=v) for v in (0, 1))
    np.testing.assert_array_equal(one.data // 2, two.data)
    assert one.geometry.almost_equal(two.geometry)


# ---------------------------------------------------------------------------------------------
# the contrast CT (pydicom's CT_small.dcm): every module that still applies, nothing added


STUDY_PATIENT = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge", "PatientWeight",
                 "OtherPatientIDsSequence", "AdditionalPatientHistory", "StudyInstanceUID", "StudyDate",
                 "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName", "StudyDescription")


def test_contrast_ct_keeps_its_modules(tmp_path):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    img = read_dicom_series(get_testdata_file("CT_small.dcm"))
    out = write_derived_series(_upsampled(img, (2, 2, 1)), tmp_path / "derived", model_name="t")
    ds = pydicom.dcmread(next(out.glob("*.dcm")))
    for kw in ("ContrastBolusAgent", "ContrastBolusRoute", "Laterality", "AdditionalPatientHistory",
               "KVP", "ConvolutionKernel", "ExposureTime", "XRayTubeCurrent", "PatientPosition",
               "FrameOfReferenceUID", "PositionReferenceIndicator", "Manufacturer", "TimezoneOffsetFromUTC"):
        assert kw in ds and ds[kw].value == src[kw].value, kw
    for kw in STUDY_PATIENT:  # same values, same encoding (PatientWeight "0.000000", not "0.0")
        assert ds[kw].value == src[kw].value, kw
        assert getattr(ds[kw].value, "original_string", None) == getattr(src[kw].value, "original_string", None), kw
    assert "PixelPaddingValue" not in ds  # the stored values no longer use the source's padding value
    assert [s.ReferencedSOPInstanceUID for s in ds.SourceImageSequence] == [src.SOPInstanceUID]


def test_derived_series_adds_no_study_attribute_the_source_lacks(tmp_path):
    folder = tmp_path / "mr"
    header_series(folder, "MR_small.dcm", n_slices=4, gap=3.0)
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        del ds.ReferringPhysicianName, ds.AccessionNumber, ds.PatientBirthDate
        ds.save_as(f)
    img = read_dicom_series(folder)
    out = write_derived_series(_upsampled(img, (1, 1, 2)), tmp_path / "derived", model_name="t")
    for ds in _headers(out):
        assert not {"ReferringPhysicianName", "AccessionNumber", "PatientBirthDate", "ContrastBolusRoute"} & set(ds.dir())
        assert ds.ContrastBolusAgent == ""  # present and empty in the source (Type 2): kept so


# ---------------------------------------------------------------------------------------------
# a single slice is 2D


def test_single_slice_is_scaled_in_plane_only(tmp_path):
    src = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    img = read_dicom_series(get_testdata_file("CT_small.dcm"))
    out = write_derived_series(_upsampled(img, (2, 2, 1)), tmp_path / "derived", model_name="t")
    (ds,) = _headers(out)
    assert (ds.Rows, ds.Columns) == (256, 256)
    assert float(ds.SliceThickness) == float(src.SliceThickness) == 5.0  # not 2.5
    assert [float(v) for v in ds.PixelSpacing] == [float(v) / 2 for v in src.PixelSpacing]
    with pytest.raises(GeometryError, match="single slice"):
        write_derived_series(_upsampled(img, (2, 2, 2)), tmp_path / "twice", model_name="t")
    assert not (tmp_path / "twice").exists()


def test_a_multi_volume_series_is_a_batch_of_one_item_per_volume(tmp_path):
    """Through the folder store and the enhance pipeline: each volume is its own item with its own
    output; none is read as duplicates of another."""
    from domainsr.stores.local import LocalStore

    folder = tmp_path / "dwi"
    built = siemens_mosaic_series(folder)
    store = LocalStore([str(folder)], output=str(tmp_path / "out"))
    items = store.list_items()
    assert len(items) == 2 and [i.id.rsplit("-", 1)[1] for i in items] == ["v0", "v1"]
    spec = plan_run(config_from_model("nearest", "1,1,2").model_copy(update={"run_audit": False}))
    results = [enhance_item(store, item, spec) for item in items]
    assert [r.status for r in results] == ["enhanced", "enhanced"], [r.message for r in results]
    for result, block in zip(results, built["blocks"]):
        np.testing.assert_array_equal(read_dicom_series(result.output).data[0], np.repeat(block, 2, axis=2))


def test_scale_2_on_a_single_slice_enhances_it_in_plane(tmp_path):
    """``--scale 2`` on one DICOM slice: one derived slice of twice the rows and columns (it used
    to write two identical slices of half the thickness)."""
    import shutil

    from domainsr.stores.local import LocalStore

    (tmp_path / "in").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), tmp_path / "in" / "slice.dcm")
    store = LocalStore([str(tmp_path / "in")], output=str(tmp_path / "out"))
    (item,) = store.list_items()
    spec = plan_run(config_from_model("cubic", 2).model_copy(update={"run_audit": False}))
    result = enhance_item(store, item, spec)
    assert result.status == "enhanced", result.message
    (ds,) = _headers(Path(result.output))
    assert (ds.Rows, ds.Columns, float(ds.SliceThickness)) == (256, 256, 5.0)
    prov = json.loads(Path(result.output + ".provenance.json").read_text())
    assert prov["provenance"]["history"][-1]["scale"] == [2, 2, 1]
