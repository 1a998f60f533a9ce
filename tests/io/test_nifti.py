"""NIfTI reading/writing: exact round trips, scaling, changed geometry, bad input."""
from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from domainsr.errors import DomainSRError, InputError, OutputError
from domainsr.image import MedicalGeometry
from domainsr.io.nifti import DERIVED_DESCRIP, read_nifti, write_nifti


@pytest.fixture(scope="module")
def mni_path() -> Path:
    from nilearn.datasets import MNI152_FILE_PATH

    return Path(MNI152_FILE_PATH)


def _raw_header(path: Path) -> nib.Nifti1Header:
    """The header as stored (``nib.load`` moves scl_slope/inter out of ``img.header``)."""
    with nib.openers.ImageOpener(path) as fobj:
        return nib.Nifti1Header.from_fileobj(fobj)


def _header_diff(path_a: Path, path_b: Path) -> list[str]:
    """Names of the stored header fields that differ between two files (NaN equals NaN)."""
    a, b = _raw_header(path_a), _raw_header(path_b)
    diff = []
    for key in a:
        x, y = np.asarray(a[key]), np.asarray(b[key])
        if x.dtype.kind == "f":
            if not np.array_equal(x, y, equal_nan=True):
                diff.append(key)
        elif not np.array_equal(x, y):
            diff.append(key)
    return diff


def _oblique(zooms, shift) -> np.ndarray:
    a = np.deg2rad(17.0)
    rot = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0], [-np.sin(a), 0, np.cos(a)]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(zooms)
    aff[:3, 3] = shift
    return aff


@pytest.fixture()
def scaled_int16(tmp_path) -> tuple[Path, np.ndarray]:
    """int16 file with scl_slope/inter, an oblique sform (code 4) and a different qform (code 1)."""
    raw = np.random.default_rng(1).integers(-3000, 3000, size=(10, 12, 7), dtype=np.int16)
    hdr = nib.Nifti1Header()
    hdr.set_data_dtype(np.int16)
    img = nib.Nifti1Image(raw, None, header=hdr)
    img.header.set_sform(_oblique((0.9, 1.1, 3.0), (-40.0, 12.5, 7.25)), code=4)
    img.header.set_qform(_oblique((0.9, 1.1, 3.0), (-39.0, 12.0, 7.0)), code=1)
    img.header.set_slope_inter(0.5, -10.0)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"synthetic scaled"
    img.header.set_intent("estimate", name="est")
    path = tmp_path / "scaled_int16.nii"
    img.to_filename(path)
    return path, raw


def test_mni_round_trip_is_exact(mni_path, tmp_path):
    src = nib.load(mni_path)
    img = read_nifti(mni_path)
    assert img.data.shape == (1, 197, 233, 189) and img.data.dtype == np.uint8
    assert img.meta["storage_dtype"] == "uint8" and img.units == "a.u." and img.domain == "mri"
    assert img.meta["nifti"]["sform_code"] == 2 and img.meta["nifti"]["qform_code"] == 0
    np.testing.assert_array_equal(img.geometry.affine, src.affine)
    np.testing.assert_array_equal(img.data[0], np.asanyarray(src.dataobj))
    assert img.provenance["source"] == str(mni_path) and img.provenance["format"] == "nifti"

    out = write_nifti(img, tmp_path / "mni_copy.nii.gz")
    back = nib.load(out)
    # the sform bit for bit; the unset qform (code 0) is filled in from it, "unknown" units say mm
    assert set(_header_diff(mni_path, out)) == {"qform_code", "xyzt_units"}
    hdr = back.header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 2) and hdr.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(hdr.get_qform(), hdr.get_sform(), atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(src.dataobj))
    again = read_nifti(out)
    json.dumps(again.meta)  # JSON-able
    assert again.geometry.almost_equal(img.geometry, atol=0)
    assert _header_diff(out, write_nifti(again, tmp_path / "mni_again.nii.gz")) == []  # now a fixed point


