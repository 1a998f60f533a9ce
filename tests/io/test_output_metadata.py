"""What outputs say about themselves and how they land on disk: NIfTI sform/qform codes and units
(the risk map's too), the AI-derived tag of GeoTIFF/COG outputs (in-memory and streamed), output
permissions that follow the umask, and fsync of atomic commits."""
from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rio_cogeo.cogeo import cog_validate

from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path, current_umask
from domainsr.io.nifti import DERIVED_DESCRIP, RISK_DESCRIP, read_nifti, risk_map_meta, write_nifti
from domainsr.io.raster import AI_DERIVED, read_raster, write_raster

MODEL = {"kind": "checkpoint", "name": "sentinel2-rgbn-x2", "version": "1.0", "sha256": "ab" * 32}


@pytest.fixture(scope="module")
def mni(sample_data) -> SpatialImage:
    """A 32^3 block of the MNI152 template: sform code 2, qform code 0, units 'unknown'."""
    img = read_nifti(sample_data["mni152"])
    assert (img.meta["nifti"]["sform_code"], img.meta["nifti"]["qform_code"], img.meta["nifti"]["xyzt_units"]) \
        == (2, 0, 0)
    start = (80, 100, 80)
    return img.derive(np.ascontiguousarray(img.data[:, 80:112, 100:132, 80:112]),
                      geometry=img.geometry.cropped(start, (32, 32, 32)))


def _sr(img: SpatialImage) -> SpatialImage:
    up = np.repeat(np.repeat(np.repeat(img.data, 2, 1), 2, 2), 2, 3).astype(np.float32)
    sr = img.derive(up, geometry=img.geometry.scaled(2))
    sr.provenance["model"] = dict(MODEL, name="mri-t1-x2")
    return sr


def _codes(hdr: nib.Nifti1Header) -> tuple[int, int]:
    return int(hdr["sform_code"]), int(hdr["qform_code"])


# ------------------------------------------------------------------------------------- NIfTI

def test_nifti_output_has_both_forms_codes_and_mm(mni, tmp_path):
    sr = _sr(mni)
    hdr = nib.load(write_nifti(sr, tmp_path / "sr.nii.gz")).header
    assert _codes(hdr) == (2, 2)  # the source's sform code, and the same for the filled-in qform
    assert hdr.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(hdr.get_sform(), sr.geometry.affine, atol=1e-6)
    np.testing.assert_allclose(hdr.get_qform(), sr.geometry.affine, atol=1e-5)
    assert hdr["descrip"].item().decode().startswith(DERIVED_DESCRIP)  # still says AI-enhanced
    assert read_nifti(tmp_path / "sr.nii.gz").geometry.almost_equal(sr.geometry, atol=1e-5)


def test_nifti_without_source_header_gets_scanner_codes(tmp_path):
    aff = np.array([[0.8, 0, 0, -10], [0, 0.8, 0, 5], [0, 0, 2.5, 40], [0, 0, 0, 1]], float)
    img = SpatialImage(np.zeros((1, 4, 5, 6), np.float32), "ct", MedicalGeometry(aff, (4, 5, 6)), units="HU")
    hdr = nib.load(write_nifti(img, tmp_path / "ct.nii")).header
    assert _codes(hdr) == (1, 1) and hdr.get_xyzt_units()[0] == "mm"
    np.testing.assert_allclose(hdr.get_qform(), aff, atol=1e-6)


def test_sheared_grid_keeps_an_exact_sform_and_a_rigid_qform(tmp_path):
    """A gantry-tilted grid (slice step leaning 15 degrees) cannot be a qform: the sform keeps it
    exactly; the qform (same code) is nibabel's nearest rigid transform, with the exact origin."""
    aff = np.eye(4)
    aff[:3, :3] = np.diag([0.5, 0.5, 2.0])
    aff[1, 2] = 2.0 * np.tan(np.deg2rad(15.0))
    aff[:3, 3] = (-30.0, 12.0, 4.0)
    img = SpatialImage(np.ones((1, 6, 6, 5), np.float32), "ct", MedicalGeometry(aff, (6, 6, 5)), units="HU")
    out = write_nifti(img, tmp_path / "tilt.nii.gz")
    hdr = nib.load(out).header
    assert _codes(hdr) == (1, 1)
    np.testing.assert_allclose(hdr.get_sform(), aff, atol=1e-6)
    q = hdr.get_qform()
    rot = q[:3, :3] / np.linalg.norm(q[:3, :3], axis=0)
    np.testing.assert_allclose(rot.T @ rot, np.eye(3), atol=1e-5)  # rigid (no shear)
    np.testing.assert_allclose(q[:3, 3], aff[:3, 3], atol=1e-5)
    np.testing.assert_allclose(read_nifti(out, domain="ct").geometry.affine, aff, atol=1e-6)  # sform wins


