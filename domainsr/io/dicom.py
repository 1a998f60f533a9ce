"""DICOM CT/MR series -> volume (pydicom, nibabel.nicom), and an AI-derived series back (pydicom + highdicom).

Reading
    A series (classic single-frame files, enhanced multi-frame files with per-frame functional
    groups, or Siemens mosaics) becomes ``data`` of shape ``(1, i, j, k)``: ``i`` runs along a row
    (columns), ``j`` down the columns (rows), ``k`` across slices sorted by the projection of
    ImagePositionPatient on the slice normal (row cosine x column cosine). RescaleSlope/Intercept
    are applied (CT -> HU). The affine maps voxel centres to RAS+ mm (DICOM LPS with x and y
    negated). Direction cosines are stored with ~6 digits: they are normalised and made exactly
    orthogonal (within ``ORIENTATION_TOLERANCE``), so the in-plane columns of the affine are exactly
    PixelSpacing long. The slice column is the step *measured* from the positions (least squares),
    never SliceThickness; positions are rounded decimals, so the step is reported at the
    precision the positions carry (the simplest decimal within their rounding, e.g. 7.0 mm from GE
    positions rounded to 0.1 mm, whose gaps read 6.96-7.07 mm), as dcm2niix does, with a warning
    when the measured gaps spread beyond float noise. Only a single slice has no measured step:
    there SpacingBetweenSlices, else SliceThickness, is the slice size (the one documented fallback).

    A **Siemens mosaic** (ImageType MOSAIC, CSA header) holds a whole volume in one image;
    nibabel's ``nicom.dicomwrappers.MosaicWrapper`` unpacks it into its tiles and gives their
    positions (CSA slice normal, SpacingBetweenSlices). A **multi-volume series** (diffusion
    b-values or directions, time points, acquisitions, echoes, several mosaics) is split into its
    volumes: :func:`list_series` lists one :class:`SeriesInfo` per volume and
    :func:`read_dicom_series` reads one (``volume=``), never a series of duplicated positions.

    Refused with a GeometryError naming the series: missing or duplicated slices, non-uniform
    spacing (beyond the rounding of the positions), mixed orientations, modalities, matrix sizes
    or pixel spacings. A **gantry tilt** is kept, not resampled: the slices still lie on a
    straight line, so the measured step leans by the tilt and the affine is sheared; every voxel
    stays exactly where the scanner put it, the model runs on the acquired grid, and the derived
    series writes the same tilted positions (and GantryDetectorTilt) back.

    ``img.meta["dicom"]`` is a JSON-able dict: ``template`` (every attribute of the first slice
    in the modules a derived image shares with its source, see :func:`carried_keywords`, as
    ``Dataset.to_json_dict()``) and ``template_b64`` (the same, DICOM-encoded, so that values keep
    their exact encoding), the source series and SOP instance UIDs in ``k`` order, the volume
    read, the slice normal, the pixel storage, the rescale and window values and the source
    affine. Patient tags are never logged nor put in error messages.

Writing
    :func:`write_derived_series` hand-builds classic CT/MR Image Storage instances with pydicom,
    one file per slice. highdicom's classes do not fit: ``SCImage`` (Secondary Capture) has no
    Image Plane module (only PatientOrientation letters), so viewers could neither stack nor
    measure the slices, and the Legacy Converted Enhanced classes produce one multi-frame
    "legacy converted" object, which misstates what a derived, resampled series is. highdicom's
    ``CodedConcept`` builds the coded items (derivation 113085 "Spatial resampling", purpose
    121322 "Source image for image processing operation") and its copy of the standard's module
    tables says which attributes are carried. Every module that still applies is copied from the
    source (patient, study, series context, frame of reference, equipment, acquisition,
    contrast/bolus, the CT/MR acquisition parameters); nothing at the patient, study, equipment or
    frame-of-reference level is added that the source lacks. Each derived slice references, in
    SourceImageSequence and ReferencedSeriesSequence, the source slices either side of it.
    pydicom's value validation is switched off during reads and writes (it logs offending values
    verbatim, which could be patient tags); that switch is process-global while it lasts.

Validation
    The tests run dicom3tools' ``dciodvfy`` (IOD) and ``dcentvfy`` (entity consistency between the
    source and the derived instances) and ``dcm2niix`` (the affine it reads back) on derived
    series of each kind; see tests/io/test_dicom_validators.py.
"""
from __future__ import annotations

import base64
import copy
import datetime as _dt
import logging
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pydicom.config
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
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

with warnings.catch_warnings():  # nibabel.nicom warns on import that its readers are experimental
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader, dicomwrappers

log = logging.getLogger("domainsr.io.dicom")

_LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
_DOMAIN_OF_MODALITY = {"CT": "ct", "MR": "mri"}
_SOP_CLASS_OF_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
GAP_TOLERANCE = 0.01  # relative to the median slice gap (beyond the rounding of the positions)
ORIENTATION_TOLERANCE = 1e-4  # on direction cosines
SQRT3 = float(np.sqrt(3.0))
MAX_POSITION_ROUNDING = 0.1  # mm: coarser-looking positions (integers) are not taken as rounded
COSINE_ROUNDING = 1e-5  # direction cosines are stored with at least ~5 decimals

# Modules of the CT/MR Image IODs whose attributes a derived image shares with its source, copied
# whole from the first source slice (module tables: highdicom's copy of DICOM PS3.3).
_CARRIED_MODULES = (
    "patient", "clinical-trial-subject", "general-study", "patient-study", "clinical-trial-study",
    "general-series", "clinical-trial-series", "frame-of-reference", "synchronization",
    "general-equipment", "general-acquisition", "contrast-bolus", "device", "specimen",
    "enhanced-patient-orientation",
)
_IMAGE_MODULE = {"CT": "ct-image", "MR": "mr-image"}
# ... and from the modules the writer rebuilds, the attributes that still describe the derived image.
_CARRIED_EXTRA = ("SpecificCharacterSet", "TimezoneOffsetFromUTC", "ImageLaterality", "AnatomicRegionSequence",
                  "PrimaryAnatomicStructureSequence", "PatientOrientation", "QualityControlImage")
# Recomputed for the derived series (new series, pixel description, values) or no longer true of it.
_NOT_CARRIED = frozenset((
    "SeriesInstanceUID", "SeriesNumber", "SeriesDate", "SeriesTime", "SeriesDescription",
    "SeriesDescriptionCodeSequence", "SmallestPixelValueInSeries", "LargestPixelValueInSeries",
    "RelatedSeriesSequence", "Modality", "ImageType", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "RescaleIntercept", "RescaleSlope", "RescaleType",
    "PixelPaddingValue", "PixelPaddingRangeLimit",
))
# Image-level Type 1/2 attributes of the CT/MR Image modules: present in every derived instance.
_TYPE2_CT = ("KVP", "AcquisitionNumber")
_TYPE2_MR = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength")


@lru_cache(maxsize=2)
def carried_keywords(modality: str) -> frozenset[str]:
    """Keywords a derived ``modality`` image copies from its source (module-level attributes of
    ``_CARRIED_MODULES`` and the CT/MR Image module, less what the writer recomputes)."""
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    modules = (*_CARRIED_MODULES, _IMAGE_MODULE.get(modality, "ct-image"))
    names = {a["keyword"] for m in modules for a in table[m] if not a["path"]}
    return frozenset((names | set(_CARRIED_EXTRA)) - _NOT_CARRIED)


# --------------------------------------------------------------------------------------------
# Finding series
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeriesInfo:
    """One image series found on disk (no patient tags); for a multi-volume series, one volume:
    ``volume`` (0-based, ``None`` for a single-volume series) of ``n_volumes``, ``volume_label``
    saying what sets it apart (e.g. ``b=1000``, ``time point 3``)."""

    series_uid: str
    modality: str
    series_number: int | None
    description: str
    files: tuple[Path, ...]
    n_frames: int
    rows: int
    columns: int
    volume: int | None = None
    n_volumes: int = 1
    volume_label: str = ""


