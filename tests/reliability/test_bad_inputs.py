"""A table of bad inputs: each is refused by ``read_image`` with a DomainSRError naming the file,
or (NaN/Inf, all-nodata rasters) read with the bad pixels masked instead of crashing."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from rasterio.transform import from_origin

from domainsr.errors import (
    DomainSRError,
    GeometryError,
    InputError,
    ResourceLimitError,
    UnsupportedFormatError,
)
from domainsr.io import read_image
from domainsr.limits import ENV_VAR

_spec = importlib.util.spec_from_file_location(
    "_reliability_dicom_helpers", Path(__file__).parents[1] / "io" / "test_dicom.py")
_dicom = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_dicom)  # reuse make_ct_series (synthetic oblique CT series) from tests/io


def _truncated(src: Path, dst: Path, keep: float) -> Path:
    raw = src.read_bytes()
    dst.write_bytes(raw[: int(len(raw) * keep)])
    return dst


def _text(dst: Path) -> Path:
    dst.write_text("this is not an image\n" * 20)
    return dst


def _absurd_nifti(dst: Path, header: type = nib.Nifti1Header,
                  shape: tuple[int, ...] = (32000, 32000, 1000)) -> Path:
    """A valid single-file NIfTI header claiming a terabyte-sized ``shape`` (NIfTI-1 dims are int16,
    NIfTI-2 int64), then 64 bytes of data."""
    hdr = header()
    hdr.set_data_dtype(np.uint8)
    hdr.set_data_shape(shape)
    hdr["vox_offset"] = hdr.sizeof_hdr + 4  # header + empty extension flag
    dst.write_bytes(hdr.binaryblock + b"\0" * 4 + b"\1" * 64)
    return dst


def _no_crs(dst: Path) -> Path:
    data = np.arange(32 * 24, dtype=np.uint16).reshape(1, 32, 24)
    with rasterio.open(dst, "w", driver="GTiff", dtype="uint16", count=1, height=32, width=24,
                       transform=from_origin(500000, 4000000, 10, 10)) as out:
        out.write(data)
    return dst


def _dicom_series(folder: Path, kind: str) -> Path:
    block = _mni_block()
    if kind == "missing":
        _dicom.make_ct_series(folder, block, skip=block.shape[2] // 2)
    elif kind == "orientation":
        _dicom.make_ct_series(folder, block, tilt_slice=3)
    elif kind == "duplicate":  # the same position twice under a new SOP instance UID
        ds = _dicom.make_ct_series(folder, block)["datasets"][0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / "copy.dcm", enforce_file_format=True)
    else:
        for ds in _dicom.make_ct_series(folder, block)["datasets"]:
            if kind == "spacing" and ds.InstanceNumber > block.shape[2] // 2:  # upper half 0.4 gap further
                normal = np.cross(*np.reshape(ds.ImageOrientationPatient, (2, 3)))
                ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient + 0.4 * _dicom.GAP * normal]
            elif kind == "modality" and ds.InstanceNumber == 2:
                ds.Modality = "MR"
            ds.save_as(ds.filename, enforce_file_format=True)
    return folder


def _nifti_of(dst: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0])), dst)
    return dst


def _rgb_voxels() -> np.ndarray:
    return np.zeros((6, 5, 4), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])


def _complex_tif(dst: Path) -> Path:
    with rasterio.open(dst, "w", driver="GTiff", dtype="complex64", count=1, height=8, width=8, crs="EPSG:32618",
                       transform=from_origin(500000, 4000000, 10, 10)) as out:
        out.write(np.ones((1, 8, 8), np.complex64))
    return dst


def _huge_sparse_tif(dst: Path) -> Path:
    """A valid tiled BigTIFF of 10^6 x 10^6 uint16 pixels (2 TB decoded) with no tile written: 0.7 MB."""
    with rasterio.open(dst, "w", driver="GTiff", dtype="uint16", count=1, height=10**6, width=10**6,
                       crs="EPSG:32618", transform=from_origin(500000, 4000000, 10, 10), tiled=True,
                       blockxsize=4096, blockysize=4096, sparse_ok=True, BIGTIFF="YES"):
        pass
    return dst


def _inflating_nifti_gz(dst: Path) -> Path:
    """A 1.1 MB .nii.gz that decodes to 256 MiB (int16 volume of mostly zeros)."""
    vol = np.zeros((512, 512, 512), np.int16)
    vol[200:300, 200:300, 200:300] = np.arange(100, dtype=np.int16)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), dst)
    return dst


def _corrupt_element(dst: Path, tag: bytes, new: bytes) -> Path:
    """CT_small.dcm (explicit VR little endian) with the bytes after ``tag`` replaced by ``new``:
    pydicom parses element values lazily, so the damage shows only when the reader touches it."""
    raw = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    at = raw.index(tag) + len(tag)
    dst.write_bytes(raw[:at] + new + raw[at + len(new):])
    return dst


def _mni_block() -> np.ndarray:
    from nilearn.datasets import MNI152_FILE_PATH

    vol = np.asanyarray(nib.load(MNI152_FILE_PATH).dataobj)
    return vol[70:70 + _dicom.NI, 90:90 + _dicom.NJ, 80:80 + 8].astype(np.uint16) * 12


#: name -> (make the bad input in a folder, the DomainSRError subclass it must raise). Every case
#: is read under a memory budget of BUDGET_GB.
CASES: dict[str, tuple] = {
    "truncated .nii": (lambda t, r: _truncated(r["nii"], t / "cut.nii", 0.6), InputError),
    "truncated .nii header": (lambda t, r: _truncated(r["nii"], t / "cuthead.nii", 0.001), InputError),
    "truncated .nii.gz": (lambda t, r: _truncated(r["niigz"], t / "cut.nii.gz", 0.5), InputError),
    "text named .nii": (lambda t, r: _text(t / "notes.nii"), InputError),
    "text named .nii.gz": (lambda t, r: _text(t / "notes.nii.gz"), InputError),
    "text named .tif": (lambda t, r: _text(t / "notes.tif"), InputError),
    "text named .jp2": (lambda t, r: _text(t / "notes.jp2"), InputError),
    "text named .dcm": (lambda t, r: _text(t / "notes.dcm"), InputError),
    "truncated GeoTIFF": (lambda t, r: _truncated(r["tif"], t / "cut.tif", 0.5), InputError),
    "GeoTIFF header only": (lambda t, r: _truncated(r["tif"], t / "head.tif", 0.02), InputError),
    "truncated JPEG 2000": (lambda t, r: _truncated(r["jp2"], t / "cut.jp2", 0.7), InputError),
    "JPEG 2000 header only": (lambda t, r: _truncated(r["jp2"], t / "head.jp2", 0.1), InputError),
    "raster without CRS": (lambda t, r: _no_crs(t / "nocrs.tif"), GeometryError),
    "GeoTIFF of complex64 pixels": (lambda t, r: _complex_tif(t / "complex.tif"), UnsupportedFormatError),
    "NIfTI of complex64 voxels": (lambda t, r: _nifti_of(t / "complex.nii", np.ones((6, 5, 4), np.complex64)),
                                  UnsupportedFormatError),
    "NIfTI of RGB24 voxels": (lambda t, r: _nifti_of(t / "rgb.nii", _rgb_voxels()), UnsupportedFormatError),
    "NIfTI-1 with absurd dims": (lambda t, r: _absurd_nifti(t / "huge.nii"), InputError),
    "NIfTI-2 with 10^6 x 10^6 x 10^3 dims": (lambda t, r: _absurd_nifti(
        t / "huge2.nii", nib.Nifti2Header, (10**6, 10**6, 10**3)), InputError),
    "GeoTIFF of 10^6 x 10^6 pixels (sparse)": (lambda t, r: _huge_sparse_tif(t / "huge.tif"), ResourceLimitError),
    ".nii.gz inflating past the budget": (lambda t, r: _inflating_nifti_gz(t / "bomb.nii.gz"), ResourceLimitError),
    # found by test_fuzz_readers (NotImplementedError / ValueError escaped the DICOM reader)
    "DICOM unknown VR in Modality": (lambda t, r: _corrupt_element(
        t / "vr_modality.dcm", b"\x08\x00\x60\x00", b"C\xc0"), InputError),
    "DICOM unknown VR in PatientSex": (lambda t, r: _corrupt_element(
        t / "vr_sex.dcm", b"\x10\x00\x40\x00", b"Cf"), InputError),
    "DICOM non-numeric PixelSpacing": (lambda t, r: _corrupt_element(
        t / "spacing.dcm", b"\x28\x00\x30\x00DS\x12\x00", b"0.6\xf0"), InputError),
    "DICOM series missing middle slice": (lambda t, r: _dicom_series(t / "series_missing", "missing"),
                                          GeometryError),
    "DICOM series duplicated slice": (lambda t, r: _dicom_series(t / "series_dup", "duplicate"), GeometryError),
    "DICOM series two orientations": (lambda t, r: _dicom_series(t / "series_tilt", "orientation"), GeometryError),
    "DICOM series non-uniform spacing": (lambda t, r: _dicom_series(t / "series_spacing", "spacing"), GeometryError),
    "DICOM series mixing CT and MR": (lambda t, r: _dicom_series(t / "series_modality", "modality"), GeometryError),
}
BUDGET_GB = 0.125


@pytest.fixture(scope="module")
def real(small_nifti, small_nifti_gz, small_geotiff, small_jp2):
    return {"nii": small_nifti, "niigz": small_nifti_gz, "tif": small_geotiff, "jp2": small_jp2}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_refused_naming_the_file(case, tmp_path, real, monkeypatch, tally):
    make, expected = CASES[case]
    path = make(tmp_path, real)
    monkeypatch.setenv(ENV_VAR, str(BUDGET_GB))
    tally("bad inputs tried")
    with pytest.raises(DomainSRError) as err:
        read_image(path)
    assert path.name in str(err.value), f"{case}: message does not name the file: {err.value}"
    assert isinstance(err.value, expected), f"{case}: {type(err.value).__name__}: {err.value}"


def _float_raster(path: Path, data: np.ndarray, nodata: float | None) -> Path:
    with rasterio.open(path, "w", driver="GTiff", dtype=data.dtype.name, count=data.shape[0],
                       height=data.shape[1], width=data.shape[2], crs="EPSG:32618", nodata=nodata,
                       transform=from_origin(500000, 4000000, 10, 10)) as out:
        out.write(data)
    return path


def test_float_raster_with_nan_and_inf_reads_masked(tmp_path, small_geotiff):
    with rasterio.open(small_geotiff) as src:
        data = src.read().astype(np.float32) / 10000.0
    bad = np.zeros(data.shape[1:], bool)
    bad[3, 4] = bad[10, 0] = bad[47, 39] = True
    data[0, 3, 4], data[0, 10, 0], data[0, 47, 39] = np.nan, np.inf, -np.inf
    img = read_image(_float_raster(tmp_path / "nan_inf.tif", data, None))
    np.testing.assert_array_equal(img.valid_mask(), ~bad)
    np.testing.assert_allclose(np.asarray(img.data)[0][~bad], data[0][~bad])


def test_all_nodata_raster_reads_fully_masked(tmp_path):
    data = np.full((1, 16, 12), -9999.0, np.float32)
    img = read_image(_float_raster(tmp_path / "empty.tif", data, -9999.0))
    assert img.valid_mask().shape == (16, 12) and not img.valid_mask().any()
