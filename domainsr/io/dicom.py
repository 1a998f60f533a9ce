"""DICOM CT/MR series -> volume (pydicom), and an AI-derived series back (pydicom + highdicom codes).

Reading
    A series (classic single-frame files, or enhanced multi-frame files with per-frame functional
    groups) becomes ``data`` of shape ``(1, i, j, k)``: ``i`` runs along a row (columns), ``j``
    down the columns (rows), ``k`` across slices sorted by the projection of
    ImagePositionPatient on the slice normal (row cosine x column cosine). RescaleSlope/Intercept
    are applied (CT -> HU). The affine maps voxel centres to RAS+ mm (DICOM LPS with x and y
    negated); its slice column is the *measured* step between positions, never SliceThickness.
    Only a single-slice series has no measured step: there SpacingBetweenSlices, else
    SliceThickness, is the slice size (the one documented fallback).

    Refused with a GeometryError naming the series: missing or duplicated slices, non-uniform
    spacing, mixed orientations, modalities, matrix sizes or pixel spacings. A **gantry tilt** is
    kept, not resampled: the slices still lie on a straight line, so the measured step leans by the
    tilt and the affine is sheared; every voxel stays exactly where the scanner put it, the model
    runs on the acquired grid (no interpolation before SR), and the derived series writes the same
    tilted positions (and GantryDetectorTilt) back. NIfTI outputs store the shear in the sform.

    ``img.meta["dicom"]`` is a JSON-able dict: ``template`` (the patient/study/equipment/frame of
    reference tags of the first slice, as ``Dataset.to_json_dict()``; restore with
    ``pydicom.Dataset.from_json``), the source series and SOP instance UIDs in ``k`` order, the
    pixel storage (BitsAllocated, PixelRepresentation, ``storage_dtype``), the rescale and window
    values and the source affine. Patient tags are never logged nor put in error messages.

Writing
    :func:`write_derived_series` hand-builds classic CT/MR Image Storage instances with pydicom,
    one file per slice. highdicom's classes do not fit: ``SCImage`` (Secondary Capture) has no
    Image Plane module (only PatientOrientation letters), so viewers could neither stack nor
    measure the slices, and the Legacy Converted Enhanced classes produce one multi-frame
    "legacy converted" object, which misstates what a derived, resampled series is. highdicom's
    ``CodedConcept`` builds the coded items (derivation 113085 "Spatial resampling", purpose
    121322 "Source image for image processing operation"). Each derived slice references, in
    SourceImageSequence and ReferencedSeriesSequence, the source slices either side of it.
    pydicom's value validation is switched off during reads and writes (it logs offending values
    verbatim, which could be patient tags); that switch is process-global while it lasts.
"""
from __future__ import annotations

import copy
import datetime as _dt
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from domainsr.errors import DomainSRError, GeometryError, InputError, OutputError, UnsupportedFormatError
from domainsr.image import DOMAINS, MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.limits import check_fits, decoded_bytes

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DOMAIN_OF_MODALITY = {"CT": "ct", "MR": "mri"}
_SOP_CLASS_OF_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
GAP_TOLERANCE = 0.01  # relative to the median slice gap
ORIENTATION_TOLERANCE = 1e-4  # on direction cosines

# Tags copied from the first source slice into every derived instance (patient, study, frame of
# reference, equipment, acquisition context). Everything else is recomputed by the writer.
TEMPLATE_KEYWORDS = (
    "SpecificCharacterSet",
    "PatientName", "PatientID", "IssuerOfPatientID", "OtherPatientIDsSequence", "PatientBirthDate",
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "PatientIdentityRemoved",
    "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
    "FrameOfReferenceUID", "PositionReferenceIndicator", "BodyPartExamined", "PatientPosition",
    "Laterality",
    "Manufacturer", "InstitutionName", "StationName", "ManufacturerModelName", "DeviceSerialNumber",
    "KVP", "ConvolutionKernel", "AcquisitionNumber", "GantryDetectorTilt",
    "ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
    "EchoTime", "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "ImagedNucleus",
    "FlipAngle",
)
# Type 2 attributes of the modules written: present (possibly empty) in every instance.
_TYPE2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "StudyID", "AccessionNumber", "PositionReferenceIndicator",
          "Manufacturer", "PatientPosition")
