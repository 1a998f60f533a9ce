"""The one table of image formats: how each is recognised, read and written, and named.

:data:`FORMATS` holds the *input* formats (the item kinds of a store): their file suffixes, the
bytes that identify them (:func:`sniff`), the folders they are (a DICOM series, a band set), their
reader and the output format an input of them is written in by default. :data:`OUTPUTS` holds the
*output* formats (``output.format`` of a task: ``nifti``, ``dicom``, ``cog``): the suffix of an
output's name, the names their writer takes, the writer, the test that a file is an earlier
DomainSR output, and the format of the audit risk map beside it.

Names stay as they always were: ``<id>_sr.nii.gz`` (a ``.nii`` input gives ``.nii``),
``<id>_sr/`` for a derived DICOM series, ``<id>_sr.tif`` for rasters and band sets, and the risk
map ``<id>_sr.risk.nii.gz`` (volumes, DICOM included) or ``<id>_sr.risk.tif`` (rasters).

Readers and writers are named as ``"module:function"`` and imported when first used, so looking
a format up costs no pydicom, nibabel or rasterio import.
"""
from __future__ import annotations

import gzip
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from domainsr.errors import InputError, UnsupportedFormatError

if TYPE_CHECKING:
    from domainsr.image import SpatialImage

#: Bytes :func:`sniff` reads: a DICOM preamble and prefix (132), a NIfTI-1 header (348).
HEAD_BYTES = 348
MEDICAL_DOMAINS: tuple[str, ...] = ("mri", "ct")


# ------------------------------------------------------------------------------------- magic bytes

def is_dicom_bytes(head: bytes) -> bool:
    """A DICOM Part 10 file: 128 bytes of preamble, then ``DICM``."""
    return head[128:132] == b"DICM"


def is_nifti_bytes(head: bytes) -> bool:
    """A NIfTI-1 (``sizeof_hdr`` 348, magic ``n+1``/``ni1`` at 344) or NIfTI-2 (540, magic
    ``n+2``/``ni2`` at 4) header, in either byte order."""
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order) if len(head) >= 4 else 0
        if size == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if size == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def is_raster_bytes(head: bytes) -> bool:
    """TIFF or BigTIFF (either byte order), a JPEG 2000 file (JP2 signature box) or codestream."""
    return head[:4] in (b"II*\0", b"MM\0*", b"II+\0", b"MM\0+") or head[:12] == b"\0\0\0\x0cjP  \r\n\x87\n" \
        or head[:4] == b"\xff\x4f\xff\x51"