class SeriesListing(list):
    """``list[SeriesInfo]`` plus what was left out: ``skipped`` (files that are not DICOM images,
    e.g. text files, DICOMDIR, structured reports) and ``errors`` (``{path: problem}`` for files
    that claim to be DICOM but cannot be parsed)."""

    def __init__(self, items: Iterable[SeriesInfo] = (), skipped: int = 0,
                 errors: dict[str, str] | None = None) -> None:
        super().__init__(items)
        self.skipped = skipped
        self.errors = dict(errors or {})
        self.headers: dict[str, list[tuple[Path, Dataset]]] = {}  # series UID -> headers, when kept


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
    list of files) by SeriesInstanceUID, in the order first found; a multi-volume series is
    listed once per volume (same ``series_uid``, its own ``files`` and ``volume``)."""
    return _scan(_files_of(paths)[0])


_SCANNED = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfFrames",
            "Rows", "Columns", "SOPClassUID")


def _scan(files: list[Path], keep_headers: bool = False) -> SeriesListing:
    """List the series of ``files``; ``keep_headers`` keeps the parsed headers (for reading them:
    a listing of a whole inbox does not hold every header in memory)."""
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
    listing = SeriesListing(skipped=skipped, errors=errors)
    for uid, members in groups.items():
        if keep_headers:
            listing.headers[uid] = members
        listing.extend(_series_infos(uid, members))
    return listing


def _series_infos(uid: str, members: list[tuple[Path, Dataset]]) -> list[SeriesInfo]:
    """One SeriesInfo per volume of a series (one for a single volume, or when its geometry
    cannot be parsed: reading it then names the problem)."""
    first = members[0][1]
    try:
        number: int | None = int(first.get("SeriesNumber"))
    except (TypeError, ValueError):
        number = None
    base = {"series_uid": uid, "modality": str(first.get("Modality", "")), "series_number": number,
            "description": str(first.get("SeriesDescription", ""))}
    try:
        frames = [fr for f, ds in members for fr in _frames_of(f, ds)]
        volumes = _volumes_of(frames)
    except Exception:  # noqa: BLE001 - listing never fails on one series; reading it reports why
        return [SeriesInfo(**base, files=tuple(f for f, _ in members),
                           n_frames=sum(int(ds.get("NumberOfFrames") or 1) for _, ds in members),
                           rows=int(first.Rows), columns=int(first.Columns))]
    many = len(volumes) > 1
    return [SeriesInfo(**base, files=tuple(dict.fromkeys(fr.file for fr in vol)), n_frames=len(vol),
                       rows=vol[0].rows, columns=vol[0].cols, volume=n if many else None,
                       n_volumes=len(volumes), volume_label=name)
            for n, (name, vol) in enumerate(volumes)]


# --------------------------------------------------------------------------------------------
# Reading a series
# --------------------------------------------------------------------------------------------

@dataclass
class _Frame:
    file: Path
    index: int | None  # frame (or mosaic tile) index in its file; None for a single-frame file
    sop_uid: str
    sop_class: str
    modality: str
    rows: int
    cols: int
    position: np.ndarray  # LPS mm
    iop: np.ndarray  # 6 direction cosines, as stored
    pixel_spacing: np.ndarray  # (between rows, between columns)
    thickness: float | None
    spacing_between: float | None
    slope: float
    intercept: float
    rounding: float = 0.0  # decimal step the stored position was rounded to (mm)
    volume_keys: dict[str, Any] = field(default_factory=dict)  # what may set volumes apart
    mosaic: bool = False


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


def _rounding(values: Iterable[Any]) -> float:
    """The decimal step stored numbers were rounded to: ``"-75.7"`` -> 0.1 (the finest of the values)."""
    decimals = 0
    for v in values:
        text = str(getattr(v, "original_string", None) or v).strip().lower()
        mantissa, _, exponent = text.partition("e")
        places = len(mantissa.partition(".")[2])
        try:
            places -= int(exponent) if exponent else 0
        except ValueError:
            pass
        decimals = max(decimals, places)
    return min(10.0 ** -min(decimals, 15), MAX_POSITION_ROUNDING)


def _csa(ds: Dataset) -> dict | None:
    """The Siemens CSA image header (nibabel.nicom), or ``None``."""
    try:
        return csareader.get_csa_header(ds)
    except Exception:  # noqa: BLE001 - a damaged private header is ignored unless a mosaic needs it
        return None


def _is_mosaic(ds: Dataset) -> bool:
    return "MOSAIC" in [str(v).upper() for v in (ds.get("ImageType") or [])]


def _key(value: Any) -> Any:
    """A volume attribute as a hashable, comparable key (``None`` when absent or empty)."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        return tuple(_key(v) for v in value) or None
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


def _volume_keys(ds: Dataset, per: Dataset | None = None, csa: dict | None = None) -> dict[str, Any]:
    """The attributes that tell the volumes of a multi-volume series apart, for one frame."""
    b = _num(_group_attr(ds, per, "MRDiffusionSequence", "DiffusionBValue")) if per is not None else None
    b = _num(ds.get("DiffusionBValue")) if b is None else b
    direction = ds.get("DiffusionGradientOrientation")
    if b is None and csa:
        b, direction = csareader.get_b_value(csa), csareader.get_g_vector(csa)
    keys: dict[str, Any] = {}
    if b is not None:
        g = np.zeros(3) if direction is None else np.asarray(direction, float)
        keys["diffusion"] = (round(float(b), 1), tuple(float(v) for v in np.round(g, 3) + 0.0))
    time_point = _group_attr(ds, per, "FrameContentSequence", "TemporalPositionIndex") if per is not None else None
    keys["time point"] = _key(time_point if time_point is not None else ds.get("TemporalPositionIdentifier"))
    keys["acquisition"] = _key(ds.get("AcquisitionNumber"))
    keys["echo"] = _key(ds.get("EchoNumbers"))
    keys["trigger time"] = _key(ds.get("TriggerTime"))
    return keys