_TYPE2_CT = ("KVP", "AcquisitionNumber")
_TYPE2_MR = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength")


# --------------------------------------------------------------------------------------------
# Finding series
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesInfo:
    """One image series found on disk (no patient tags)."""

    series_uid: str
    modality: str
    series_number: int | None
    description: str
    files: tuple[Path, ...]
    n_frames: int
    rows: int
    columns: int


class SeriesListing(list):
    """``list[SeriesInfo]`` plus what was left out: ``skipped`` (files that are not DICOM images,
    e.g. text files, DICOMDIR, structured reports) and ``errors`` (``{path: problem}`` for files
    that claim to be DICOM but cannot be parsed)."""

    def __init__(self, items: Iterable[SeriesInfo] = (), skipped: int = 0,
                 errors: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.skipped = skipped
        self.errors = dict(errors or {})


def _below_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING


@contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """pydicom warns (and logs) invalid element values verbatim, which may be patient tags, and its
    debug log names every file it opens (export folders are often named after the patient) and,
    with ``pydicom.config.debug``, every element value: while DomainSR reads or writes DICOM, value
    validation is off and the ``pydicom`` logger passes only warnings and errors."""
    settings = pydicom.config.settings
    saved = settings.reading_validation_mode, settings.writing_validation_mode
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    logger = logging.getLogger("pydicom")
    outermost = _below_warning not in logger.filters
    logger.addFilter(_below_warning)
    try:
        yield
    finally:
        if outermost:
            logger.removeFilter(_below_warning)
        settings.reading_validation_mode, settings.writing_validation_mode = saved


def _claims_dicom(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom")


def _files_of(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path]:
    """All files under ``paths`` and a label (the folder) to name in errors."""
    items = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not items:
        raise InputError("no DICOM files given")
    files: list[Path] = []
    for item in items:
        if item.is_dir():
            files.extend(sorted(p for p in item.rglob("*") if p.is_file()))
        elif item.is_file():
            files.append(item)
        else:
            raise InputError("file or folder not found", item)
    label = items[0] if len(items) == 1 else items[0].parent
    return files, label


def _read_header(path: Path) -> Dataset:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return pydicom.dcmread(path, stop_before_pixels=True, force=head[128:132] != b"DICM")


def _header_problem(ds: Dataset) -> str | None:
    """Why a parsed header is not a usable image, or ``None``; ``"skip"`` for non-image objects.

    pydicom parses truncated files leniently, so a file cut short shows up as a header without
    its SOP class or without the image attributes its (image) SOP class requires.
    """
    if "SeriesInstanceUID" in ds and "Rows" in ds and "Columns" in ds:
        return None
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if not sop:
        return "no SOP Class UID (truncated or corrupt header)"
    if "Image Storage" in pydicom.uid.UID(str(sop)).name:
        return "image header lacks Rows, Columns or SeriesInstanceUID (truncated?)"
    return "skip"


@_quiet_pydicom()
def list_series(paths: str | Path | Sequence[str | Path]) -> SeriesListing:
    """Group the DICOM image files under ``paths`` (a folder, searched recursively, a file, or a
    list of files) by SeriesInstanceUID, in the order first found."""
    return _scan(_files_of(paths)[0])


_SCANNED = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfFrames",
            "Rows", "Columns", "SOPClassUID")


def _scan(files: list[Path]) -> SeriesListing:
    groups: dict[str, list[tuple[Path, Dataset]]] = {}
    skipped, errors = 0, {}
    for f in files:
        if not _claims_dicom(f):
            skipped += 1
            continue
        try:
            ds = _read_header(f)
            for kw in _SCANNED:  # pydicom converts values lazily: parse the ones used here now
                ds.get(kw)
            problem = _header_problem(ds)
        except Exception as exc:  # noqa: BLE001 - any parse failure is recorded for this file
            errors[str(f)] = f"not a readable DICOM file: {type(exc).__name__}: {exc}"
            continue
        if problem == "skip":
            skipped += 1
            continue
        if problem:
            errors[str(f)] = problem
            continue
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((f, ds))
    out = []
    for uid, members in groups.items():
        first = members[0][1]
        try:
            number: int | None = int(first.get("SeriesNumber"))
        except (TypeError, ValueError):
            number = None
        out.append(SeriesInfo(
            series_uid=uid,
            modality=str(first.get("Modality", "")),
            series_number=number,
            description=str(first.get("SeriesDescription", "")),
            files=tuple(f for f, _ in members),
            n_frames=sum(int(ds.get("NumberOfFrames") or 1) for _, ds in members),
            rows=int(first.Rows),
            columns=int(first.Columns),
        ))
    return SeriesListing(out, skipped=skipped, errors=errors)


# --------------------------------------------------------------------------------------------
# Reading a series
# --------------------------------------------------------------------------------------------

@dataclass
class _Frame:
    file: Path
    index: int | None  # frame index in a multi-frame file; None for a single-frame file
    sop_uid: str
    sop_class: str
    modality: str
    rows: int
    cols: int
    position: np.ndarray  # LPS mm
    iop: np.ndarray  # 6 direction cosines
    pixel_spacing: np.ndarray  # (between rows, between columns)
    thickness: float | None
    spacing_between: float | None
    slope: float
    intercept: float


def _num(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def _group_attr(ds: Dataset, per: Dataset | None, seq: str, keyword: str) -> Any:
    """``keyword`` from functional group ``seq``: the per-frame item first, then the shared one."""
    for groups in (per, (ds.get("SharedFunctionalGroupsSequence") or [None])[0]):
        if groups is not None and seq in groups and len(groups[seq].value):
            item = groups[seq][0]
            if keyword in item:
                return item[keyword].value
    return None


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    common: dict[str, Any] = {
        "file": path, "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class": str(ds.get("SOPClassUID", "")), "modality": str(ds.get("Modality", "")),
        "rows": int(ds.Rows), "cols": int(ds.Columns)}
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedFormatError("colour DICOM images are not supported", path)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        n = int(ds.get("NumberOfFrames") or 1)
        per_frame = ds.get("PerFrameFunctionalGroupsSequence") or [None] * n
        frames = []
        for i in range(n):
            per = per_frame[i] if i < len(per_frame) else None
            pos = _group_attr(ds, per, "PlanePositionSequence", "ImagePositionPatient")
            iop = _group_attr(ds, per, "PlaneOrientationSequence", "ImageOrientationPatient")
            ps = _group_attr(ds, per, "PixelMeasuresSequence", "PixelSpacing")
            if pos is None or iop is None or ps is None:
                raise GeometryError(f"frame {i + 1} lacks plane position, orientation or pixel spacing", path)
            slope = _num(_group_attr(ds, per, "PixelValueTransformationSequence", "RescaleSlope"))
            inter = _num(_group_attr(ds, per, "PixelValueTransformationSequence", "RescaleIntercept"))
            frames.append(_Frame(
                index=i, position=np.asarray(pos, float), iop=np.asarray(iop, float),
                pixel_spacing=np.asarray(ps, float),
                thickness=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SliceThickness")),
                spacing_between=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SpacingBetweenSlices")),
                slope=1.0 if slope is None else slope, intercept=0.0 if inter is None else inter,
                **common))
        return frames
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnsupportedFormatError("multi-frame file without per-frame plane positions", path)
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if not ds.get(k)]
    if missing:
        raise GeometryError(f"missing {', '.join(missing)}", path)
    return [_Frame(
        index=None, position=np.asarray(ds.ImagePositionPatient, float),
        iop=np.asarray(ds.ImageOrientationPatient, float),
        pixel_spacing=np.asarray(ds.PixelSpacing, float),
        thickness=_num(ds.get("SliceThickness")), spacing_between=_num(ds.get("SpacingBetweenSlices")),
        slope=_num(ds.get("RescaleSlope")) or 1.0, intercept=_num(ds.get("RescaleIntercept")) or 0.0,
        **common)]


def _check_consistent(frames: list[_Frame], label: Path) -> None:
    f0 = frames[0]
    for what, key in (("modalities", lambda f: f.modality), ("image sizes (rows x columns)",
                                                           lambda f: (f.rows, f.cols))):
        values = {key(f) for f in frames}
        if len(values) > 1:
            raise GeometryError(f"series mixes {what}: {sorted(map(str, values))}", label)
    iops = np.array([f.iop for f in frames])
    if np.abs(iops - f0.iop).max() > ORIENTATION_TOLERANCE:
        n = len({tuple(np.round(i, 3)) for i in iops})
        raise GeometryError(f"series mixes {n} slice orientations (ImageOrientationPatient)", label)
    ps = np.array([f.pixel_spacing for f in frames])
    if np.abs(ps - f0.pixel_spacing).max() > 1e-4 * max(1.0, float(f0.pixel_spacing.max())):
        raise GeometryError("series mixes pixel spacings", label)
    row, col = f0.iop[:3], f0.iop[3:]
    if abs(np.linalg.norm(row) - 1) > 1e-3 or abs(np.linalg.norm(col) - 1) > 1e-3 or abs(row @ col) > 1e-3:
        raise GeometryError("ImageOrientationPatient is not two orthogonal unit vectors", label)


def _slice_step(frames: list[_Frame], normal: np.ndarray, label: Path) -> np.ndarray:
    """LPS step between consecutive (sorted) slices, checked for gaps and duplicates."""
    if len(frames) == 1:
        size = frames[0].spacing_between or frames[0].thickness
        if not size or size <= 0:
            raise GeometryError("single slice without SpacingBetweenSlices or SliceThickness", label)
        return normal * size
    pos = np.array([f.position for f in frames])
    proj = pos @ normal
    gaps = np.diff(proj)
    median = float(np.median(gaps))
    dup = np.flatnonzero(gaps < 1e-3 * max(median, 1e-3) + 1e-6)
    if dup.size:
        names = ", ".join(frames[i + 1].file.name for i in dup[:3])
        raise GeometryError(f"{dup.size} duplicate slice position(s) (e.g. {names})", label)
    bad = np.flatnonzero(np.abs(gaps - median) > GAP_TOLERANCE * median)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / median
        kind = (f"missing {round(ratio) - 1} slice(s)" if abs(ratio - round(ratio)) < GAP_TOLERANCE
                and ratio > 1.5 else "non-uniform slice spacing")
        raise GeometryError(
            f"{kind}: gap of {gaps[i]:.4g} mm between slices {i + 1} and {i + 2} "
            f"({frames[i].file.name}, {frames[i + 1].file.name}); median gap {median:.4g} mm", label)
    step = (pos[-1] - pos[0]) / (len(frames) - 1)
    resid = pos - (pos[0] + np.outer(np.arange(len(frames)), step))
    if np.linalg.norm(resid, axis=1).max() > GAP_TOLERANCE * np.linalg.norm(step) + 1e-3:
        raise GeometryError("slice positions do not lie on a straight line", label)
    return step


def _storage_dtype(ds: Dataset, path: Path) -> np.dtype:
    bits = int(ds.get("BitsAllocated", 16))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    if bits not in (8, 16, 32):
        raise UnsupportedFormatError(f"BitsAllocated {bits} is not supported", path)
    return np.dtype(f"{'i' if signed else 'u'}{bits // 8}")


def _first(value: Any) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def _pixels(path: Path) -> np.ndarray:
    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except Exception as exc:  # truncated/corrupt pixel data, or no decoder for it
        raise InputError(f"cannot decode pixel data (truncated or corrupt file?): {exc}", path) from exc
    return arr


def _select(listing: SeriesListing, series_uid: str | None, label: Path) -> SeriesInfo:
    if listing.errors:
        bad = next(iter(listing.errors))
        raise InputError(f"{len(listing.errors)} unreadable DICOM file(s), e.g. {Path(bad).name}: "
                         f"{listing.errors[bad]}", label)
    if not listing:
        raise InputError(f"no DICOM image series found ({listing.skipped} non-image files skipped)", label)
    if series_uid is not None:
        found = [s for s in listing if s.series_uid == series_uid]
        if not found:
            raise InputError(f"the requested series is not among the {len(listing)} series found", label)
        return found[0]
    if len(listing) > 1:
        desc = "; ".join(f"#{s.series_number} {s.modality} ({s.n_frames} slices)" for s in listing)
        raise InputError(f"{len(listing)} series found ({desc}); choose one with series_uid "
                         "(see list_series)", label)
    return listing[0]


def _domain_for(modality: str, domain: str | None, label: Path) -> str:
    mapped = _DOMAIN_OF_MODALITY.get(modality)
    if domain is None:
        if mapped is None:
            raise UnsupportedFormatError(f"modality {modality!r} is not CT or MR; pass a domain", label)
        return mapped
    if domain not in DOMAINS or (mapped is not None and domain != mapped):
        raise InputError(f"domain {domain!r} does not fit modality {modality!r}", label)
    return domain


def _volume(frames: list[_Frame]) -> np.ndarray:
    """Rescaled voxels ``(i, j, k)`` of the sorted frames: int16/int32 when slopes and intercepts
    are integers (so values stay exact), float32 otherwise."""
    f0 = frames[0]
    integral = all(float(fr.slope).is_integer() and float(fr.intercept).is_integer() for fr in frames)
    vol = np.empty((f0.cols, f0.rows, len(frames)), dtype=np.int32 if integral else np.float32)
    i32 = np.iinfo(np.int32)
    cache: dict[Path, np.ndarray] = {}
    for k, fr in enumerate(frames):
        if fr.file not in cache:
            cache = {fr.file: _pixels(fr.file)}  # frames of one file are usually consecutive
        arr = cache[fr.file]
        plane = arr if fr.index is None or arr.ndim == 2 else arr[fr.index]
        if plane.shape != (fr.rows, fr.cols):
            raise InputError(f"pixel data shape {plane.shape} differs from Rows x Columns", fr.file)
        if integral:
            values = plane.T.astype(np.int64) * int(fr.slope) + int(fr.intercept)
            if values.min() < i32.min or values.max() > i32.max:
                raise UnsupportedFormatError("rescaled values overflow int32", fr.file)
            vol[:, :, k] = values
        else:
            vol[:, :, k] = (plane.T.astype(np.float64) * fr.slope + fr.intercept).astype(np.float32)
    if integral:
        i16 = np.iinfo(np.int16)
        if i16.min <= int(vol.min()) and int(vol.max()) <= i16.max:
            vol = vol.astype(np.int16)
    return vol


def _source_meta(first: Dataset, frames: list[_Frame], info: SeriesInfo, affine: np.ndarray,
                 storage: np.dtype) -> dict[str, Any]:
    """What a derived series needs from its source, as JSON-able values (see module docstring)."""
    template = Dataset()
    for kw in TEMPLATE_KEYWORDS:
        if kw in first:
            template[kw] = copy.deepcopy(first[kw])
    return {
        "template": template.to_json_dict(),
        "modality": info.modality,
        "sop_class_uid": frames[0].sop_class,
        "series_instance_uid": info.series_uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "series_number": info.series_number,
        "sop_instance_uids": [fr.sop_uid for fr in frames],
        "frame_numbers": [None if fr.index is None else fr.index + 1 for fr in frames],
        "image_type": [str(v) for v in (first.get("ImageType") or [])],
        "bits_allocated": int(first.get("BitsAllocated", 16)),
        "bits_stored": int(first.get("BitsStored", first.get("BitsAllocated", 16))),
        "pixel_representation": int(first.get("PixelRepresentation", 0)),
        "storage_dtype": str(storage),
        "rescale_slope": frames[0].slope,
        "rescale_intercept": frames[0].intercept,
        "rescale_varies": len({(fr.slope, fr.intercept) for fr in frames}) > 1,
        "window_center": _first(first.get("WindowCenter")),
        "window_width": _first(first.get("WindowWidth")),
        "slice_thickness": frames[0].thickness,
        "lossy_image_compression": str(first.get("LossyImageCompression", "")),
        "source_affine": affine.tolist(),
    }


@_quiet_pydicom()
def read_dicom_series(path_or_files: str | Path | Sequence[str | Path], series_uid: str | None = None,
                      domain: str | None = None) -> SpatialImage:
    """Read one CT/MR series as a ``(1, i, j, k)`` volume in physical units (HU for CT).

    ``series_uid`` picks a series when several are present. ``domain`` is needed only for
    modalities other than CT ("ct") and MR ("mri").
    """
    files, label = _files_of(path_or_files)
    info = _select(_scan(files), series_uid, label)
    domain = _domain_for(info.modality, domain, label)
    check_fits(decoded_bytes((info.n_frames, info.rows, info.columns), np.int32),
               f"a volume of {info.n_frames} slices of {info.rows}x{info.columns}", label)

    headers: dict[Path, Dataset] = {}
    frames: list[_Frame] = []
    for f in info.files:
        try:
            headers[f] = ds = _read_header(f)
            frames.extend(_frames_of(f, ds))
        except DomainSRError:
            raise
        except Exception as exc:  # changed since listed, or a corrupt element pydicom parses lazily
            raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}", f) from exc
    _check_consistent(frames, label)
    f0 = frames[0]
    row, col = f0.iop[:3], f0.iop[3:]
    normal = np.cross(row, col)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    step = _slice_step(frames, normal, label)
    lps = np.eye(4)
    lps[:3, 0] = row * f0.pixel_spacing[1]  # i: along a row, spacing between columns
    lps[:3, 1] = col * f0.pixel_spacing[0]  # j: down a column, spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = frames[0].position
    affine = _LPS_RAS @ lps

    first = headers[frames[0].file]
    storage = _storage_dtype(first, frames[0].file)
    vol = _volume(frames)
    try:
        meta = _source_meta(first, frames, info, affine, storage)
    except Exception as exc:  # a corrupt element pydicom parses lazily (unknown VR, bad number)
        raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}", frames[0].file) from exc
    return SpatialImage(
        data=vol[None],
        domain=domain,  # type: ignore[arg-type]
        geometry=MedicalGeometry(affine, vol.shape),
        units="HU" if info.modality == "CT" else "a.u.",
        provenance={"source": str(label), "format": "dicom"},
        meta={"dicom": meta, "storage_dtype": str(storage)},
    )


