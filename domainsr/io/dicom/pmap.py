"""Maps on a derived series' grid as DICOM (highdicom), in the series' study: a Parametric Map
(the audit's risk) and a Segmentation (its flagged regions).

:func:`parametric_map` samples a float map (the audit's risk, on the SR grid) on the image planes
of a derived series (:func:`~domainsr.io.dicom.write_derived_series`'s instances: one frame per
instance, the nearest voxel of the map at each pixel centre, which must lie on the map's grid)
and wraps it as a highdicom ``ParametricMap``: float32 values, one real-world value mapping (unit
UCUM ``1`` "no units", identity slope/intercept), the series' instances as source images (their
study, patient and frame of reference; per-frame plane positions copied from them), content
qualification RESEARCH, a series description naming it AI-derived, and a window over the
review/fail scale. UIDs may be given (the PACS store derives them from its run key, so a re-run
stores the same instance again instead of a second one). :func:`write_risk_parametric_map` does
it from the files a store has: the risk map (NIfTI) and the derived series just written.
:func:`segmentation` makes a binary Segmentation of integer labels on the same planes, with the
same references; :func:`regions_segmentation` / :func:`write_regions_segmentation` that of an
audit's regions, one segment per verdict (:data:`VERDICT_SEGMENTS`).

:data:`MAP_SERIES_PREFIX` starts the description of every such series: the PACS store does not
list them as inputs, and :func:`~domainsr.io.dicom.list_series` skips Parametric Map and
Segmentation objects (they are not images to enhance).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from domainsr.errors import GeometryError, OutputError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.io.dicom.frames import LPS_RAS
from domainsr.io.dicom.series import quiet_pydicom

#: SeriesDescription prefix of the DomainSR maps stored next to a derived series.
MAP_SERIES_PREFIX = "DomainSR map"
#: How far (voxels) a pixel centre of the series may lie from a voxel centre of the map.
GRID_TOLERANCE = 1e-2


def _normal(ds: Dataset) -> np.ndarray:
    iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
    return np.cross(iop[:3], iop[3:])


def sorted_planes(series: Sequence[Dataset]) -> list[Dataset]:
    """The instances of one single-frame series in order along their normal (OutputError when
    they are not one series of single-frame image planes)."""
    if not series:
        raise OutputError("no derived series instances given")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in series}
    if len(uids) != 1 or any(int(ds.get("NumberOfFrames") or 1) != 1 for ds in series):
        raise OutputError(f"expected the single-frame instances of one series, got {len(uids)} series")
    missing = [kw for kw in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "Rows",
                             "Columns", "FrameOfReferenceUID") if kw not in series[0]]
    if missing:
        raise OutputError(f"the derived series lacks {missing}")
    normal = _normal(series[0])
    return sorted(series, key=lambda ds: float(np.asarray([float(v) for v in ds.ImagePositionPatient]) @ normal))


#: Type 2 patient/study attributes highdicom copies from a source image: a derived series carries
#: only what its source had, so those the source lacks are given empty (unknown) to the map.
_TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                 "StudyDate", "StudyTime", "ReferringPhysicianName")


def _with_type2(ds: Dataset) -> Dataset:
    missing = [kw for kw in _TYPE2_COPIED if kw not in ds]
    if not missing:
        return ds
    copy = Dataset(ds)  # shallow: the caller's dataset is left as it is
    for kw in missing:
        setattr(copy, kw, None)
    return copy


def sample_on_planes(values: np.ndarray, geometry: MedicalGeometry, planes: Sequence[Dataset]) -> np.ndarray:
    """``values`` (the 3D map on ``geometry``) at the pixel centres of each plane: ``(frames, rows,
    cols)``. GeometryError when a pixel centre is off the map's voxel centres or outside it."""
    inv = np.linalg.inv(geometry.affine)
    out = []
    for ds in planes:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient])
        row_spacing, col_spacing = (float(v) for v in ds.PixelSpacing)
        r, c = np.meshgrid(np.arange(int(ds.Rows)), np.arange(int(ds.Columns)), indexing="ij")
        lps = (np.asarray([float(v) for v in ds.ImagePositionPatient])[:, None, None]
               + iop[:3, None, None] * (c * col_spacing) + iop[3:, None, None] * (r * row_spacing))
        ras = (LPS_RAS[:3, :3] @ lps.reshape(3, -1))
        index = inv[:3, :3] @ ras + inv[:3, 3:]
        near = np.rint(index)
        if np.abs(index - near).max() > GRID_TOLERANCE:
            raise GeometryError("the derived series' pixels do not lie on the map's voxel grid "
                                f"(off by up to {np.abs(index - near).max():.3f} voxel)")
        ijk = near.astype(np.int64)
        if (ijk < 0).any() or (ijk >= np.asarray(geometry.shape)[:, None]).any():
            raise GeometryError(f"the derived series reaches outside the map's grid {geometry.shape}")
        out.append(values[ijk[0], ijk[1], ijk[2]].reshape(int(ds.Rows), int(ds.Columns)))
    return np.stack(out).astype(np.float32)


