"""Finding DICOM series: which files are DICOM images, grouped by series (and volume).

:func:`list_series` reads headers only. pydicom's value validation is switched off and its
logger passes only warnings while DomainSR reads or writes DICOM (:func:`quiet_pydicom`): pydicom
logs offending values verbatim, which could be patient tags. :func:`carried_keywords` says which
attributes a derived image copies from its source (highdicom's copy of the standard's module
tables).
"""
from __future__ import annotations

import base64
import logging
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pydicom
import pydicom.config
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from domainsr.errors import InputError
from domainsr.io.dicom.frames import frames_of, volumes_of
from domainsr.io.formats import FORMATS, has_dicom_preamble

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


#: Parametric Map and Segmentation storage: maps on an image grid (e.g. an audit's, next to a
#: derived series), not images to read as a volume; :func:`list_series` skips them.
MAP_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.30", "1.2.840.10008.5.1.4.1.1.66.4",
                             "1.2.840.10008.5.1.4.1.1.66.7"})


@lru_cache(maxsize=2)
def carried_keywords(modality: str) -> frozenset[str]:
    """Keywords a derived ``modality`` image copies from its source (module-level attributes of
    ``_CARRIED_MODULES`` and the CT/MR Image module, less what the writer recomputes)."""
    from highdicom._standard_utils import get_module_attribute_map

    table = get_module_attribute_map()
    modules = (*_CARRIED_MODULES, _IMAGE_MODULE.get(modality, "ct-image"))
    names = {a["keyword"] for m in modules for a in table[m] if not a["path"]}
    return frozenset((names | set(_CARRIED_EXTRA)) - _NOT_CARRIED)


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
def quiet_pydicom() -> Iterator[None]:
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
    """A DICOM file name, or the DICOM preamble whatever the name."""
    return path.name.lower().endswith(FORMATS["dicom"].suffixes) or has_dicom_preamble(path)


def files_of(paths: str | Path | Sequence[str | Path]) -> tuple[list[Path], Path]:
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
    """The header (no pixels); a file without the preamble is parsed as raw DICOM."""
    return pydicom.dcmread(path, stop_before_pixels=True, force=not has_dicom_preamble(path))


def _header_problem(ds: Dataset) -> str | None:
    """Why a parsed header is not a usable image, or ``None``; ``"skip"`` for non-image objects
    (and maps: :data:`MAP_SOP_CLASSES`).

    pydicom parses truncated files leniently, so a file cut short shows up as a header without
    its SOP class or without the image attributes its (image) SOP class requires.
    """
    meta = getattr(ds, "file_meta", None)
    sop = ds.get("SOPClassUID") or (meta.get("MediaStorageSOPClassUID") if meta is not None else None)
    if sop and str(sop) in MAP_SOP_CLASSES:
        return "skip"
    if "SeriesInstanceUID" in ds and "Rows" in ds and "Columns" in ds:
        return None
    if not sop:
        return "no SOP Class UID (truncated or corrupt header)"
    if "Image Storage" in pydicom.uid.UID(str(sop)).name:
        return "image header lacks Rows, Columns or SeriesInstanceUID (truncated?)"
    return "skip"


@quiet_pydicom()
def list_series(paths: str | Path | Sequence[str | Path]) -> SeriesListing:
    """Group the DICOM image files under ``paths`` (a folder, searched recursively, a file, or a
    list of files) by SeriesInstanceUID, in the order first found; a multi-volume series is
    listed once per volume (same ``series_uid``, its own ``files`` and ``volume``)."""
    return scan_files(files_of(paths)[0])


_SCANNED = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "NumberOfFrames",
            "Rows", "Columns", "SOPClassUID")


def scan_files(files: list[Path], keep_headers: bool = False) -> SeriesListing:
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
        frames = [fr for f, ds in members for fr in frames_of(f, ds)]
        volumes = volumes_of(frames)
    except Exception:  # noqa: BLE001 - listing never fails on one series; reading it reports why
        return [SeriesInfo(**base, files=tuple(f for f, _ in members),
                           n_frames=sum(int(ds.get("NumberOfFrames") or 1) for _, ds in members),
                           rows=int(first.Rows), columns=int(first.Columns))]
    many = len(volumes) > 1
    return [SeriesInfo(**base, files=tuple(dict.fromkeys(fr.file for fr in vol)), n_frames=len(vol),
                       rows=vol[0].rows, columns=vol[0].cols, volume=n if many else None,
                       n_volumes=len(volumes), volume_label=name)
            for n, (name, vol) in enumerate(volumes)]


def encode_dataset(ds: Dataset) -> str:
    """``ds`` DICOM-encoded (explicit VR little endian), base64: values keep their exact encoding."""
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_dataset(fp, ds)
    return base64.b64encode(fp.getvalue()).decode("ascii")


def decode_dataset(text: str) -> Dataset:
    """The dataset :func:`encode_dataset` encoded."""
    return read_dataset(DicomBytesIO(base64.b64decode(text)), is_implicit_VR=False, is_little_endian=True)