# --------------------------------------------------------------------------------------------
# Writing a derived series
# --------------------------------------------------------------------------------------------

def _ds_value(x: float) -> float:
    """``x`` as it survives a DICOM DS (decimal string, 16 characters)."""
    return float(format_number_as_ds(float(x)))


def choose_rescale(values: np.ndarray, dtype: np.dtype, slope: float | None,
                   intercept: float | None) -> tuple[float, float]:
    """RescaleSlope/Intercept so that ``values`` fit ``dtype`` without clipping.

    The source's own pair is kept when the range fits with it (values are then rounded to the
    source's quantisation); otherwise integer values get slope 1 and a shifted integer intercept,
    and anything else a slope spreading the range over the full dtype.
    """
    info = np.iinfo(dtype)
    lo, hi = float(values.min()), float(values.max())

    def fits(m: float, b: float) -> bool:
        return info.min <= np.rint((lo - b) / m) and np.rint((hi - b) / m) <= info.max

    if slope and intercept is not None and fits(slope, intercept):
        return float(slope), float(intercept)
    if np.all(values == np.rint(values)) and hi - lo <= info.max - info.min:
        b = _ds_value(np.floor(lo - info.min)) if lo < info.min else _ds_value(np.ceil(hi - info.max))
        if fits(1.0, b):
            return 1.0, b
    m = max(hi - lo, 1e-6) / (info.max - info.min - 2)  # 1 count margin each side for DS rounding
    m = _ds_value(m * (1 + 1e-9))
    b = _ds_value(lo - m * (info.min + 1))
    return m, b