def test_risk_map_header_says_what_it_holds_with_the_images_codes(mni, tmp_path):
    sr = _sr(mni)
    sr_hdr = nib.load(write_nifti(sr, tmp_path / "sr.nii.gz")).header
    risk = SpatialImage(np.zeros((2, *sr.spatial_shape), np.float32), "mri", sr.geometry, band_names=("risk", "class"),
                        units="", provenance={"source": "domainsr audit risk map"},
                        meta={"storage_dtype": "float32", **risk_map_meta(sr)})
    hdr = nib.load(write_nifti(risk, tmp_path / "risk.nii.gz")).header
    assert _codes(hdr) == _codes(sr_hdr) == (2, 2)
    np.testing.assert_array_equal(hdr.get_sform(), sr_hdr.get_sform())
    np.testing.assert_allclose(hdr.get_qform(), sr_hdr.get_qform(), atol=1e-6)
    assert hdr.get_intent()[0] == "estimate" and hdr.get_intent()[2] == "risk;class"
    assert hdr["descrip"].item().decode() == RISK_DESCRIP and len(RISK_DESCRIP) <= 80
    assert hdr.get_xyzt_units()[0] == "mm" and hdr.get_data_shape() == (*sr.spatial_shape, 2)
    assert hdr.get_data_dtype() == np.float32
    slope, inter = float(hdr["scl_slope"]), float(hdr["scl_inter"])
    assert not np.isfinite(slope) or (slope, inter) == (1.0, 0.0)  # values as they are, unscaled


def test_risk_map_of_a_scanner_image_has_scanner_codes(tmp_path):
    aff = np.diag([0.7, 0.7, 3.0, 1.0])
    sr = SpatialImage(np.zeros((1, 4, 4, 3), np.float32), "mri", MedicalGeometry(aff, (4, 4, 3)))
    risk = SpatialImage(np.zeros((2, 4, 4, 3), np.float32), "mri", sr.geometry, band_names=("risk", "class"),
                        meta={"storage_dtype": "float32", **risk_map_meta(sr)})
    hdr = nib.load(write_nifti(risk, tmp_path / "risk.nii")).header
    assert _codes(hdr) == (1, 1) and hdr.get_intent()[0] == "estimate"


# ---------------------------------------------------------------------------------- GeoTIFF

def _raster(bands: int = 3, size: int = 600) -> SpatialImage:
    g = GeoGeometry("EPSG:32618", from_origin(600000, 4200000, 10, 10), (size, size + 40))
    data = (np.random.default_rng(0).random((bands, size, size + 40)) * 3000).astype(np.uint16)
    return SpatialImage(data, "optical", g, band_names=tuple(f"B{i}" for i in range(bands)), units="DN")


def _tiff_tags(path: Path) -> dict[int, bytes]:
    """ASCII tags of the first IFD of a little-endian classic TIFF (what any TIFF reader sees)."""
    import struct

    raw = path.read_bytes()
    assert raw[:4] == b"II*\x00"
    off = struct.unpack("<I", raw[4:8])[0]
    tags = {}
    for i in range(struct.unpack("<H", raw[off:off + 2])[0]):
        tag, typ, count, value = struct.unpack("<HHII", raw[off + 2 + 12 * i:off + 14 + 12 * i])
        if typ == 2:
            tags[tag] = raw[value:value + count].rstrip(b"\x00") if count > 4 else b""
    return tags


def test_cog_of_an_enhanced_image_is_tagged_ai_derived(tmp_path):
    img = _raster()
    img.provenance["model"] = MODEL
    out = write_raster(img, tmp_path / "sr.tif")
    valid, errors, warnings = cog_validate(str(out), strict=True)
    assert valid and not errors and not warnings
    with rasterio.open(out) as ds:
        tags = ds.tags()
    assert tags["DOMAINSR_DERIVED"] == AI_DERIVED
    assert tags["DOMAINSR_MODEL"] == "sentinel2-rgbn-x2" and tags["DOMAINSR_MODEL_SHA256"] == "ab" * 32
    assert tags["DOMAINSR_MODEL_VERSION"] == "1.0" and tags["DOMAINSR_VERSION"]
    tiff = _tiff_tags(out)
    assert tiff[305].startswith(b"DomainSR ")  # Software
    assert b"AI-enhanced" in tiff[270] and b"sentinel2-rgbn-x2" in tiff[270]  # ImageDescription
    # a plain copy of it keeps saying so; an image no model touched says nothing of the kind
    again = write_raster(read_raster(out), tmp_path / "copy.tif")
    with rasterio.open(again) as ds:
        assert ds.tags()["DOMAINSR_MODEL"] == "sentinel2-rgbn-x2"
    with rasterio.open(write_raster(_raster(), tmp_path / "plain.tif")) as ds:
        assert not any(k.startswith("DOMAINSR_") for k in ds.tags())


