"""The frames of a DICOM series and the volumes they form.

A frame is one 2D image plane: a classic single-frame file, one frame of an enhanced multi-frame
file (per-frame, else shared, functional groups), or one tile of a **Siemens mosaic**
(ImageType MOSAIC, CSA header; nibabel's ``nicom.dicomwrappers.MosaicWrapper`` unpacks it). A
**multi-volume series** (diffusion b-values or directions, time points, acquisitions, echoes,
several mosaics) is split into volumes that each hold every slice position once
(:func:`volumes_of`).
"""
from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from domainsr.errors import GeometryError, InputError, UnsupportedFormatError

with warnings.catch_warnings():  # nibabel.nicom warns on import that its readers are experimental
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom import csareader, dicomwrappers

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # DICOM patient LPS <-> RAS+ (x and y negated)
ORIENTATION_TOLERANCE = 1e-4  # on direction cosines
SQRT3 = float(np.sqrt(3.0))
MAX_POSITION_ROUNDING = 0.1  # mm: coarser-looking positions (integers) are not taken as rounded


@dataclass
class Frame:
    """One image plane of a series: where it is, how it is stored and rescaled."""

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


def csa_header(ds: Dataset) -> dict | None:
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


def frames_of(path: Path, ds: Dataset) -> list[Frame]:
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
    csa = csa_header(ds)
    plane = {"iop": np.asarray(ds.ImageOrientationPatient, float),
             "pixel_spacing": np.asarray(ds.PixelSpacing, float),
             "thickness": _num(ds.get("SliceThickness")), "spacing_between": _num(ds.get("SpacingBetweenSlices")),
             "slope": _num(ds.get("RescaleSlope")) or 1.0, "intercept": _num(ds.get("RescaleIntercept")) or 0.0,
             "rounding": _rounding(ds.ImagePositionPatient), "volume_keys": _volume_keys(ds, csa=csa)}
    if _is_mosaic(ds):
        return _mosaic_frames(path, ds, csa, {**common, **plane})
    return [Frame(index=None, position=np.asarray(ds.ImagePositionPatient, float), rows=int(ds.Rows),
                   cols=int(ds.Columns), **common, **plane)]


def _multiframe_frames(path: Path, ds: Dataset, common: dict[str, Any]) -> list[Frame]:
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
        frames.append(Frame(
            index=i, position=np.asarray(pos, float), iop=np.asarray(iop, float),
            pixel_spacing=np.asarray(ps, float), rows=int(ds.Rows), cols=int(ds.Columns),
            thickness=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SliceThickness")),
            spacing_between=_num(_group_attr(ds, per, "PixelMeasuresSequence", "SpacingBetweenSlices")),
            slope=1.0 if slope is None else slope, intercept=0.0 if inter is None else inter,
            rounding=_rounding(pos), volume_keys=_volume_keys(ds, per), **common))
    return frames


def mosaic_wrapper(ds: Dataset, csa: dict | None, path: Path) -> dicomwrappers.MosaicWrapper:
    if not csa:
        raise UnsupportedFormatError("Siemens mosaic (ImageType MOSAIC) without a readable CSA header", path)
    try:
        return dicomwrappers.MosaicWrapper(ds, csa_header=csa)
    except dicomwrappers.WrapperError as exc:
        raise UnsupportedFormatError(f"Siemens mosaic cannot be unpacked: {exc}", path) from exc


def _mosaic_frames(path: Path, ds: Dataset, csa: dict | None, plane: dict[str, Any]) -> list[Frame]:
    """The tiles of a Siemens mosaic as frames: nibabel gives the tile size, the position of the
    first tile (corrected for the mosaic offset) and the slice normal (signed by the CSA header);
    tile ``k`` lies ``k`` slice steps (SpacingBetweenSlices, else SliceThickness) along it."""
    wrapper = mosaic_wrapper(ds, csa, path)
    try:
        rows, cols, n = wrapper.image_shape
        first, csa_normal = np.asarray(wrapper.image_position, float), np.asarray(wrapper.slice_normal, float)
        step = float(wrapper.voxel_sizes[2])
    except (TypeError, ValueError, AssertionError, csareader.CSAError) as exc:
        raise UnsupportedFormatError(f"Siemens mosaic geometry cannot be read: {exc}", path) from exc
    if rows * wrapper.mosaic_size != int(ds.Rows) or cols * wrapper.mosaic_size != int(ds.Columns):
        raise UnsupportedFormatError(f"mosaic of {ds.Rows}x{ds.Columns} is not {wrapper.mosaic_size}"
                                     f"x{wrapper.mosaic_size} tiles of {n} slices", path)
    normal = np.cross(*orthonormal(plane["iop"]))  # unit length; nibabel's is the raw cosines' cross
    normal *= np.sign(normal @ csa_normal) or 1.0
    keys = {**plane.pop("volume_keys"), "mosaic": str(path)}
    return [Frame(index=k, position=first + k * step * normal, rows=int(rows), cols=int(cols), mosaic=True,
                   volume_keys=keys, **plane) for k in range(int(n))]


def orthonormal(iop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row and column cosines made unit length and exactly orthogonal (the nearest orthonormal
    pair, by polar decomposition): stored cosines carry ~6 digits."""
    u, _, vt = np.linalg.svd(np.column_stack([iop[:3], iop[3:]]), full_matrices=False)
    q = u @ vt
    return q[:, 0], q[:, 1]


def check_consistent(frames: list[Frame], label: Path) -> None:
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


def normal_of(frames: list[Frame]) -> np.ndarray:
    return np.cross(*orthonormal(frames[0].iop))


def _same_position_tolerance(frames: list[Frame]) -> float:
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


def volumes_of(frames: list[Frame]) -> list[tuple[str, list[Frame]]]:
    """The volumes of a series, ``[(label, frames)]``: one (label ``""``) unless slice positions
    repeat and one attribute (b-value and direction, time point, acquisition, echo, trigger time,
    mosaic file) splits the frames into volumes that each hold every position exactly once."""
    normal = normal_of(frames)
    tol = _same_position_tolerance(frames)
    proj = np.sort([float(fr.position @ normal) for fr in frames])
    if len(proj) < 2 or np.diff(proj).min() > tol:
        return [("", frames)]
    for name in ("diffusion", "time point", "acquisition", "echo", "trigger time", "mosaic"):
        values = [fr.volume_keys.get(name) for fr in frames]
        if any(v is None for v in values) or len(set(values)) < 2:
            continue
        groups: dict[Any, list[Frame]] = {}
        for fr, v in zip(frames, values):
            groups.setdefault(v, []).append(fr)
        sets = [np.sort([float(fr.position @ normal) for fr in g]) for g in groups.values()]
        distinct = all(len(s) < 2 or np.diff(s).min() > tol for s in sets)
        if distinct and all(len(s) == len(sets[0]) and np.allclose(s, sets[0], atol=tol) for s in sets):
            return [(_volume_label(name, v, n), groups[v]) for n, v in enumerate(_in_order(list(groups)))]
    return [("", frames)]


def pick_volume(volumes: list[tuple[str, list[Frame]]], volume: int | None,
                 label: Path) -> tuple[int | None, str, list[Frame]]:
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