def read_head(path: str | Path, size: int = HEAD_BYTES, *, gunzip: bool = True) -> bytes:
    """The first ``size`` bytes of a file (of its content, when gzip-compressed and ``gunzip``);
    ``b""`` when it cannot be read."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(size)
        if gunzip and head[:2] == b"\x1f\x8b":
            with gzip.open(path, "rb") as gz:
                head = gz.read(size)
    except (OSError, EOFError):
        return b""
    return head


def has_dicom_preamble(path: str | Path) -> bool:
    """Whether a file starts with the DICOM preamble (``DICM`` at offset 128): the one DICM check."""
    return is_dicom_bytes(read_head(path, 132, gunzip=False))


# ---------------------------------------------------------------------------------------- the table

@dataclass(frozen=True)
class OutputFormat:
    """A format outputs are written in (``output.format``: ``nifti``, ``dicom``, ``cog``)."""

    name: str
    label: str
    suffix: str  #: of an output's name; ``""``: the output is a folder
    suffixes: tuple[str, ...]  #: names the writer takes (lower case)
    writer: str  #: ``"module:function"`` ``(img, path, **options) -> Path``
    marker: str  #: ``"module:function"`` ``(path) -> bool``: carries DomainSR's derived marker
    marker_model_reader: str  #: ``"module:function"`` ``(path) -> str | None``: the model its marker names
    risk: str  #: the output format of the audit risk map beside an output
    requirement: str  #: what an image needs to be written in it (for the error message)
    geometry: str | None = None  #: ``"medical"``/``"geo"``: the grid the image must be on
    needs_meta: str | None = None  #: a ``meta`` key the image must have (its source's header)
    keeps_suffix: bool = False  #: an input's own suffix among :attr:`suffixes` is kept (``.nii``)
    media_type: str = "application/octet-stream"

    @property
    def folder(self) -> bool:
        """Whether outputs are folders (their writer refuses a non-empty one unless ``overwrite``)."""
        return self.suffix == ""

    @property
    def risk_label(self) -> str:
        """Label (and name suffix after the output's stem and a dot) of the risk map: ``risk.tif``."""
        return "risk" + OUTPUTS[self.risk].suffix

    def name_suffix(self, source_suffix: str = "") -> str:
        """The suffix of an output: the input's own when this format keeps it (``.nii`` stays
        ``.nii``), else :attr:`suffix`."""
        return source_suffix if self.keeps_suffix and source_suffix in self.suffixes else self.suffix

    def problem(self, img: SpatialImage) -> str | None:
        """Why ``img`` cannot be written in this format, or ``None``."""
        from domainsr.image import GeoGeometry, MedicalGeometry

        grid = {"medical": MedicalGeometry, "geo": GeoGeometry}.get(self.geometry or "")
        if (self.needs_meta and not img.meta.get(self.needs_meta)) or (grid and not isinstance(img.geometry, grid)):
            return self.requirement
        return None

    def write(self, img: SpatialImage, path: str | Path, *, replace: bool = False, **options: Any) -> Path:
        """Write ``img`` at ``path`` with this format's writer. Files are always replaced atomically;
        a folder output replaces an existing non-empty folder only with ``replace``."""
        if self.folder:
            options.setdefault("overwrite", replace)
        return Path(_resolve(self.writer)(img, path, **options))

    def marker_model(self, path: str | Path) -> str | None:
        """The DomainSR model the output at ``path`` names in its marker (unreadable or none: ``None``)."""
        try:
            return _resolve(self.marker_model_reader)(Path(path))
        except Exception:  # noqa: BLE001 - unreadable, or not what we write: no model named
            return None

    def carries_marker(self, path: str | Path) -> bool:
        """Whether the output at ``path`` says it is a DomainSR output (unreadable: ``False``)."""
        try:
            return bool(_resolve(self.marker)(Path(path)))
        except Exception:  # noqa: BLE001 - unreadable, or not what we write: not ours
            return False


@dataclass(frozen=True)
class Format:
    """An input format (a store item's ``kind``)."""

    name: str
    label: str
    reader: str  #: ``"module:function"`` ``(path, **options) -> SpatialImage | MultiResolutionImage``
    output: str  #: the output format an input of it is written in (``output.format: same``)
    suffixes: tuple[str, ...] = ()  #: file names it is recognised by (lower case)
    magic: Callable[[bytes], bool] | None = None  #: its first :data:`HEAD_BYTES` bytes (gunzipped)
    named_by_content: bool = False  #: a file is recognised by its bytes alone (suffix-less DICOM)
    #: a folder whose (upper-case) file names pass this test is one image of this format (a band set)
    folder_names: Callable[[Sequence[str]], bool] | None = None
    member_suffixes: tuple[str, ...] = ()  #: the files of a folder format (band files)
    medical: bool = False  #: a patient's image (names may identify them); the reader takes ``domain=mri|ct``
    windowed: bool = False  #: one file read window by window (large ones are streamed)
    media_types: tuple[str, ...] = ()

    @property
    def band_set(self) -> bool:
        """Whether an image of this format is a folder of band files."""
        return self.folder_names is not None

    def read(self, source: Any, **options: Any) -> Any:
        """Read ``source`` (a path, or a DICOM series' files) with this format's reader."""
        return _resolve(self.reader)(source, **options)


def _is_sentinel2(names: Sequence[str]) -> bool:
    return any("B8A" in n for n in names) or sum(("B02" in n or "B04" in n) for n in names) >= 2


def _is_landsat8(names: Sequence[str]) -> bool:
    return any(n.endswith(("_B8.TIF", "_B10.TIF")) for n in names)


OUTPUTS: dict[str, OutputFormat] = {o.name: o for o in (
    OutputFormat("nifti", "NIfTI", ".nii.gz", (".nii.gz", ".nii"), "domainsr.io.nifti:write_nifti",
                 "domainsr.io.nifti:carries_marker", "domainsr.io.nifti:marker_model", risk="nifti", geometry="medical",
                 keeps_suffix=True,
                 requirement="a NIfTI output needs a volume in patient space"),
    OutputFormat("dicom", "DICOM series", "", (), "domainsr.io.dicom:write_derived_series",
                 "domainsr.io.dicom:carries_marker", "domainsr.io.dicom:marker_model", risk="nifti", needs_meta="dicom",
                 requirement="a DICOM output needs a DICOM input series", media_type="application/dicom"),
    OutputFormat("cog", "Cloud-Optimised GeoTIFF", ".tif", (".tif", ".tiff"), "domainsr.io.raster:write_raster",
                 "domainsr.io.raster:carries_marker", "domainsr.io.raster:marker_model", risk="cog", geometry="geo",
                 requirement="a GeoTIFF/COG output needs a raster on a map grid",
                 media_type="image/tiff; application=geotiff; profile=cloud-optimized"),
)}

_BAND_FILES = (".jp2", ".tif", ".tiff")

FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("nifti", "NIfTI", "domainsr.io.nifti:read_nifti", "nifti", suffixes=(".nii.gz", ".nii"),
           magic=is_nifti_bytes, medical=True),
    Format("dicom", "DICOM", "domainsr.io.dicom:read_dicom_series", "dicom", suffixes=(".dcm", ".dicom"),
           magic=is_dicom_bytes, named_by_content=True, medical=True),
    Format("raster", "GeoTIFF/COG/JP2", "domainsr.io.raster:read_raster", "cog",
           suffixes=(".tif", ".tiff", ".jp2", ".vrt", ".img"), magic=is_raster_bytes, windowed=True,
           media_types=("image/tiff", "image/jp2", "application/x-geotiff")),
    Format("sentinel2", "Sentinel-2 band set", "domainsr.io.sentinel2:read_sentinel2", "cog",
           folder_names=_is_sentinel2, member_suffixes=_BAND_FILES),
    Format("landsat8", "Landsat 8 band set", "domainsr.io.sentinel2:read_landsat8", "cog",
           folder_names=_is_landsat8, member_suffixes=_BAND_FILES),
)}