def _frames_of(path: Path, ds: Dataset) -> list[_Frame]:
    common: dict[str, Any] = {
        "file": path, "sop_uid": str(ds.get("SOPInstanceUID", "")),
        "sop_class": str(ds.get("SOPClassUID", "")), "modality": str(ds.get("Modality", ""))}
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise UnsupportedFormatError("colour DICOM images are not supported", path)
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        return _multiframe_frames(path, ds, common)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        raise UnsupportedFormatError("multi-frame file without per-frame plane positions", path)
    missing = [k for k in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing")
               if not ds.get(k)]
    if missing:
        raise GeometryError(f"missing {', '.join(missing)}", path)
    csa = _csa(ds)
    plane = {"iop": np.asarray(ds.ImageOrientationPatient, float),
             "pixel_spacing": np.asarray(ds.PixelSpacing, float),
             "thickness": _num(ds.get("SliceThickness")), "spacing_between": _num(ds.get("SpacingBetweenSlices")),
             "slope": _num(ds.get("RescaleSlope")) or 1.0, "intercept": _num(ds.get("RescaleIntercept")) or 0.0,
             "rounding": _rounding(ds.ImagePositionPatient), "volume_keys": _volume_keys(ds, csa=csa)}
    if _is_mosaic(ds):
        return _mosaic_frames(path, ds, csa, {**common, **plane})
    return [_Frame(index=None, position=np.asarray(ds.ImagePositionPatient, float), rows=int(ds.Rows),
                   cols=int(ds.Columns), **common, **plane)]


def _multiframe_frames(path: Path, ds: Dataset, common: dict[str, Any]) -> list[_Frame]:
    """The frames of an enhanced multi-frame file (per-frame, else shared, functional groups)."""
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
            pixel_spacing=np.asarray(ps, float), rows=int(ds.Rows), cols=int(ds.Columns),
            thickness=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SliceThickness")),
            spacing_between=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SpacingBetweenSlices")),
            slope=1.0 if slope is None else slope, intercept=0.0 if inter is None else inter,
            rounding=_rounding(pos), volume_keys=_volume_keys(ds, per), **common))
    return frames


def _mosaic(ds: Dataset, csa: dict | None, path: Path) -> dicomwrappers.MosaicWrapper:
    if not csa:
        raise UnsupportedFormatError("Siemens mosaic (ImageType MOSAIC) without a readable CSA header", path)
    try:
        return dicomwrappers.MosaicWrapper(ds, csa_header=csa)
    except dicomwrappers.WrapperError as exc:
        raise UnsupportedFormatError(f"Siemens mosaic cannot be unpacked: {exc}", path) from exc


def _mosaic_frames(path: Path, ds: Dataset, csa: dict | None, plane: dict[str, Any]) -> list[_Frame]:
    """The tiles of a Siemens mosaic as frames: nibabel gives the tile size, the position of the
    first tile (corrected for the mosaic offset) and the slice normal (signed by the CSA header);
    tile ``k`` lies ``k`` slice steps (SpacingBetweenSlices, else SliceThickness) along it."""
    wrapper = _mosaic(ds, csa, path)
    try:
        rows, cols, n = wrapper.image_shape
        first, csa_normal = np.asarray(wrapper.image_position, float), np.asarray(wrapper.slice_normal, float)
        step = float(wrapper.voxel_sizes[2])
    except (TypeError, ValueError, AssertionError, csareader.CSAError) as exc:
        raise UnsupportedFormatError(f"Siemens mosaic geometry cannot be read: {exc}", path) from exc
    if rows * wrapper.mosaic_size != int(ds.Rows) or cols * wrapper.mosaic_size != int(ds.Columns):
        raise UnsupportedFormatError(f"mosaic of {ds.Rows}x{ds.Columns} is not {wrapper.mosaic_size}"
                                     f"x{wrapper.mosaic_size} tiles of {n} slices", path)
    normal = np.cross(*_orthonormal(plane["iop"]))  # unit length; nibabel's is the raw cosines' cross
    normal *= np.sign(normal @ csa_normal) or 1.0
    keys = {**plane.pop("volume_keys"), "mosaic": str(path)}
    return [_Frame(index=k, position=first + k * step * normal, rows=int(rows), cols=int(cols), mosaic=True,
                   volume_keys=keys, **plane) for k in range(int(n))]