@quiet_pydicom()
def parametric_map(image: SpatialImage, series: Sequence[Dataset], *, label: str = "risk",
                   explanation: str = "DomainSR audit risk (calibrated; 1 review, 2 fail)",
                   description: str = "audit risk", window: tuple[float, float] = (1.0, 2.0),
                   series_uid: str | None = None, instance_uid: str | None = None,
                   software_version: str = "") -> Dataset:
    """Band 1 of ``image`` (a float map on a 3D medical grid) as a Parametric Map whose frames are
    the planes of the derived ``series`` (pydicom datasets, any order) and which references them.

    ``label`` (at most 16 characters) and ``explanation`` describe the real-world value mapping;
    ``window`` is (center, width). OutputError for data DICOM cannot hold (non-finite values) or a
    series that is not one; GeometryError when the series is not on the map's grid.
    """
    import highdicom as hd

    if not isinstance(image.geometry, MedicalGeometry) or image.geometry.ndim != 3:
        raise OutputError(f"a Parametric Map needs a map on a 3D medical grid, got {image.data.shape}")
    planes = [_with_type2(ds) for ds in sorted_planes(series)]
    frames = sample_on_planes(np.asarray(image.data[0], np.float32), image.geometry, planes)
    if not np.isfinite(frames).all():
        raise OutputError(f"{int((~np.isfinite(frames)).sum())} non-finite map values cannot be stored")
    lo, hi = float(frames.min()), float(frames.max())
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label[:16], lut_explanation=explanation[:64], unit=hd.sr.CodedConcept("1", "UCUM", "no units"),
        value_range=(lo, hi if hi > lo else lo + 1.0), slope=1.0, intercept=0.0)
    first = planes[0]
    number = _series_number(first, 1)
    pm = hd.pm.ParametricMap(
        source_images=planes, pixel_array=frames, series_instance_uid=series_uid or hd.UID(),
        series_number=number, sop_instance_uid=instance_uid or hd.UID(), instance_number=1,
        manufacturer="DomainSR", manufacturer_model_name="DomainSR audit",
        software_versions=software_version or "unknown", device_serial_number="none",
        contains_recognizable_visual_features=False, real_world_value_mappings=[mapping],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=window[0], window_width=window[1])],
        content_label=label.upper()[:16].replace(" ", "_"),
        content_description=f"{description}; AI-derived, not acquired"[:64],
        content_qualification=hd.ContentQualificationValues.RESEARCH)
    pm.SeriesDescription = f"{MAP_SERIES_PREFIX} {description} (AI-derived)"[:64]
    pm.Laterality = first.get("Laterality")  # General Series, Type 2C: as the series it maps (empty: unknown)
    return pm