def test_scaled_int16_round_trip_is_exact(scaled_int16, tmp_path):
    path, raw = scaled_int16
    src = nib.load(path)
    img = read_nifti(path)
    assert img.data.dtype == np.float32 and img.meta["storage_dtype"] == "int16"
    np.testing.assert_array_equal(img.data[0], raw.astype(np.float32) * 0.5 - 10.0)
    np.testing.assert_array_equal(img.geometry.affine, src.header.get_sform())  # sform wins (code 4)
    nm = img.meta["nifti"]
    assert (nm["sform_code"], nm["qform_code"]) == (4, 1)
    assert (nm["scl_slope"], nm["scl_inter"]) == (0.5, -10.0)
    assert nm["descrip"] == "synthetic scaled" and nm["intent"]["name"] == "est"

    out = write_nifti(img, tmp_path / "copy.nii")
    back = nib.load(out)
    assert _header_diff(path, out) == []
    assert _raw_header(out)["scl_slope"] == 0.5 and _raw_header(out)["scl_inter"] == -10.0
    assert back.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(back.dataobj.get_unscaled()), raw)
    np.testing.assert_array_equal(back.header.get_qform(), src.header.get_qform())


def test_scaled_geometry_keeps_extent(mni_path, tmp_path):
    img = read_nifti(mni_path)
    fine = img.geometry.scaled((1, 1, 4))
    np.testing.assert_allclose(fine.spacing, (1.0, 1.0, 0.25))
    assert fine.shape == (197, 233, 189 * 4)
    np.testing.assert_allclose(fine.extent(), img.geometry.extent(), atol=1e-9)

    # write a block on a thick->thin grid: codes kept, affines and zooms follow the new grid
    start, shape = (60, 70, 80), (40, 40, 12)
    crop_geom = img.geometry.cropped(start, shape)
    block = img.data[:, 60:100, 70:110, 80:92]
    thin_geom = crop_geom.scaled((1, 1, 4))
    thin = img.derive(np.repeat(block, 4, axis=3).astype(np.float32) + 0.4, geometry=thin_geom)
    out = write_nifti(thin, tmp_path / "thin.nii.gz")
    hdr = nib.load(out).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (2, 2) and hdr.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(hdr.get_qform(), thin_geom.affine, atol=1e-5)
    np.testing.assert_allclose(hdr.get_zooms(), (1.0, 1.0, 0.25))
    np.testing.assert_allclose(hdr.get_sform(), thin_geom.affine, atol=1e-6)
    back = read_nifti(out)
    assert back.data.dtype == np.uint8
    np.testing.assert_array_equal(back.data, np.repeat(block, 4, axis=3))  # x.4 rounds down
    np.testing.assert_allclose(back.geometry.extent(), crop_geom.extent(), atol=1e-5)


def test_changed_geometry_updates_both_forms(scaled_int16, tmp_path):
    path, _ = scaled_int16
    img = read_nifti(path)
    geom = img.geometry.scaled((2, 2, 1))
    up = img.derive(np.repeat(np.repeat(img.data, 2, 1), 2, 2), geometry=geom)
    back = nib.load(write_nifti(up, tmp_path / "up.nii.gz"))
    hdr = back.header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (4, 1)
    np.testing.assert_allclose(hdr.get_sform(), geom.affine, atol=1e-5)
    # the source's qform is a frame of its own (scanner, code 1): it moves with the same grid change
    src = nib.load(path).header
    grid = np.linalg.inv(src.get_sform()) @ geom.affine  # new voxel -> old voxel
    np.testing.assert_allclose(hdr.get_qform(), src.get_qform() @ grid, atol=1e-4)
    np.testing.assert_allclose(hdr.get_zooms()[:3], (0.45, 0.55, 3.0), atol=1e-6)
    assert (back.dataobj.slope, back.dataobj.inter) == (0.5, -10.0)  # nibabel moves scaling here


def test_4d_file_becomes_channels(tmp_path):
    arr = np.random.default_rng(2).normal(size=(5, 6, 7, 3)).astype(np.float32)
    path = tmp_path / "four_d.nii.gz"
    nib.Nifti1Image(arr, np.diag([2.0, 2.0, 2.0, 1.0])).to_filename(path)
    img = read_nifti(path)
    assert img.data.shape == (3, 5, 6, 7)
    np.testing.assert_array_equal(img.data[2], arr[..., 2])
    back = nib.load(write_nifti(img, tmp_path / "copy.nii.gz"))
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), arr)


def test_metre_units_give_mm_affine(tmp_path):
    path = tmp_path / "metres.nii"
    nii = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.diag([0.002, 0.002, 0.004, 1.0]))
    nii.header.set_xyzt_units("meter")
    nii.to_filename(path)
    img = read_nifti(path)
    np.testing.assert_allclose(img.geometry.spacing, (2.0, 2.0, 4.0))
    up = np.repeat(np.repeat(np.repeat(img.data, 2, 1), 2, 2), 2, 3)
    hdr = nib.load(write_nifti(img.derive(up, geometry=img.geometry.scaled(2)),
                               tmp_path / "m2.nii")).header
    assert hdr.get_xyzt_units()[0] == "mm"  # outputs are written in mm
    np.testing.assert_allclose(hdr.get_zooms(), (1.0, 1.0, 2.0))
    np.testing.assert_allclose(hdr.get_sform(), img.geometry.scaled(2).affine, atol=1e-6)