#: A folder that is no band set is read as a DICOM series.
FOLDER_DEFAULT = "dicom"
#: Every suffix an input or output name may end in, longest first (for :func:`strip_suffix`).
ALL_SUFFIXES: tuple[str, ...] = tuple(sorted(
    {s for f in FORMATS.values() for s in (*f.suffixes, *f.member_suffixes)}
    | {s for o in OUTPUTS.values() for s in o.suffixes}, key=lambda s: (-len(s), s)))
#: Labels of the risk maps an output may have beside it (``risk.tif``, ``risk.nii.gz``).
RISK_LABELS: tuple[str, ...] = tuple(dict.fromkeys(o.risk_label for o in OUTPUTS.values()))
#: Meta keys whose lists hold one value per band (they follow a band selection or stacking).
PER_BAND_META: dict[str, tuple[str, ...]] = {
    "raster": ("indexes", "band_tags", "descriptions", "units", "scales", "offsets", "colorinterp", "mask_flags"),
}


# -------------------------------------------------------------------------------------- look-ups

def suffix_of(name: str | Path) -> str:
    """The known suffix a file name ends in (lower case: ``.nii.gz``, ``.TIF`` -> ``.tif``), or ``""``."""
    low = Path(name).name.lower()
    return next((s for s in ALL_SUFFIXES if low.endswith(s)), "")