def _orthonormal(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines made unit length and exactly orthogonal (the nearest orthonormal
    pair, by polar decomposition): stored cosines carry ~6 digits."""
    u, _, vt = np.linalg.svd(np.column_stack([iop[:3], iop[3:]]), full_matrices=False)
    q = u @ vt
    return q[:, 0], q[:, 1]


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


def _normal_of(frames: list[_Frame]) -> np.ndarray:
    return np.cross(*_orthonormal(frames[0].iop))


def _same_position_tolerance(frames: list[_Frame]) -> float:
    """Two slices closer than this (mm, along the normal) are at the same position."""
    return max(1e-3, SQRT3 * max(fr.rounding for fr in frames))


def _in_order(values: list[Any]) -> list[Any]:
    """``values`` sorted (b-values, time points...), or as first found when they do not compare."""
    try:
        return sorted(values)
    except TypeError:
        return values


def _volume_label(name: str, value: Any, n: int) -> str:
    if name == "diffusion":
        b, g = value
        return f"b={b:g}" + (f" direction ({', '.join(f'{v:g}' for v in g)})" if any(g) else "")
    if name == "mosaic":
        return f"mosaic {n + 1}"
    return f"{name} {value:g}" if isinstance(value, float) else f"{name} {value}"


def _volumes_of(frames: list[_Frame]) -> list[tuple[str, list[_Frame]]]:
    """The volumes of a series, ``[(label, frames)]``: one (label ``""``) unless slice positions
    repeat and one attribute (b-value and direction, time point, acquisition, echo, trigger time,
    mosaic file) splits the frames into volumes that each hold every position exactly once."""
    normal = _normal_of(frames)
    tol = _same_position_tolerance(frames)
    proj = np.sort([float(fr.position @ normal) for fr in frames])
    if len(proj) < 2 or np.diff(proj).min() > tol:
        return [("", frames)]
    for name in ("diffusion", "time point", "acquisition", "echo", "trigger time", "mosaic"):
        values = [fr.volume_keys.get(name) for fr in frames]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[Any, list[_Frame]] = {}
        for fr, v in zip(frames, values):
            groups.setdefault(v, []).append(fr)
        sets = [np.sort([float(fr.position @ normal) for fr in g]) for g in groups.values()]
        distinct = all(len(s) < 2 or np.diff(s).min() > tol for s in sets)
        if distinct and all(len(s) == len(sets[0]) and np.allclose(s, sets[0], atol=tol) for s in sets):
            return [(_volume_label(name, v, n), groups[v]) for n, v in enumerate(_in_order(list(groups)))]
    return [("", frames)]


def _pick_volume(volumes: list[tuple[str, list[_Frame]]], volume: int | None,
                 label: Path) -> tuple[int | None, str, list[_Frame]]:
    """The volume to read: the only one, or ``volume`` (an index into ``volumes``)."""
    if len(volumes) == 1:
        return None, volumes[0][0], volumes[0][1]
    names = ", ".join(f"{n}: {name}" for n, (name, _) in enumerate(volumes))
    if volume is None:
        raise UnsupportedFormatError(
            f"multi-volume series: {len(volumes)} volumes of {len(volumes[0][1])} slices at the same positions "
            f"({names}); read one with volume=N (list_series lists each volume as its own item)", label)
    if not 0 <= volume < len(volumes):
        raise InputError(f"volume {volume} is not among the series' {len(volumes)} volumes ({names})", label)
    return volume, volumes[volume][0], volumes[volume][1]


def _fitted_step(pos: np.ndarray) -> np.ndarray:
    """Least-squares step between consecutive positions (rows of ``pos``)."""
    k = np.arange(len(pos)) - (len(pos) - 1) / 2
    return k @ (pos - pos.mean(axis=0)) / float(k @ k)


def _simplest(x: float, tol: float) -> float:
    """The decimal with the fewest digits within ``tol`` of ``x`` (``x`` itself if none is)."""
    for places in range(13):
        r = round(x, places)
        if abs(r - x) <= tol:
            return r
    return x


def _clean_step(step: np.ndarray, normal: np.ndarray, gap_tol: float, across_tol: float) -> np.ndarray:
    """``step`` at the precision the positions carry: its component along the normal is the
    simplest decimal within ``gap_tol``; an in-plane component below ``across_tol`` (rounding of
    positions and cosines, not a gantry tilt) is dropped."""
    along = float(step @ normal)
    across = step - along * normal
    gap = _simplest(along, gap_tol)
    if np.linalg.norm(across) <= across_tol:
        return normal * gap
    return step * (gap / along)


def _slice_step(frames: list[_Frame], normal: np.ndarray, label: Path, series: str) -> np.ndarray:
    """LPS step between consecutive (sorted) slices, checked for gaps and duplicates. Positions
    are rounded decimals: gaps may spread by what that rounding allows (as dcm2niix, with a
    warning), never by a missing slice or a true gap."""
    if len(frames) == 1:
        size = frames[0].spacing_between or frames[0].thickness
        if not size or size <= 0:
            raise GeometryError("single slice without SpacingBetweenSlices or SliceThickness", label)
        return normal * size
    pos = np.array([f.position for f in frames])
    gaps = np.diff(pos @ normal)
    median = float(np.median(gaps))
    dup = np.flatnonzero(gaps < 1e-3 * max(median, 1e-3) + 1e-6)
    if dup.size:
        names = ", ".join(frames[i + 1].file.name for i in dup[:3])
        raise GeometryError(f"{dup.size} duplicate slice position(s) (e.g. {names})", label)
    rounding = max(f.rounding for f in frames)
    allowed = max(GAP_TOLERANCE * median, SQRT3 * rounding)
    spread = np.abs(gaps - median)
    bad = np.flatnonzero(spread > allowed)
    if bad.size:
        i = int(bad[0])
        ratio = gaps[i] / median
        kind = (f"missing {round(ratio) - 1} slice(s)" if abs(ratio - round(ratio)) < GAP_TOLERANCE
                and ratio > 1.5 else "non-uniform slice spacing")
        raise GeometryError(
            f"{kind}: gap of {gaps[i]:.4g} mm between slices {i + 1} and {i + 2} "
            f"({frames[i].file.name}, {frames[i + 1].file.name}); median gap {median:.4g} mm", label)
    step = _fitted_step(pos)
    resid = pos - (pos.mean(axis=0) + np.outer(np.arange(len(frames)) - (len(frames) - 1) / 2, step))
    if np.linalg.norm(resid, axis=1).max() > GAP_TOLERANCE * np.linalg.norm(step) + 1e-3 + SQRT3 * rounding:
        raise GeometryError("slice positions do not lie on a straight line", label)
    if spread.max() > max(1e-4 * median, 1e-6):
        log.warning("DICOM series %s: slice gaps spread %.4g-%.4g mm (positions rounded to %g mm); "
                    "the slice step is fitted to all positions", series, gaps.min(), gaps.max(), rounding)
    gap_tol = 2 * SQRT3 * rounding / (len(frames) - 1) + 1e-12
    return _clean_step(step, normal, gap_tol, 2 * gap_tol + SQRT3 * COSINE_ROUNDING * abs(median))


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


def _pixels(path: Path, mosaic: bool = False) -> np.ndarray:
    """The stored pixels of a file: ``(rows, cols)``, or ``(frames, rows, cols)`` for a multi-frame
    file or a mosaic (its tiles, unpacked by nibabel)."""
    try:
        ds = pydicom.dcmread(path)
        if mosaic:
            return np.moveaxis(_mosaic(ds, _csa(ds), path).get_unscaled_data(), -1, 0)
        return ds.pixel_array
    except DomainSRError:
        raise
    except Exception as exc:  # truncated/corrupt pixel data, or no decoder for it
        raise InputError(f"cannot decode pixel data (truncated or corrupt file?): {exc}", path) from exc


def _select(listing: SeriesListing, series_uid: str | None, label: Path) -> list[SeriesInfo]:
    """The listed entries (one per volume) of the series to read."""
    if listing.errors:
        bad = next(iter(listing.errors))
        raise InputError(f"{len(listing.errors)} unreadable DICOM file(s), e.g. {Path(bad).name}: "
                         f"{listing.errors[bad]}", label)
    if not listing:
        raise InputError(f"no DICOM image series found ({listing.skipped} non-image files skipped)", label)
    by_uid: dict[str, list[SeriesInfo]] = {}
    for s in listing:
        by_uid.setdefault(s.series_uid, []).append(s)
    if series_uid is not None:
        if series_uid not in by_uid:
            raise InputError(f"the requested series is not among the {len(by_uid)} series found", label)
        return by_uid[series_uid]
    if len(by_uid) > 1:
        desc = "; ".join(f"#{s[0].series_number} {s[0].modality} ({sum(v.n_frames for v in s)} slices)"
                         for s in by_uid.values())
        raise InputError(f"{len(by_uid)} series found ({desc}); choose one with series_uid "
                         "(see list_series)", label)
    return next(iter(by_uid.values()))


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
            cache = {fr.file: _pixels(fr.file, fr.mosaic)}  # frames of one file are usually consecutive
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


def _encode(ds: Dataset) -> str:
    """``ds`` DICOM-encoded (explicit VR little endian), base64: values keep their exact encoding."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return base64.b64encode(fp.getvalue()).decode("ascii")


def _decode(text: str) -> Dataset:
    return read_dataset(DicomBytesIO(base64.b64decode(text)), is_implicit_VR=False, is_little_endian=True)


def _template(first: Dataset, modality: str) -> Dataset:
    """The attributes of ``first`` a derived image carries over (see :func:`carried_keywords`)."""
    keep = carried_keywords(modality)
    template = Dataset()
    for elem in first:
        if elem.keyword in keep:
            template.add(copy.deepcopy(elem))
    return template


def _source_meta(first: Dataset, frames: list[_Frame], info: SeriesInfo, affine: np.ndarray,
                 storage: np.dtype, volume: tuple[int | None, str, int]) -> dict[str, Any]:
    """What a derived series needs from its source, as JSON-able values (see module docstring)."""
    template = _template(first, info.modality)
    index, name, n_volumes = volume
    normal = _LPS_RAS[:3, :3] @ _normal_of(frames)
    return {
        "template": template.to_json_dict(),
        "template_b64": _encode(template),
        "modality": info.modality,
        "sop_class_uid": frames[0].sop_class,
        "series_instance_uid": info.series_uid,
        "study_instance_uid": str(first.get("StudyInstanceUID", "")),
        "series_number": info.series_number,
        "volume": index,
        "volume_label": name,
        "n_volumes": n_volumes,
        "slice_normal": normal.tolist(),
        "n_source_slices": len(frames),
        "sop_instance_uids": [fr.sop_uid for fr in frames],
        "frame_numbers": [None if fr.index is None or fr.mosaic else fr.index + 1 for fr in frames],
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


def _series_frames(listing: SeriesListing, uid: str) -> tuple[dict[Path, Dataset], list[_Frame]]:
    headers = dict(listing.headers[uid])
    frames: list[_Frame] = []
    for f, ds in headers.items():
        try:
            frames.extend(_frames_of(f, ds))
        except DomainSRError:
            raise
        except Exception as exc:  # a corrupt element pydicom parses lazily
            raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}", f) from exc
    return headers, frames


def _series_name(info: SeriesInfo) -> str:
    """How warnings name a series: its number, never a path or patient tag."""
    return f"#{info.series_number}" if info.series_number is not None else "(no series number)"


@_quiet_pydicom()
def read_dicom_series(path_or_files: str | Path | Sequence[str | Path], series_uid: str | None = None,
                      domain: str | None = None, volume: int | None = None) -> SpatialImage:
    """Read one CT/MR series as a ``(1, i, j, k)`` volume in physical units (HU for CT).

    ``series_uid`` picks a series when several are present. ``domain`` is needed only for
    modalities other than CT ("ct") and MR ("mri"). ``volume`` picks one volume of a multi-volume
    series (``SeriesInfo.volume``); it is needed, and used, only when the given files hold
    several volumes (the ``files`` of one listed volume hold just that one).
    """
    files, label = _files_of(path_or_files)
    listing = _scan(files, keep_headers=True)
    entries = _select(listing, series_uid, label)
    info = entries[0]
    domain = _domain_for(info.modality, domain, label)
    n_frames = sum(e.n_frames for e in entries)
    check_fits(decoded_bytes((n_frames, info.rows, info.columns), np.int32),
               f"a volume of {n_frames} slices of {info.rows}x{info.columns}", label)

    headers, frames = _series_frames(listing, info.series_uid)
    _check_consistent(frames, label)
    volumes = _volumes_of(frames)
    index, name, frames = _pick_volume(volumes, volume, label)
    row, col = _orthonormal(frames[0].iop)
    normal = np.cross(row, col)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    step = _slice_step(frames, normal, label, _series_name(info))
    f0 = frames[0]
    lps = np.eye(4)
    lps[:3, 0] = row * f0.pixel_spacing[1]  # i: along a row, spacing between columns
    lps[:3, 1] = col * f0.pixel_spacing[0]  # j: down a column, spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = f0.position
    affine = _LPS_RAS @ lps

    first = headers[f0.file]
    storage = _storage_dtype(first, f0.file)
    vol = _volume(frames)
    try:
        meta = _source_meta(first, frames, info, affine, storage, (index, name, len(volumes)))
    except Exception as exc:  # a corrupt element pydicom parses lazily (unknown VR, bad number)
        raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}", f0.file) from exc
    return SpatialImage(
        data=vol[None],
        domain=domain,  # type: ignore[arg-type]
        geometry=MedicalGeometry(affine, vol.shape),
        units="HU" if info.modality == "CT" else "a.u.",
        provenance={"source": str(label), "format": "dicom"},
        meta={"dicom": meta, "storage_dtype": str(storage)},
    )


