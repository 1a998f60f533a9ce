"""Readers and writers over SpatialImage, one module per format family.

``read_image`` and ``write_image`` pick the module from the path; use the format modules directly
for format-specific options.
"""
from __future__ import annotations

from pathlib import Path

from domainsr.errors import InputError, UnsupportedFormatError
from domainsr.image import MultiResolutionImage, SpatialImage

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".tif", ".tiff", ".jp2", ".vrt", ".img")
DICOM_SUFFIXES = (".dcm", ".dicom", "")


def detect_format(path: str | Path) -> str:
    """Return ``"nifti"``, ``"dicom"``, ``"raster"``, ``"sentinel2"`` or ``"landsat8"`` for a path."""
    p = Path(path)
    if not p.exists():
        raise InputError("no such file or folder", p)
    name = p.name.lower()
    if p.is_dir():
        files = [f for f in p.iterdir() if f.is_file()]
        names = [f.name.upper() for f in files]
        if any("B8A" in n for n in names) or sum(("B02" in n or "B04" in n) for n in names) >= 2:
            return "sentinel2"
        if any(n.endswith(("_B8.TIF", "_B10.TIF")) for n in names):
            return "landsat8"
        return "dicom"
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if name.endswith(RASTER_SUFFIXES):
        return "raster"
    if name.endswith((".dcm", ".dicom")) or _has_dicom_preamble(p):
        return "dicom"
    raise UnsupportedFormatError("unrecognised file type (expected NIfTI, DICOM, GeoTIFF/COG/JP2)", p)


def _has_dicom_preamble(p: Path) -> bool:
    try:
        with open(p, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:132] == b"DICM"


def read_image(path: str | Path, **kwargs) -> SpatialImage | MultiResolutionImage:
    """Read any supported image (file or folder) into a SpatialImage (or a band set)."""
    fmt = detect_format(path)
    if fmt == "nifti":
        from domainsr.io.nifti import read_nifti

        return read_nifti(path, **kwargs)
    if fmt == "raster":
        from domainsr.io.raster import read_raster

        return read_raster(path, **kwargs)
    if fmt == "sentinel2":
        from domainsr.io.sentinel2 import read_sentinel2

        return read_sentinel2(path, **kwargs)
    if fmt == "landsat8":
        from domainsr.io.sentinel2 import read_landsat8

        return read_landsat8(path, **kwargs)
    from domainsr.io.dicom import read_dicom_series

    return read_dicom_series(path, **kwargs)


def output_name(img: SpatialImage, stem: str) -> str:
    """File (or folder) name an output of ``img`` gets, in the source's format family."""
    src = img.provenance.get("format", "")
    if src == "dicom":
        return stem
    if src == "nifti" or img.domain in ("mri", "ct"):
        return f"{stem}.nii.gz"
    return f"{stem}.tif"


def write_image(img: SpatialImage, path: str | Path, **kwargs) -> Path:
    """Write ``img`` in the format the output path names (a folder without suffix = DICOM series)."""
    p = Path(path)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        from domainsr.io.nifti import write_nifti

        return write_nifti(img, p, **kwargs)
    if name.endswith((".tif", ".tiff")):
        from domainsr.io.raster import write_raster

        return write_raster(img, p, **kwargs)
    if p.suffix == "" and img.domain in ("mri", "ct"):
        from domainsr.io.dicom import write_derived_series

        kwargs.setdefault("model_name", str(img.provenance.get("model", {}).get("name", "unknown")))
        return write_derived_series(img, p, **kwargs)
    raise UnsupportedFormatError("cannot choose a writer for this output name", p)