@pytest.mark.parametrize("model_info", [None, MODEL])
def test_streamed_cog_is_tagged_ai_derived(tmp_path, model_info):
    from domainsr.engine import PatchInferer, enhance_raster_file
    from domainsr.models import build_model

    src = write_raster(_raster(size=300), tmp_path / "lr.tif")
    inferer = PatchInferer(build_model("cubic", spatial_dims=2, in_channels=3, scale=2), tile=128, device="cpu",
                           threads=1)
    out = enhance_raster_file(src, tmp_path / "sr.tif", inferer, model_info=model_info)
    valid, errors, warnings = cog_validate(str(out), strict=True)
    assert valid and not errors and not warnings
    with rasterio.open(out) as ds:
        tags = ds.tags()
    assert tags["DOMAINSR_DERIVED"] == AI_DERIVED and "DOMAINSR_ENHANCE" in tags
    name = MODEL["name"] if model_info else tags["DOMAINSR_MODEL"]
    assert tags["DOMAINSR_MODEL"] == name and name and name in _tiff_tags(out)[270].decode()


# ------------------------------------------------------------------------------ permissions

@pytest.fixture()
def umask():
    """Set a umask for one test; the previous one is restored."""
    saved = current_umask()

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(saved)


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002, 0o077])
def test_outputs_follow_the_umask(umask, tmp_path, mask):
    umask(mask)
    assert current_umask() == mask
    with atomic_path(tmp_path / "out.json") as tmp:
        tmp.write_text("{}")
    with atomic_path(tmp_path / "series", is_dir=True) as tmp:
        (tmp / "IM0001.dcm").write_bytes(b"dicom")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "series").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "series" / "IM0001.dcm").stat().st_mode & 0o777 == 0o666 & ~mask


def test_writers_follow_the_umask(umask, mni, tmp_path):
    umask(0o002)
    img = _raster()
    for path in (write_nifti(mni, tmp_path / "a.nii.gz"), write_raster(img, tmp_path / "b.tif")):
        assert path.stat().st_mode & 0o777 == 0o664, path


def test_replacing_a_folder_output_keeps_its_name_until_the_new_one_is_complete(tmp_path):
    final = tmp_path / "series"
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "old.dcm").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic_path(final, is_dir=True) as tmp:
        (tmp / "new.dcm").write_bytes(b"2")
        raise RuntimeError("killed")
    assert [p.name for p in final.iterdir()] == ["old.dcm"]
    with atomic_path(final, is_dir=True) as tmp:
        (tmp / "new.dcm").write_bytes(b"2")
    assert [p.name for p in final.iterdir()] == ["new.dcm"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["series"]  # no debris


# ------------------------------------------------------------------------------------ fsync

@pytest.fixture()
def synced(monkeypatch) -> list[Path]:
    """Paths passed to os.fsync (through their descriptors), in order."""
    done: list[Path] = []
    real = os.fsync

    def record(fd: int) -> None:
        done.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    return done


def test_atomic_commit_fsyncs_file_and_folder(synced, tmp_path):
    with atomic_path(tmp_path / "out.nii.gz") as tmp:
        tmp.write_bytes(b"x" * 100)
    assert synced[0].name.startswith(".out.nii.gz.partial-")  # the data, before the rename
    assert synced[-1] == tmp_path  # the rename, after it


def test_atomic_folder_commit_fsyncs_every_file(synced, tmp_path):
    with atomic_path(tmp_path / "series", is_dir=True) as tmp:
        for i in range(3):
            (tmp / f"IM{i}.dcm").write_bytes(b"d")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.json").write_text("{}")
    names = [p.name for p in synced]
    assert {"IM0.dcm", "IM1.dcm", "IM2.dcm", "x.json", "sub"} <= set(names)
    assert synced[-1] == tmp_path