def stack_axis(img: SpatialImage) -> int | None:
    """The array axis of a volume read from a DICOM series that runs along its slice normal (the
    axis the slices were stacked on), from the geometry; ``None`` for other images."""
    dm = img.meta.get("dicom")
    if not isinstance(dm, dict) or not isinstance(img.geometry, MedicalGeometry) or img.geometry.ndim != 3:
        return None
    normal = dm.get("slice_normal")
    if normal is None and dm.get("source_affine") is not None:  # read before slice_normal was kept
        a = np.asarray(dm["source_affine"], float)[:3, :3]
        normal = np.cross(a[:, 0], a[:, 1])
    if normal is None:
        return None
    return int(np.argmax(np.abs(np.asarray(normal, float) @ img.geometry.direction)))


# --------------------------------------------------------------------------------------------
# Writing a derived series
# --------------------------------------------------------------------------------------------

def _ds_value(x: float) -> float:
    """``x`` as it survives a DICOM DS (decimal string, 16 characters)."""
    return float(format_number_as_ds(float(x)))


def _ds(x: float) -> str:
    """``x`` as a DS string at 12 significant digits, so that float noise (0.5000000000000001)
    never reaches the file: scaled spacings and positions are written as their exact decimals."""
    value = float(f"{float(x):.12g}") if abs(x) > 1e-12 else 0.0  # no "-1.2e-17" (or "-0")
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text if len(text) <= 16 else format_number_as_ds(value)


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


