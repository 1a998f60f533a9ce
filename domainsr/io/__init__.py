"""Readers and writers over SpatialImage, one module per format family.

``read_image`` and ``write_image`` pick the reader or writer from the path through the format
table (:mod:`domainsr.io.formats`); use the format modules directly for format-specific options.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io.formats import FORMATS, OUTPUTS, detect_format, output_for_path


def read_image(path: str | Path, **kwargs: Any) -> SpatialImage | MultiResolutionImage:
    """Read any supported image (file or folder) into a SpatialImage (or a band set)."""
    return FORMATS[detect_format(path)].read(path, **kwargs)


def write_image(img: SpatialImage, path: str | Path, **kwargs: Any) -> Path:
    """Write ``img`` in the format the output path names (a folder without suffix = DICOM series)."""
    return output_for_path(path, img.domain).write(img, Path(path), **kwargs)


__all__ = ["FORMATS", "OUTPUTS", "detect_format", "read_image", "write_image"]
