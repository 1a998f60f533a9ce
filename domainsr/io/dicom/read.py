"""DICOM CT/MR series -> volume (pydicom, nibabel.nicom).

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
"""
from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from domainsr.errors import DomainSRError, GeometryError, InputError, UnsupportedFormatError
from domainsr.image import DOMAINS, MedicalGeometry, SpatialImage
from domainsr.io.dicom.frames import (
    LPS_RAS,
    SQRT3,
    Frame,
    check_consistent,
    csa_header,
    frames_of,
    mosaic_wrapper,
    normal_of,
    orthonormal,
    pick_volume,
    volumes_of,
)
from domainsr.io.dicom.series import (
    SeriesInfo,
    SeriesListing,
    carried_keywords,
    encode_dataset,
    files_of,
    quiet_pydicom,
    scan_files,
)
from domainsr.limits import check_fits, decoded_bytes

log = logging.getLogger("domainsr.io.dicom")
_DOMAIN_OF_MODALITY = {"CT": "ct", "MR": "mri"}
GAP_TOLERANCE = 0.01  # relative to the median slice gap (beyond the rounding of the positions)
COSINE_ROUNDING = 1e-5  # direction cosines are stored with at least ~5 decimals


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


def _slice_step(frames: list[Frame], normal: np.ndarray, label: Path, series: str) -> np.ndarray:
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
            return np.moveaxis(mosaic_wrapper(ds, csa_header(ds), path).get_unscaled_data(), -1, 0)
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


def _volume(frames: list[Frame]) -> np.ndarray:
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


def _template(first: Dataset, modality: str) -> Dataset:
    """The attributes of ``first`` a derived image carries over (see :func:`carried_keywords`)."""
    keep = carried_keywords(modality)
    template = Dataset()
    for elem in first:
        if elem.keyword in keep:
            template.add(copy.deepcopy(elem))
    return template


def _source_meta(first: Dataset, frames: list[Frame], info: SeriesInfo, affine: np.ndarray,
                 storage: np.dtype, volume: tuple[int | None, str, int]) -> dict[str, Any]:
    """What a derived series needs from its source, as JSON-able values (see module docstring)."""
    template = _template(first, info.modality)
    index, name, n_volumes = volume
    normal = LPS_RAS[:3, :3] @ normal_of(frames)
    return {
        "template": template.to_json_dict(),
        "template_b64": encode_dataset(template),
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


def _series_frames(listing: SeriesListing, uid: str) -> tuple[dict[Path, Dataset], list[Frame]]:
    headers = dict(listing.headers[uid])
    frames: list[Frame] = []
    for f, ds in headers.items():
        try:
            frames.extend(frames_of(f, ds))
        except DomainSRError:
            raise
        except Exception as exc:  # a corrupt element pydicom parses lazily
            raise InputError(f"not a readable DICOM file: {type(exc).__name__}: {exc}", f) from exc
    return headers, frames


def _series_name(info: SeriesInfo) -> str:
    """How warnings name a series: its number, never a path or patient tag."""
    return f"#{info.series_number}" if info.series_number is not None else "(no series number)"


@quiet_pydicom()
def read_dicom_series(path_or_files: str | Path | Sequence[str | Path], series_uid: str | None = None,
                      domain: str | None = None, volume: int | None = None) -> SpatialImage:
    """Read one CT/MR series as a ``(1, i, j, k)`` volume in physical units (HU for CT).

    ``series_uid`` picks a series when several are present. ``domain`` is needed only for
    modalities other than CT ("ct") and MR ("mri"). ``volume`` picks one volume of a multi-volume
    series (``SeriesInfo.volume``); it is needed, and used, only when the given files hold
    several volumes (the ``files`` of one listed volume hold just that one).
    """
    files, label = files_of(path_or_files)
    listing = scan_files(files, keep_headers=True)
    entries = _select(listing, series_uid, label)
    info = entries[0]
    domain = _domain_for(info.modality, domain, label)
    n_frames = sum(e.n_frames for e in entries)
    check_fits(decoded_bytes((n_frames, info.rows, info.columns), np.int32),
               f"a volume of {n_frames} slices of {info.rows}x{info.columns}", label)

    headers, frames = _series_frames(listing, info.series_uid)
    check_consistent(frames, label)
    volumes = volumes_of(frames)
    index, name, frames = pick_volume(volumes, volume, label)
    row, col = orthonormal(frames[0].iop)
    normal = np.cross(row, col)
    frames.sort(key=lambda fr: float(fr.position @ normal))
    step = _slice_step(frames, normal, label, _series_name(info))
    f0 = frames[0]
    lps = np.eye(4)
    lps[:3, 0] = row * f0.pixel_spacing[1]  # i: along a row, spacing between columns
    lps[:3, 1] = col * f0.pixel_spacing[0]  # j: down a column, spacing between rows
    lps[:3, 2] = step
    lps[:3, 3] = f0.position
    affine = LPS_RAS @ lps

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