def _source_template(dm: dict[str, Any]) -> Dataset:
    """The carried source attributes, exactly as encoded in the source when known."""
    if dm.get("template_b64"):
        ds = _decode(dm["template_b64"])
        return Dataset({elem.tag: elem for elem in ds})  # iterating converts the raw elements
    return Dataset.from_json(dm["template"])


def _series_dataset(dm: dict[str, Any], factors: str, model_name: str, description: str) -> Dataset:
    """Everything the derived instances share: source modules, new series, derivation, refs."""
    modality = dm["modality"]
    ds = _source_template(dm)
    for kw in ("PatientPosition",) + (_TYPE2_CT if modality == "CT" else _TYPE2_MR):  # series/image level
        if kw not in ds:
            setattr(ds, kw, None)
    if "Laterality" not in ds and "ImageLaterality" not in ds:  # Type 2C: empty = unknown (new series)
        ds.Laterality = None
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
    volume = f" of volume {dm['volume_label']} of the source series" if dm.get("volume_label") else ""
    ds.DerivationDescription = (
        f"AI-enhanced (super-resolution {factors}) by DomainSR model {model_name}{volume}; derived image, "
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
    (the nearest one when outside; a mosaic once); ReferencedSeriesSequence: the source series with
    those instances (the Common Instance Reference module lists what the instance references)."""
    uids, frames, n = dm["sop_instance_uids"], dm["frame_numbers"], len(dm["sop_instance_uids"])
    near = sorted({int(np.floor(src_k)), int(np.ceil(src_k))} & set(range(n))) or [
        int(np.clip(round(src_k), 0, n - 1))]
    near = list({(uids[s], frames[s]): s for s in near}.values())
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


def _check_derivable(img: SpatialImage, dm: dict[str, Any] | None, out: Path, overwrite: bool) -> dict[str, Any]:
    if not dm:
        raise OutputError("image has no DICOM source metadata (meta['dicom']); a derived series "
                          "needs a source series read by read_dicom_series", out)
    if not isinstance(img.geometry, MedicalGeometry) or img.geometry.ndim != 3 or img.channels != 1:
        raise OutputError(f"a DICOM series needs one channel on a 3D grid, got {img.data.shape}", out)
    if dm["modality"] not in _SOP_CLASS_OF_MODALITY:
        raise OutputError(f"derived series are written for CT and MR only, not {dm['modality']!r}", out)
    axis = stack_axis(img)
    if dm.get("n_source_slices") == 1 and axis is not None and img.geometry.shape[axis] > 1:
        raise GeometryError(f"the source is a single slice (2D) but the image has {img.geometry.shape[axis]} "
                            "slices along its normal: scale a single slice in-plane only (e.g. scale 2,2,1)", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError("output folder exists and is not empty (pass overwrite=True)", out)
    return dm


@_quiet_pydicom()
def write_derived_series(img: SpatialImage, out_dir: str | Path, *, model_name: str,
                         description: str = "", overwrite: bool = False) -> Path:
    """Write ``img`` (read by :func:`read_dicom_series`, then enhanced) as a new DICOM series.

    One classic CT/MR Image Storage file per slice ``k`` in ``out_dir``, written atomically as a
    whole folder: new Series/SOP Instance UIDs, the source's modules that still apply (patient,
    study, frame of reference, equipment, acquisition, contrast/bolus; nothing added at those
    levels), ImageType ``DERIVED\\SECONDARY\\<value 3>\\AI ENHANCED``, a DerivationDescription naming
    the model, references to the source series and instances, plane geometry from
    ``img.geometry`` (unit, orthogonal cosines; SliceThickness = SpacingBetweenSlices = the new
    slice step, a single source slice keeps its thickness), and a RescaleSlope/Intercept under
    which the values fit the stored 16-bit integers without clipping (:func:`choose_rescale`).
    An existing non-empty ``out_dir`` is refused unless ``overwrite`` (OutputError); a single source
    slice scaled along its normal is refused with a GeometryError (a single slice is 2D; not retried).
    """
    out = Path(out_dir)
    dm = _check_derivable(img, img.meta.get("dicom"), out, overwrite)
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
    row_cos, col_cos = _orthonormal(np.concatenate([row_cos, col_cos]))
    normal = np.cross(row_cos, col_cos)
    slice_gap = abs(float(lps[:3, 2] @ normal))
    ni, nj, nk = img.geometry.shape
    thickness = dm.get("slice_thickness") if dm.get("n_source_slices") == 1 else None

    src_affine = np.asarray(dm["source_affine"])
    to_source = np.linalg.inv(src_affine) @ img.geometry.affine
    base = _series_dataset(dm, _scale_label(img, src_affine), model_name, description)
    base.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    base.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    base.SliceThickness = _ds(thickness or slice_gap)
    base.SpacingBetweenSlices = _ds(slice_gap)
    base.Rows, base.Columns = nj, ni
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1 if dtype.kind == "i" else 0
    base.RescaleSlope = _ds(slope)
    base.RescaleIntercept = _ds(intercept)
    if dm["modality"] == "CT":
        base.RescaleType = "HU"

    with atomic_path(out, is_dir=True) as tmp:
        for k in range(nk):
            ds = Dataset(base)  # shallow: every per-slice element below is a new element
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = lps[:3, 3] + k * lps[:3, 2]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            _add_references(ds, dm, float((to_source @ [(ni - 1) / 2, (nj - 1) / 2, k, 1.0])[2]))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return out