@quiet_pydicom()
def segmentation(image: SpatialImage, names: dict[int, str], series: Sequence[Dataset], *,
                 description: str = "audit regions", series_uid: str | None = None,
                 instance_uid: str | None = None, software_version: str = "") -> Dataset:
    """Band 1 of ``image`` (integer labels on a 3D medical grid: 0 none, ``k`` segment ``k``) as a
    binary DICOM Segmentation on the planes of the derived ``series``, one segment per label
    present that ``names`` names (segment label = the name; category "Spatial and Relational
    Concept", type "Image artifact(s)", algorithm automatic, family "Neighborhood Analysis").
    OutputError when no named label is present; GeometryError as :func:`parametric_map`."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    if not isinstance(image.geometry, MedicalGeometry) or image.geometry.ndim != 3:
        raise OutputError(f"a Segmentation needs labels on a 3D medical grid, got {image.data.shape}")
    planes = [_with_type2(ds) for ds in sorted_planes(series)]
    labels = np.rint(sample_on_planes(np.asarray(image.data[0], np.float32), image.geometry, planes)).astype(np.int64)
    present = [k for k in sorted(names) if k > 0 and (labels == k).any()]
    if not present:
        raise OutputError("no labelled region to segment")
    frames = np.zeros(labels.shape, np.uint8)  # segment numbers 1..n in order of the labels present
    for number, k in enumerate(present, start=1):
        frames[labels == k] = number
    algorithm = hd.AlgorithmIdentificationSequence(name="DomainSR audit", family=codes.cid7162.NeighborhoodAnalysis,
                                                   version=software_version or "unknown")
    segments = [hd.seg.SegmentDescription(
        segment_number=number, segment_label=names[k][:64], segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
        segmented_property_type=codes.DCM.ImageArtifacts, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm) for number, k in enumerate(present, start=1)]
    number = _series_number(planes[0], 2)
    seg = hd.seg.Segmentation(
        source_images=planes, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=segments, series_instance_uid=series_uid or hd.UID(), series_number=number,
        sop_instance_uid=instance_uid or hd.UID(), instance_number=1, manufacturer="DomainSR",
        manufacturer_model_name="DomainSR audit", software_versions=software_version or "unknown",
        device_serial_number="none", content_label="REGIONS",
        content_description=f"{description}; AI-derived, not acquired"[:64])
    seg.SeriesDescription = f"{MAP_SERIES_PREFIX} {description} (AI-derived)"[:64]
    return seg


#: Segment of each verdict in the Segmentation of an audit's flagged regions (label value -> verdict).
VERDICT_SEGMENTS = {1: "review", 2: "fail"}


def verdict_labels(ids: np.ndarray, verdicts: Mapping[int, str]) -> np.ndarray:
    """Region ids (0 none) -> the :data:`VERDICT_SEGMENTS` value of each region's verdict (0 for
    none and for ``pass``)."""
    code = {name: k for k, name in VERDICT_SEGMENTS.items()}
    ids = np.asarray(ids).astype(np.int64)
    lut = np.zeros(max(int(ids.max(initial=0)), max(verdicts, default=0)) + 1, np.uint8)
    for rid, verdict in verdicts.items():
        if rid > 0 and verdict in code:
            lut[rid] = code[verdict]
    return lut[np.clip(ids, 0, lut.size - 1)]


def regions_segmentation(image: SpatialImage, series: Sequence[Dataset], *, series_uid: str | None = None,
                         instance_uid: str | None = None, software_version: str = "") -> Dataset:
    """:func:`segmentation` of verdict labels (:func:`verdict_labels`): one segment per verdict."""
    names = {k: f"{name} region(s)" for k, name in VERDICT_SEGMENTS.items()}
    return segmentation(image, names, series, series_uid=series_uid, instance_uid=instance_uid,
                        software_version=software_version)


@quiet_pydicom()
def write_regions_segmentation(labels: str | Path, verdicts: Mapping[int, str], series_files: Sequence[str | Path],
                               out: str | Path, *, series_uid: str | None = None,
                               instance_uid: str | None = None) -> Path | None:
    """The audit's region label map file (NIfTI, region ids) and the regions' ``verdicts`` as a
    Segmentation file ``out`` on the derived series in ``series_files``; ``None`` when no region
    is ``review`` or ``fail``. Errors as :func:`parametric_map`."""
    from domainsr import __version__
    from domainsr.io.nifti import read_nifti

    if not set(verdicts.values()) & set(VERDICT_SEGMENTS.values()):
        return None
    img = read_nifti(labels)
    coded = img.derive(verdict_labels(np.rint(img.data[0]), verdicts)[None].astype(np.float32))
    series = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    seg = regions_segmentation(coded, series, series_uid=series_uid, instance_uid=instance_uid,
                               software_version=__version__)
    return _save(seg, out)


@quiet_pydicom()
def write_risk_parametric_map(risk_map: str | Path, series_files: Sequence[str | Path], out: str | Path, *,
                              series_uid: str | None = None, instance_uid: str | None = None) -> Path:
    """The audit risk map file (NIfTI, band 1 = risk, on the SR grid) as a Parametric Map file
    ``out`` on the planes of the derived series in ``series_files`` (how a store puts the risk
    beside the derived series it has just written). Errors as :func:`parametric_map`."""
    from domainsr import __version__
    from domainsr.io.nifti import read_nifti

    risk = read_nifti(risk_map)
    series = [pydicom.dcmread(f, stop_before_pixels=True) for f in series_files]
    pm = parametric_map(risk, series, series_uid=series_uid, instance_uid=instance_uid,
                        software_version=__version__)
    return _save(pm, out)



def _series_number(source: pydicom.Dataset, offset: int) -> int:
    """The derived series' number plus ``offset`` (the map's own series), or ``offset`` without one."""
    try:
        return int(source.get("SeriesNumber")) + offset
    except (TypeError, ValueError):
        return offset


def _save(ds: pydicom.Dataset, out: str | Path) -> Path:
    """Write ``ds`` to ``out`` atomically (temp file, then rename)."""
    path = Path(out)
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return path

__all__ = ["GRID_TOLERANCE", "MAP_SERIES_PREFIX", "VERDICT_SEGMENTS", "parametric_map", "regions_segmentation",
           "sample_on_planes", "segmentation", "sorted_planes", "verdict_labels", "write_regions_segmentation",
           "write_risk_parametric_map"]