def test_float_values_round_and_clip_to_storage(mni_path, tmp_path):
    img = read_nifti(mni_path)
    small = img.derive(np.array([[[[10.6, -5.0], [300.0, 254.5]]]], dtype=np.float32),
                       geometry=MedicalGeometry(np.eye(4), (1, 2, 2)))
    back = read_nifti(write_nifti(small, tmp_path / "clip.nii"))
    np.testing.assert_array_equal(back.data.ravel(), [11, 0, 255, 254])  # rint: 254.5 -> 254 (even)
    assert back.data.dtype == np.uint8


def test_image_from_dicom_writes_with_scanner_codes(tmp_path):
    from pydicom.data import get_testdata_file

    from domainsr.io.dicom import read_dicom_series

    ct = read_dicom_series(get_testdata_file("CT_small.dcm"))
    hdr_path = write_nifti(ct, tmp_path / "ct.nii.gz")
    hdr = nib.load(hdr_path).header
    assert (int(hdr["sform_code"]), int(hdr["qform_code"])) == (1, 1)
    back = read_nifti(hdr_path, domain="ct")
    np.testing.assert_array_equal(back.data, ct.data)  # HU kept (data dtype, not DICOM's uint storage)
    np.testing.assert_allclose(back.geometry.affine, ct.geometry.affine, atol=1e-5)
    assert back.units == "HU"


def test_derived_description(mni_path, tmp_path):
    img = read_nifti(mni_path)
    crop = img.derive(img.data[:, :8, :8, :8], geometry=img.geometry.cropped((0, 0, 0), (8, 8, 8)))
    crop.provenance["model"] = {"name": "rrdb-x2-" + "z" * 100, "sha256": "abc"}
    hdr = nib.load(write_nifti(crop, tmp_path / "d.nii")).header
    descrip = hdr["descrip"].item().decode()
    assert descrip.startswith(DERIVED_DESCRIP) and "rrdb-x2" in descrip and len(descrip) <= 80


def _header_bytes(tmp_path: Path) -> bytearray:
    p = tmp_path / "base.nii"
    nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)).to_filename(p)
    return bytearray(p.read_bytes())


@pytest.mark.parametrize("case", ["cut_gz", "cut_nii", "text", "zero_dim", "huge_gz", "missing"])
def test_bad_nifti_inputs(case, mni_path, tmp_path):
    path = tmp_path / f"bad_{case}.nii"
    if case == "cut_gz":
        path = path.with_suffix(".nii.gz")
        data = mni_path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif case == "cut_nii":
        raw = gzip.decompress(mni_path.read_bytes())
        path.write_bytes(raw[:-1000])
    elif case == "text":
        path.write_text("this is a text file, not an image\n" * 20)
    elif case == "zero_dim":
        buf = _header_bytes(tmp_path)
        struct.pack_into("<h", buf, 44, 0)  # dim[2] = 0
        path.write_bytes(bytes(buf))
    elif case == "huge_gz":
        path = path.with_suffix(".nii.gz")
        buf = _header_bytes(tmp_path)
        struct.pack_into("<hhh", buf, 42, 32000, 32000, 32000)
        path.write_bytes(gzip.compress(bytes(buf)))
    with pytest.raises(InputError) as err:
        read_nifti(path)
    assert path.name in str(err.value)
    assert isinstance(err.value, DomainSRError)


def test_failed_write_leaves_nothing(mni_path, tmp_path, monkeypatch):
    img = read_nifti(mni_path)
    target = tmp_path / "out" / "result.nii.gz"
    target.parent.mkdir()
    target.write_bytes(b"previous result")

    def half_write(image, filename):
        Path(filename).write_bytes(b"partial")
        raise RuntimeError("killed mid-write")

    monkeypatch.setattr(nib, "save", half_write)
    with pytest.raises(RuntimeError, match="mid-write"):
        write_nifti(img, target)
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.nii.gz"]
    assert target.read_bytes() == b"previous result"


def test_bad_output_name(mni_path, tmp_path):
    img = read_nifti(mni_path)
    with pytest.raises(OutputError, match="result.tif"):
        write_nifti(img, tmp_path / "result.tif")