def _scale_label(img: SpatialImage, src_affine: np.ndarray) -> str:
    src = np.linalg.norm(src_affine[:3, :3], axis=0)
    new = np.asarray(img.geometry.spacing)
    f = [float(v) for v in np.round(src / new, 3)]
    non_unit = {v for v in f if v != 1.0}
    fmt = "{:g}".format
    if len(non_unit) <= 1:
        return f"x{fmt(non_unit.pop() if non_unit else 1)}"
    return "x" + "x".join(fmt(v) for v in f)


def _code_item(code: Any) -> Dataset:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def _ref_item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _series_dataset(dm: dict[str, Any], factors: str, model_name: str, description: str) -> Dataset:
    """Everything the derived instances share: source template, new series, derivation, refs."""
    modality = dm["modality"]
    ds = Dataset.from_json(dm["template"])
    for kw in _TYPE2 + (_TYPE2_CT if modality == "CT" else _TYPE2_MR):
        if kw not in ds:
            setattr(ds, kw, None)
    if modality == "MR":
        ds.ScanningSequence = ds.get("ScanningSequence") or "RM"  # research mode
        ds.SequenceVariant = ds.get("SequenceVariant") or "NONE"
    now = _dt.datetime.now()
    ds.SOPClassUID = _SOP_CLASS_OF_MODALITY[modality]
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    number = dm.get("series_number")
    ds.SeriesNumber = (int(number) if number is not None else 0) + 1000
    ds.SeriesDescription = (f"SR {factors} {model_name}" + (f" {description}" if description else ""))[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    src_type = dm["image_type"]
    value3 = src_type[2] if len(src_type) > 2 and src_type[2] else ("AXIAL" if modality == "CT" else "OTHER")
    ds.ImageType = ["DERIVED", "SECONDARY", value3, "AI ENHANCED"]
    ds.DerivationDescription = (
        f"AI-enhanced (super-resolution {factors}) by DomainSR model {model_name}; derived image, "
        "not acquired" + (f". {description}" if description else ""))[:1024]
    ds.DerivationCodeSequence = [_code_item(codes.DCM.SpatialResampling)]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = dm.get("lossy_image_compression") or "00"
    if dm.get("window_center") is not None and dm.get("window_width") is not None:
        ds.WindowCenter = format_number_as_ds(dm["window_center"])
        ds.WindowWidth = format_number_as_ds(dm["window_width"])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _add_references(ds: Dataset, dm: dict[str, Any], src_k: float) -> None:
    """SourceImageSequence: the source slices either side of (fractional) source index ``src_k``
    (the nearest one when outside); ReferencedSeriesSequence: the source series with those
    instances (the Common Instance Reference module lists what the instance references)."""
    uids, frames, n = dm["sop_instance_uids"], dm["frame_numbers"], len(dm["sop_instance_uids"])
    near = sorted({int(np.floor(src_k)), int(np.ceil(src_k))} & set(range(n))) or [
        int(np.clip(round(src_k), 0, n - 1))]
    purpose = _code_item(codes.DCM.SourceImageForImageProcessingOperation)
    sources = []
    for s in near:
        item = _ref_item(dm["sop_class_uid"], uids[s])
        if frames[s] is not None:
            item.ReferencedFrameNumber = frames[s]
        item.PurposeOfReferenceCodeSequence = [purpose]
        sources.append(item)
    ds.SourceImageSequence = sources
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = dm["series_instance_uid"]
    ref_series.ReferencedInstanceSequence = [
        _ref_item(dm["sop_class_uid"], uid) for uid in dict.fromkeys(uids[s] for s in near)]
    ds.ReferencedSeriesSequence = [ref_series]


@_quiet_pydicom()
def write_derived_series(img: SpatialImage, out_dir: str | Path, *, model_name: str,
                         description: str = "", overwrite: bool = False) -> Path:
    """Write ``img`` (read by :func:`read_dicom_series`, then enhanced) as a new DICOM series.

    One classic CT/MR Image Storage file per slice ``k`` in ``out_dir``, written atomically as a
    whole folder: new Series/SOP Instance UIDs, the source's patient/study tags, ImageType
    ``DERIVED\\SECONDARY\\<value 3>\\AI ENHANCED``, a DerivationDescription naming the model,
    references to the source series and instances, plane geometry from ``img.geometry``
    (SliceThickness = SpacingBetweenSlices = the new slice step), and a RescaleSlope/Intercept
    under which the values fit the stored 16-bit integers without clipping (:func:`choose_rescale`).
    An existing non-empty ``out_dir`` is refused unless ``overwrite``.
    """
    out = Path(out_dir)
    dm: dict[str, Any] | None = img.meta.get("dicom")
    if not dm:
        raise OutputError("image has no DICOM source metadata (meta['dicom']); a derived series "
                          "needs a source series read by read_dicom_series", out)
    if not isinstance(img.geometry, MedicalGeometry) or img.geometry.ndim != 3 or img.channels != 1:
        raise OutputError(f"a DICOM series needs one channel on a 3D grid, got {img.data.shape}", out)
    if dm["modality"] not in _SOP_CLASS_OF_MODALITY:
        raise OutputError(f"derived series are written for CT and MR only, not {dm['modality']!r}", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError("output folder exists and is not empty (pass overwrite=True)", out)

    values = np.asarray(img.data[0], dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise OutputError(f"{bad} non-finite values cannot be stored in DICOM", out)
    src_dtype = np.dtype(dm["storage_dtype"])
    dtype = src_dtype if src_dtype.itemsize == 2 else np.dtype(np.int16)
    slope, intercept = choose_rescale(values, dtype, dm.get("rescale_slope"), dm.get("rescale_intercept"))
    info = np.iinfo(dtype)
    stored = np.clip(np.rint((values - intercept) / slope), info.min, info.max).astype(dtype.newbyteorder("<"))

    lps = _LPS_RAS @ img.geometry.affine
    col_spacing, row_spacing = (float(v) for v in np.linalg.norm(lps[:3, :2], axis=0))
    row_cos, col_cos = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    if abs(row_cos @ col_cos) > ORIENTATION_TOLERANCE:
        raise OutputError("in-plane axes i, j are not orthogonal; not a DICOM image plane", out)
    normal = np.cross(row_cos, col_cos)
    slice_gap = abs(float(lps[:3, 2] @ normal))
    ni, nj, nk = img.geometry.shape

    src_affine = np.asarray(dm["source_affine"])
    to_source = np.linalg.inv(src_affine) @ img.geometry.affine
    base = _series_dataset(dm, _scale_label(img, src_affine), model_name, description)
    base.ImageOrientationPatient = [format_number_as_ds(float(v)) for v in (*row_cos, *col_cos)]
    base.PixelSpacing = [format_number_as_ds(row_spacing), format_number_as_ds(col_spacing)]
    base.SliceThickness = base.SpacingBetweenSlices = format_number_as_ds(slice_gap)
    base.Rows, base.Columns = nj, ni
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1 if dtype.kind == "i" else 0
    base.RescaleSlope = format_number_as_ds(slope)
    base.RescaleIntercept = format_number_as_ds(intercept)
    if dm["modality"] == "CT":
        base.RescaleType = "HU"

    with atomic_path(out, is_dir=True) as tmp:
        for k in range(nk):
            ds = Dataset(base)  # shallow: every per-slice element below is a new element
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = lps[:3, 3] + k * lps[:3, 2]
            ds.ImagePositionPatient = [format_number_as_ds(float(v)) for v in position]
            ds.SliceLocation = format_number_as_ds(float(position @ normal))
            _add_references(ds, dm, float((to_source @ [(ni - 1) / 2, (nj - 1) / 2, k, 1.0])[2]))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return out
