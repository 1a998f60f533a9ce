"""DICOM CT/MR series -> volume (pydicom, nibabel.nicom), and an AI-derived series back (pydicom + highdicom).

One package, four modules:

* :mod:`~domainsr.io.dicom.series`: which files are DICOM images, grouped by series and volume
  (:func:`list_series`, :class:`SeriesInfo`); the attributes a derived image carries
  (:func:`carried_keywords`); pydicom kept quiet about values (:func:`quiet_pydicom`).
* :mod:`~domainsr.io.dicom.frames`: image planes (classic, enhanced multi-frame, Siemens mosaic)
  and the volumes of a multi-volume series.
* :mod:`~domainsr.io.dicom.read`: :func:`read_dicom_series`, the volume and its affine, and
  :func:`stack_axis`.
* :mod:`~domainsr.io.dicom.write`: :func:`write_derived_series` and :func:`choose_rescale`.
* :mod:`~domainsr.io.dicom.pmap`: :func:`parametric_map`, a map (the audit's risk) on a derived
  series' planes as a highdicom Parametric Map in the same study (:func:`write_risk_parametric_map`:
  from the risk map file); :func:`segmentation` / :func:`write_regions_segmentation`, the audit's
  regions as a binary Segmentation (one segment per verdict).

Each module's docstring says what it guarantees. Patient tags are never logged nor put in error
messages.

Validation
    The tests run dicom3tools' ``dciodvfy`` (IOD) and ``dcentvfy`` (entity consistency between the
    source and the derived instances) and ``dcm2niix`` (the affine it reads back) on derived
    series of each kind; see tests/io/test_dicom_validators.py.
"""
from __future__ import annotations

from domainsr.io.dicom.frames import MAX_POSITION_ROUNDING, ORIENTATION_TOLERANCE, SQRT3
from domainsr.io.dicom.pmap import (
    MAP_SERIES_PREFIX,
    VERDICT_SEGMENTS,
    parametric_map,
    regions_segmentation,
    segmentation,
    verdict_labels,
    write_regions_segmentation,
    write_risk_parametric_map,
)
from domainsr.io.dicom.read import COSINE_ROUNDING, GAP_TOLERANCE, read_dicom_series, stack_axis
from domainsr.io.dicom.series import SeriesInfo, SeriesListing, carried_keywords, list_series, quiet_pydicom
from domainsr.io.dicom.write import carries_marker, choose_rescale, marker_model, write_derived_series

__all__ = [
    "COSINE_ROUNDING",
    "GAP_TOLERANCE",
    "MAP_SERIES_PREFIX",
    "MAX_POSITION_ROUNDING",
    "ORIENTATION_TOLERANCE",
    "SQRT3",
    "VERDICT_SEGMENTS",
    "SeriesInfo",
    "SeriesListing",
    "carried_keywords",
    "carries_marker",
    "choose_rescale",
    "list_series",
    "marker_model",
    "parametric_map",
    "quiet_pydicom",
    "read_dicom_series",
    "regions_segmentation",
    "segmentation",
    "stack_axis",
    "verdict_labels",
    "write_derived_series",
    "write_regions_segmentation",
    "write_risk_parametric_map",
]
