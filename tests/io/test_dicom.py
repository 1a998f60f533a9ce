"""DICOM series reading (classic + enhanced multi-frame), derived-series writing, bad input."""
from __future__ import annotations

import random
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from domainsr.errors import DomainSRError, GeometryError, InputError, OutputError
from domainsr.io.dicom import choose_rescale, list_series, read_dicom_series, write_derived_series

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NI, NJ, NK = 48, 40, 12  # columns, rows, slices (all different, so a transposition shows)
COL_SPACING, ROW_SPACING, GAP = 0.7, 0.8, 2.5


def _rotation() -> np.ndarray:
    """An oblique LPS frame: columns are row cosine, column cosine, slice normal."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


@pytest.fixture(scope="module")
def mni_block() -> np.ndarray:
    """A real MRI block (i, j, k) used as stored CT pixel values (uint16)."""
    from nilearn.datasets import MNI152_FILE_PATH

    vol = np.asanyarray(nib.load(MNI152_FILE_PATH).dataobj)
    block = vol[70:70 + NI, 90:90 + NJ, 80:80 + NK].astype(np.uint16) * 12
    assert block.max() > 500  # really brain tissue, not background
    return block


def _ct_slice(pixels_ij: np.ndarray, k: int, uids: dict, rot: np.ndarray, origin: np.ndarray,
              orientation: np.ndarray | None = None) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.FrameOfReferenceUID = uids["for"]
    ds.Modality = "CT"
    ds.PatientName, ds.PatientID = "Synthetic^Phantom", "SYN0001"
    ds.StudyDate, ds.StudyTime, ds.SeriesNumber = "20240101", "120000", 3
    ds.SeriesDescription = "synthetic oblique CT"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [float(v) for v in origin + k * GAP * rot[:, 2]]
    iop = np.concatenate([rot[:, 0], rot[:, 1]]) if orientation is None else orientation
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [ROW_SPACING, COL_SPACING]
    ds.SliceThickness = GAP + 0.5  # overlapping reconstruction: thickness is not the step
    ds.Rows, ds.Columns = NJ, NI
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.KVP = 120
    ds.PixelData = np.ascontiguousarray(pixels_ij.T).astype("<u2").tobytes()
    return ds


def make_ct_series(folder: Path, block: np.ndarray, *, skip: int | None = None,
                   tilt_slice: int | None = None, seed: int = 0) -> dict:
    """Write an oblique CT series (one file per slice, shuffled names); return its construction."""
    folder.mkdir(parents=True, exist_ok=True)
    rot = _rotation()
    origin = np.array([-20.0, 35.5, -60.25])
    uids = {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    order = list(range(block.shape[2]))
    random.Random(seed).shuffle(order)
    datasets = []
    for n, k in enumerate(order):
        if k == skip:
            continue
        orient = None
        if k == tilt_slice:
            r2 = _rotation() @ np.array([[1, 0, 0], [0, np.cos(0.2), -np.sin(0.2)], [0, np.sin(0.2), np.cos(0.2)]])
            orient = np.concatenate([r2[:, 0], r2[:, 1]])
        ds = _ct_slice(block[:, :, k], k, uids, rot, origin, orient)
        ds.filename = folder / f"img_{n:03d}_{ds.SOPInstanceUID[-6:]}.dcm"
        ds.save_as(ds.filename, enforce_file_format=True)
        datasets.append(ds)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2] = rot[:, 0] * COL_SPACING, rot[:, 1] * ROW_SPACING, rot[:, 2] * GAP
    lps[:3, 3] = origin
    return {"affine": LPS_RAS @ lps, "hu": block.astype(np.int32) - 1024, "uids": uids,
            "datasets": datasets}


@pytest.fixture()
def ct_series(tmp_path, mni_block):
    folder = tmp_path / "ct_series"
    return folder, make_ct_series(folder, mni_block)


def test_read_synthetic_oblique_series(ct_series):
    folder, truth = ct_series
    img = read_dicom_series(folder)
    assert img.domain == "ct" and img.units == "HU"
    assert img.data.shape == (1, NI, NJ, NK)
    assert img.data.dtype == np.int16  # integer HU that fit int16
    np.testing.assert_allclose(img.geometry.affine, truth["affine"], atol=1e-5)
    np.testing.assert_array_equal(img.data[0], truth["hu"])
    np.testing.assert_allclose(img.geometry.spacing, (COL_SPACING, ROW_SPACING, GAP), atol=1e-6)
    dm = img.meta["dicom"]
    assert dm["series_instance_uid"] == truth["uids"]["series"]
    # SOP instance UIDs listed in slice (k) order, whatever the file order was
    by_k = [ds.SOPInstanceUID for ds in sorted(truth["datasets"], key=lambda d: d.InstanceNumber)]
    assert dm["sop_instance_uids"] == by_k
    assert dm["storage_dtype"] == "uint16" and dm["rescale_intercept"] == -1024.0
    assert dm["window_center"] == 40.0 and dm["window_width"] == 400.0
    assert Dataset.from_json(dm["template"]).StudyInstanceUID == truth["uids"]["study"]
    assert img.provenance["source"] == str(folder) and img.provenance["format"] == "dicom"


def test_derived_series_of_scaled_image_round_trips(ct_series, tmp_path):
    folder, truth = ct_series
    img = read_dicom_series(folder)
    geom = img.geometry.scaled((1, 1, 2))
    rng = np.random.default_rng(0)
    # what a model would give: float HU on the finer grid, with fractions to round
    sr = np.repeat(img.data[0].astype(np.float32), 2, axis=2) + rng.uniform(-0.45, 0.45, geom.shape)
    out_img = img.derive(sr[None].astype(np.float32), geometry=geom, step={"op": "test-sr"})
    out = write_derived_series(out_img, tmp_path / "derived", model_name="unit-test-net", description="t")
    files = sorted(out.glob("*.dcm"))
    assert len(files) == 2 * NK

    back = read_dicom_series(out)
    assert back.data.shape == (1, NI, NJ, 2 * NK)
    np.testing.assert_allclose(back.geometry.spacing, (COL_SPACING, ROW_SPACING, GAP / 2), atol=1e-5)
    np.testing.assert_allclose(back.geometry.affine, geom.affine, atol=1e-4)
    np.testing.assert_allclose(back.geometry.extent(), img.geometry.extent(), atol=1e-4)
    np.testing.assert_array_equal(back.data[0], np.rint(sr))  # slope 1 / intercept kept: rounding only

    src_sops = set(img.meta["dicom"]["sop_instance_uids"])
    ds = pydicom.dcmread(files[3])
    assert ds.SeriesInstanceUID != truth["uids"]["series"]
    assert ds.StudyInstanceUID == truth["uids"]["study"]
    assert ds.FrameOfReferenceUID == truth["uids"]["for"]
    assert ds.PatientID == "SYN0001" and ds.Modality == "CT"
    assert list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"] and "AI ENHANCED" in ds.ImageType
    assert "unit-test-net" in ds.DerivationDescription and "AI-enhanced" in ds.DerivationDescription
    assert ds.SeriesDescription.startswith("SR x2 unit-test-net")
    assert ds.BurnedInAnnotation == "NO"
    assert float(ds.RescaleIntercept) == -1024.0 and float(ds.RescaleSlope) == 1.0
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    referenced = set()
    for h in headers:
        ref = h.ReferencedSeriesSequence[0]
        assert ref.SeriesInstanceUID == truth["uids"]["series"]
        sources = {s.ReferencedSOPInstanceUID for s in h.SourceImageSequence}
        assert sources and sources <= src_sops
        assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == sources
        referenced |= sources
    assert referenced == src_sops  # every source slice feeds some derived slice
    # derived slice 2k+1 lies between source slices k and k+1 (new centres at k - 0.25, k + 0.25)
    by_k = img.meta["dicom"]["sop_instance_uids"]
    assert {s.ReferencedSOPInstanceUID for s in headers[5].SourceImageSequence} == {by_k[2], by_k[3]}
    new_sops = {h.SOPInstanceUID for h in headers}
    assert len(new_sops) == 2 * NK and not new_sops & src_sops


def test_derived_series_rescales_values_outside_source_range(ct_series, tmp_path):
    folder, _ = ct_series
    img = read_dicom_series(folder)
    geom = img.geometry.scaled((2, 2, 1))
    sr = np.repeat(np.repeat(img.data[0].astype(np.float32), 2, 0), 2, 1)
    sr[0, 0, 0], sr[1, 0, 0] = -3000.5, 70000.25  # beyond uint16 with intercept -1024
    out = write_derived_series(img.derive(sr[None], geometry=geom), tmp_path / "d2", model_name="m")
    back = read_dicom_series(out)
    slope = float(pydicom.dcmread(next(out.glob("*.dcm"))).RescaleSlope)
    assert slope > 1  # a new slope spreads the range over the stored integers
    assert np.abs(back.data[0] - sr).max() <= slope / 2 + 1e-3
    np.testing.assert_allclose(back.geometry.spacing, (COL_SPACING / 2, ROW_SPACING / 2, GAP), atol=1e-6)


@pytest.mark.parametrize("values,dtype", [
    (np.array([-5000.0, 100.0]), np.int16),       # integers, shift the intercept
    (np.array([-0.37, 1.9, 0.5]), np.uint16),     # small float range gets a fine slope
    (np.array([-1e6, 3e6]), np.int16),
])
def test_choose_rescale_fits_without_clipping(values, dtype):
    m, b = choose_rescale(values, np.dtype(dtype), None, None)
    stored = np.rint((values - b) / m)
    info = np.iinfo(dtype)
    assert stored.min() >= info.min and stored.max() <= info.max
    assert np.abs(stored * m + b - values).max() <= m / 2 + 1e-9


def test_enhanced_multiframe_matches_classic(ct_series, tmp_path):
    from highdicom.legacy import LegacyConvertedEnhancedCTImage

    folder, truth = ct_series
    legacy = [pydicom.dcmread(f) for f in sorted(folder.glob("*.dcm"))]
    enh = LegacyConvertedEnhancedCTImage(legacy, series_instance_uid=generate_uid(), series_number=9,
                                         sop_instance_uid=generate_uid(), instance_number=1)
    assert "PerFrameFunctionalGroupsSequence" in enh and int(enh.NumberOfFrames) == NK
    path = tmp_path / "enhanced" / "enhanced_ct.dcm"
    path.parent.mkdir()
    enh.save_as(path, enforce_file_format=True)
    img = read_dicom_series(path)
    np.testing.assert_allclose(img.geometry.affine, truth["affine"], atol=1e-5)
    np.testing.assert_array_equal(img.data[0], truth["hu"])
    assert img.meta["dicom"]["frame_numbers"] != [None] * NK
    # and a derived series can be written from the multi-frame source, referencing its frames
    out = write_derived_series(img.derive(img.data.astype(np.float32)), tmp_path / "d", model_name="m")
    src = pydicom.dcmread(next(out.glob("*.dcm"))).SourceImageSequence[0]
    assert src.ReferencedSOPInstanceUID == enh.SOPInstanceUID and int(src.ReferencedFrameNumber) >= 1


@pytest.mark.parametrize("name,modality,units", [("CT_small.dcm", "ct", "HU"), ("MR_small.dcm", "mri", "a.u.")])
def test_single_slice_files(name, modality, units):
    path = get_testdata_file(name)
    ds = pydicom.dcmread(path)
    img = read_dicom_series(path)
    assert img.domain == modality and img.units == units
    assert img.data.shape == (1, ds.Columns, ds.Rows, 1)
    expected = ds.pixel_array.astype(np.int32) * int(ds.get("RescaleSlope", 1)) + int(ds.get("RescaleIntercept", 0))
    np.testing.assert_array_equal(img.data[0, :, :, 0], expected.T)
    # single slice: SpacingBetweenSlices, else SliceThickness, is the slice size
    assert img.geometry.spacing[2] == pytest.approx(float(ds.get("SpacingBetweenSlices") or ds.SliceThickness))
    # LPS -> RAS: the first voxel sits at ImagePositionPatient with x, y negated
    ipp = np.asarray(ds.ImagePositionPatient, float)
    np.testing.assert_allclose(img.geometry.origin, ipp * [-1, -1, 1], atol=1e-6)
    if name == "CT_small.dcm":
        assert img.data.min() < -500  # air in HU, not raw stored values


def test_list_series_groups_and_counts(tmp_path, mni_block):
    a = make_ct_series(tmp_path / "a", mni_block, seed=1)
    make_ct_series(tmp_path / "b" / "nested", mni_block[:, :, :4], seed=2)
    (tmp_path / "README.txt").write_text("not dicom")
    bad = tmp_path / "corrupt.dcm"
    bad.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f" + b"garbage" * 3)
    cut = tmp_path / "cut_header"  # a real CT file cut inside its header, no .dcm suffix
    cut.write_bytes(Path(get_testdata_file("CT_small.dcm")).read_bytes()[:1500])
    listing = list_series(tmp_path)
    assert sorted(s.n_frames for s in listing) == [4, NK]
    assert listing.skipped == 1
    assert sorted(listing.errors) == sorted([str(bad), str(cut)])
    with pytest.raises(InputError, match="unreadable DICOM"):
        read_dicom_series(tmp_path, series_uid=a["uids"]["series"])
    bad.unlink()
    cut.unlink()
    with pytest.raises(InputError, match="2 series found"):
        read_dicom_series(tmp_path)
    img = read_dicom_series(tmp_path, series_uid=a["uids"]["series"])
    assert img.data.shape[-1] == NK


def test_corrupt_file_in_folder_is_named(tmp_path, mni_block):
    make_ct_series(tmp_path / "s", mni_block[:, :, :4])
    (tmp_path / "s" / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10")
    with pytest.raises(InputError, match="broken.dcm"):
        read_dicom_series(tmp_path / "s")


def _shift_slice(ds: Dataset) -> None:
    ds.ImagePositionPatient = [float(v) + 0.3 * GAP * n for v, n in zip(ds.ImagePositionPatient, _rotation()[:, 2])]


def _other_size(ds: Dataset) -> None:
    ds.Rows = NJ // 2
    ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]


@pytest.mark.parametrize("kind,match", [
    ("missing", "missing 1 slice"),
    ("orientation", "orientations"),
    ("duplicate", "duplicate"),
    ("nonuniform", "non-uniform slice spacing"),
    ("modality", "mixes modalities"),
    ("size", "mixes image sizes"),
])
def test_bad_series_geometry(tmp_path, mni_block, kind, match):
    folder = tmp_path / f"series_{kind}"
    if kind == "missing":
        make_ct_series(folder, mni_block, skip=5)
    elif kind == "orientation":
        make_ct_series(folder, mni_block, tilt_slice=7)
    elif kind == "duplicate":
        ds = make_ct_series(folder, mni_block)["datasets"][0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / "copy.dcm", enforce_file_format=True)
    else:
        ds = next(d for d in make_ct_series(folder, mni_block)["datasets"] if d.InstanceNumber == 6)
        change = {"nonuniform": _shift_slice, "size": _other_size,
                  "modality": lambda d: setattr(d, "Modality", "MR")}[kind]
        change(ds)
        ds.save_as(ds.filename, enforce_file_format=True)
    with pytest.raises(GeometryError, match=match) as err:
        read_dicom_series(folder)
    assert folder.name in str(err.value)
    assert "Synthetic" not in str(err.value) and "SYN0001" not in str(err.value)  # no patient tags


def test_truncated_dicom_names_file():
    path = get_testdata_file("MR_truncated.dcm")
    with pytest.raises(DomainSRError, match="MR_truncated.dcm"):
        read_dicom_series(path)


def test_missing_and_non_dicom_inputs(tmp_path):
    with pytest.raises(InputError, match="nothing_here"):
        read_dicom_series(tmp_path / "nothing_here")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no DICOM image series"):
        read_dicom_series(tmp_path)


def test_writer_failure_leaves_no_partial_output(ct_series, tmp_path, monkeypatch):
    folder, _ = ct_series
    img = read_dicom_series(folder)
    calls = {"n": 0}
    real_save = Dataset.save_as

    def failing_save(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk gone")
        return real_save(self, *args, **kwargs)

    monkeypatch.setattr(Dataset, "save_as", failing_save)
    target = tmp_path / "out" / "derived"
    with pytest.raises(RuntimeError, match="disk gone"):
        write_derived_series(img, target, model_name="m")
    assert calls["n"] == 5
    assert list((tmp_path / "out").iterdir()) == []


def test_writer_refuses_non_dicom_image_and_non_empty_folder(ct_series, tmp_path):
    folder, _ = ct_series
    img = read_dicom_series(folder)
    target = tmp_path / "occupied"
    target.mkdir()
    (target / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="occupied"):
        write_derived_series(img, target, model_name="m")
    assert (target / "keep.txt").exists()
    bare = img.derive(img.data)
    bare.meta.pop("dicom")
    with pytest.raises(OutputError, match="DICOM source metadata"):
        write_derived_series(bare, tmp_path / "x", model_name="m")