def strip_suffix(name: str) -> str:
    """``name`` without its known image suffix (``brain.nii.gz`` -> ``brain``)."""
    suffix = suffix_of(name)
    return name[: -len(suffix)] if suffix else name


def sniff(path: str | Path) -> str | None:
    """The input format a file's bytes say it is (DICOM preamble, NIfTI header, TIFF/JP2 magic),
    or ``None``; the file's name is not looked at."""
    head = read_head(path)
    return next((f.name for f in FORMATS.values() if f.magic is not None and f.magic(head)), None)


def file_format(path: str | Path) -> str | None:
    """The input format of a file: by its suffix, else (DICOM) by its bytes; ``None`` for anything else."""
    low = Path(path).name.lower()
    for fmt in FORMATS.values():
        if fmt.suffixes and low.endswith(fmt.suffixes):
            return fmt.name
    head = read_head(path, 132, gunzip=False)
    return next((f.name for f in FORMATS.values() if f.named_by_content and f.magic is not None and f.magic(head)),
                None)


def folder_format(path: str | Path) -> str:
    """The input format of a folder: a band set its file names say it is, else a DICOM series."""
    names = [f.name.upper() for f in Path(path).iterdir() if f.is_file()]
    return next((f.name for f in FORMATS.values() if f.folder_names is not None and f.folder_names(names)),
                FOLDER_DEFAULT)


def detect_format(path: str | Path) -> str:
    """The input format (:data:`FORMATS` key) of a file or folder; InputError when it is missing,
    UnsupportedFormatError when it is no format of the table."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    if p.is_dir():
        return folder_format(p)
    fmt = file_format(p)
    if fmt is not None:
        return fmt
    hint = sniff(p)
    known = ", ".join(dict.fromkeys(f.label for f in FORMATS.values() if f.suffixes))
    extra = (f"; its content is {FORMATS[hint].label}: give it one of the suffixes "
             f"{', '.join(FORMATS[hint].suffixes)}" if hint is not None else "")
    raise UnsupportedFormatError(f"unrecognised file type (expected {known}){extra}", p)


def output_for_path(path: str | Path, domain: str | None = None) -> OutputFormat:
    """The output format an output name asks for: by its suffix; a name without a suffix is a
    DICOM series folder for a medical ``domain``. UnsupportedFormatError otherwise."""
    p = Path(path)
    low = p.name.lower()
    for out in OUTPUTS.values():
        if out.suffixes and low.endswith(out.suffixes):
            return out
    if p.suffix == "" and domain in MEDICAL_DOMAINS:
        return OUTPUTS[FOLDER_DEFAULT]
    raise UnsupportedFormatError("cannot choose a writer for this output name", p)


def default_output(kind: str) -> str:
    """The output format an input of ``kind`` is written in (``output.format: same``): the
    table's, a COG for a kind outside it."""
    fmt = FORMATS.get(kind)
    return fmt.output if fmt is not None else "cog"


def domain_output(domain: str) -> OutputFormat:
    """NIfTI for a medical domain, COG for ``optical``."""
    return OUTPUTS["nifti" if domain in MEDICAL_DOMAINS else "cog"]


def risk_label(domain: str) -> str:
    """Extra label of an image's audit risk map: ``risk.nii.gz`` for a volume, ``risk.tif`` for a raster."""
    return domain_output(domain).risk_label


def _resolve(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


__all__ = ["ALL_SUFFIXES", "FOLDER_DEFAULT", "FORMATS", "HEAD_BYTES", "MEDICAL_DOMAINS", "OUTPUTS", "PER_BAND_META",
           "RISK_LABELS", "Format", "OutputFormat", "default_output", "detect_format", "domain_output", "file_format",
           "folder_format", "has_dicom_preamble", "is_dicom_bytes", "is_nifti_bytes", "is_raster_bytes",
           "output_for_path", "read_head", "risk_label", "sniff", "strip_suffix", "suffix_of"]
