"""SpatialImage: an array that never loses its place in the world.

Array layout is channel-first with the spatial axes in *voxel index order*:

* rasters: ``(C, rows, cols)``; :class:`GeoGeometry` holds the rasterio geotransform that maps
  ``(col, row)`` pixel corners to map coordinates, so spatial scale factors are ``(f_rows, f_cols)``.
* volumes: ``(C, i, j, k)`` exactly as NIfTI stores them; :class:`MedicalGeometry` holds the 4x4
  affine that maps voxel centres ``(i, j, k)`` to patient RAS+ millimetres. For DICOM, ``i`` runs
  along a row (columns), ``j`` down the columns (rows), ``k`` across slices, so a thick-slice
  series is upsampled with factors ``(1, 1, 4)``.

(DESIGN.md sketched ``(C, Z, Y, X)``; keeping NIfTI's own order means a NIfTI affine is stored
untouched and a per-axis scale such as ``(1, 1, 4)`` names the slice axis last in both formats.)

``geometry.scaled(factors)`` is the only place that computes an output grid; the new grid
covers exactly the same physical extent as the input grid.
"""
from __future__ import annotations

import copy
import datetime as _dt
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np

from domainsr.bands import band_key, match_bands
from domainsr.errors import GeometryError, InputError

Domain = Literal["mri", "ct", "optical"]
DOMAINS: tuple[str, ...] = ("mri", "ct", "optical")


def _factors(factors: float | Sequence[float], ndim: int) -> np.ndarray:
    f = np.atleast_1d(np.asarray(factors, dtype=float))
    if f.size == 1:
        f = np.repeat(f, ndim)
    if f.size != ndim or np.any(f <= 0):
        raise GeometryError(f"scale factors {tuple(f)} do not fit {ndim} spatial axes")
    return f


def _scaled_shape(shape: Sequence[int], f: np.ndarray) -> tuple[int, ...]:
    new = np.asarray(shape, dtype=float) * f
    rounded = np.round(new)
    if np.any(np.abs(new - rounded) > 1e-6) or np.any(rounded < 1):
        raise GeometryError(f"shape {tuple(shape)} scaled by {tuple(f)} is not a whole grid")
    return tuple(int(v) for v in rounded)


@dataclass(frozen=True)
class MedicalGeometry:
    """Voxel grid in patient space: ``affine`` maps voxel-centre indices to RAS+ mm."""

    affine: np.ndarray
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4) or not np.all(np.isfinite(aff)):
            raise GeometryError(f"affine must be a finite 4x4 matrix, got shape {aff.shape}")
        if abs(np.linalg.det(aff[:3, :3])) < 1e-12:
            raise GeometryError("affine is singular (zero voxel size or collinear axes)")
        object.__setattr__(self, "affine", aff)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Voxel size in mm along each array axis."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0)[: self.ndim])

    @property
    def direction(self) -> np.ndarray:
        """Unit direction cosines of the array axes (columns) in RAS+."""
        return self.affine[:3, :3] / np.linalg.norm(self.affine[:3, :3], axis=0)

    @property
    def orientation(self) -> str:
        """Axis codes such as ``'RAS'`` or ``'LPS'`` (where each axis index increases towards)."""
        import nibabel as nib

        return "".join(nib.aff2axcodes(self.affine))

    @property
    def origin(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in self.affine[:3, 3])

    def index_to_world(self, index: np.ndarray | Sequence[float]) -> np.ndarray:
        """Map voxel indices ``(..., 3)`` to RAS+ mm."""
        idx = np.asarray(index, dtype=float)
        return idx @ self.affine[:3, :3].T + self.affine[:3, 3]

    def extent(self) -> np.ndarray:
        """World coordinates of the 8 outer corners of the grid (voxel edges, not centres)."""
        import itertools

        hi = np.asarray(self.shape, dtype=float) - 0.5
        corners = np.array([[hi[a] if bit else -0.5 for a, bit in enumerate(bits)]
                            for bits in itertools.product((0, 1), repeat=self.ndim)])
        return self.index_to_world(corners)

    def scaled(self, factors: float | Sequence[float]) -> MedicalGeometry:
        """Geometry of the grid upsampled by per-axis ``factors`` over the same physical extent.

        New voxel ``n`` has its centre at old index ``(n + 0.5) / f - 0.5``.
        """
        f = _factors(factors, self.ndim)
        m = np.eye(4)
        m[:3, :3] = np.diag(1.0 / f)
        m[:3, 3] = 0.5 / f - 0.5
        return MedicalGeometry(self.affine @ m, _scaled_shape(self.shape, f))

    def cropped(self, start: Sequence[int], shape: Sequence[int]) -> MedicalGeometry:
        """Geometry of the sub-grid starting at voxel ``start`` with ``shape``."""
        m = np.eye(4)
        m[:3, 3] = np.asarray(start, dtype=float)
        return MedicalGeometry(self.affine @ m, tuple(shape))

    def almost_equal(self, other: object, atol: float = 1e-6) -> bool:
        return (
            isinstance(other, MedicalGeometry)
            and self.shape == other.shape
            and bool(np.allclose(self.affine, other.affine, atol=atol))
        )


@dataclass(frozen=True)
class GeoGeometry:
    """Raster grid on a map: ``transform`` (rasterio ``Affine``) maps pixel corners ``(col, row)``
    to map coordinates in ``crs``; ``shape`` is ``(rows, cols)``."""

    crs: Any  # rasterio.crs.CRS
    transform: Any  # affine.Affine
    shape: tuple[int, int]

    def __post_init__(self) -> None:
        from affine import Affine
        from rasterio.crs import CRS

        if self.crs is None:
            raise GeometryError("raster has no coordinate reference system (CRS)")
        crs = self.crs if isinstance(self.crs, CRS) else CRS.from_user_input(self.crs)
        tr = self.transform if isinstance(self.transform, Affine) else Affine(*list(self.transform)[:6])
        if abs(tr.determinant) < 1e-18:
            raise GeometryError("geotransform is singular")
        object.__setattr__(self, "crs", crs)
        object.__setattr__(self, "transform", tr)
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))

    ndim = 2

    @property
    def res(self) -> tuple[float, float]:
        """Pixel size ``(x, y)`` in CRS units (positive numbers, also for rotated grids)."""
        t = self.transform
        return (float(np.hypot(t.a, t.d)), float(np.hypot(t.b, t.e)))

    @property
    def spacing(self) -> tuple[float, float]:
        """Pixel size along the array axes ``(rows, cols)``."""
        rx, ry = self.res
        return (ry, rx)

    @property
    def is_rotated(self) -> bool:
        return bool(self.transform.b != 0 or self.transform.d != 0)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """``(left, bottom, right, top)`` of the grid's outer edges."""
        from rasterio.transform import array_bounds

        rows, cols = self.shape
        if self.is_rotated:
            xs, ys = zip(*(self.transform @ (c, r) for c in (0, cols) for r in (0, rows)))
            return (min(xs), min(ys), max(xs), max(ys))
        west, south, east, north = array_bounds(rows, cols, self.transform)
        return (float(west), float(south), float(east), float(north))

    def index_to_world(self, rows: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map pixel *centres* (row, col) to map coordinates."""
        t = self.transform
        c = np.asarray(cols, dtype=float) + 0.5
        r = np.asarray(rows, dtype=float) + 0.5
        return t.a * c + t.b * r + t.c, t.d * c + t.e * r + t.f

    def scaled(self, factors: float | Sequence[float]) -> GeoGeometry:
        """Geometry of the grid upsampled by ``factors = (f_rows, f_cols)`` over the same bounds."""
        from affine import Affine

        f = _factors(factors, 2)
        return GeoGeometry(self.crs, self.transform @ Affine.scale(1.0 / f[1], 1.0 / f[0]),
                           _scaled_shape(self.shape, f))

    def cropped(self, start: Sequence[int], shape: Sequence[int]) -> GeoGeometry:
        """Geometry of the window starting at ``(row, col) = start`` with ``shape``."""
        from affine import Affine

        return GeoGeometry(self.crs, self.transform @ Affine.translation(start[1], start[0]), tuple(shape))

    def almost_equal(self, other: object, atol: float = 1e-6) -> bool:
        return (
            isinstance(other, GeoGeometry)
            and self.shape == other.shape
            and self.crs == other.crs
            and self.transform.almost_equals(other.transform, precision=atol)
        )


Geometry = MedicalGeometry | GeoGeometry


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class SpatialImage:
    """A channel-first array with its domain, geometry and everything needed to write it back.

    ``mask`` marks *valid* pixels/voxels (``True`` = data) over the spatial axes, or is ``None``
    when everything is valid. ``nodata`` is the value written where the mask is ``False``.
    ``meta`` carries format-specific header information a writer needs to reproduce the source
    (NIfTI codes and scaling, DICOM tags, raster profile); it never holds pixel data.
    """

    data: np.ndarray
    domain: Domain
    geometry: Geometry
    band_names: tuple[str, ...] = ()
    units: str = ""
    nodata: float | None = None
    mask: np.ndarray | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise GeometryError(f"unknown domain {self.domain!r}; expected one of {DOMAINS}")
        if self.data.ndim != self.geometry.ndim + 1:
            raise GeometryError(
                f"data has shape {self.data.shape} but geometry has {self.geometry.ndim} spatial axes"
            )
        if tuple(self.data.shape[1:]) != tuple(self.geometry.shape):
            raise GeometryError(
                f"data spatial shape {self.data.shape[1:]} differs from geometry shape {self.geometry.shape}"
            )
        if not self.band_names:
            self.band_names = tuple(f"band{i + 1}" for i in range(self.data.shape[0]))
        self.band_names = tuple(self.band_names)
        if len(self.band_names) != self.data.shape[0]:
            raise GeometryError(f"{len(self.band_names)} band names for {self.data.shape[0]} channels")
        if self.mask is not None:
            self.mask = np.asarray(self.mask, dtype=bool)
            if self.mask.shape != tuple(self.geometry.shape):
                raise GeometryError(f"mask shape {self.mask.shape} differs from {self.geometry.shape}")
        self.provenance.setdefault("history", [])

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    @property
    def spatial_dims(self) -> int:
        return self.data.ndim - 1

    @property
    def source(self) -> str:
        return str(self.provenance.get("source", ""))

    def valid_mask(self) -> np.ndarray:
        """Boolean valid mask over the spatial axes (all ``True`` when there is no mask)."""
        return np.ones(self.spatial_shape, dtype=bool) if self.mask is None else self.mask

    def derive(
        self,
        data: np.ndarray,
        geometry: Geometry | None = None,
        mask: np.ndarray | None | Literal["keep"] = "keep",
        step: dict[str, Any] | None = None,
        **changes: Any,
    ) -> SpatialImage:
        """A new image with new pixels (and optionally a new grid), same metadata otherwise.

        ``step`` is appended to the provenance history with a timestamp.
        """
        prov = copy.deepcopy(self.provenance)
        if step:
            prov.setdefault("history", []).append({"time": now_iso(), **step})
        return replace(
            self,
            data=data,
            geometry=geometry if geometry is not None else self.geometry,
            mask=self.mask if isinstance(mask, str) else mask,
            provenance=prov,
            meta=copy.deepcopy(self.meta),
            **changes,
        )

    def select(self, bands: Sequence[str]) -> SpatialImage:
        """The image of ``bands`` (any spelling: ``B2`` is ``B02``, see :mod:`domainsr.bands`), in
        that order and under this image's own names, with its geometry, mask, nodata, units and
        provenance; per-band metadata (``meta["raster"]`` band lists) follows the bands. The data
        is this image's array (not copied) when ``bands`` are all its bands in order. InputError
        naming the image's source when a band is not there."""
        from domainsr.io.formats import PER_BAND_META  # the format table (io imports this module)

        found, missing = match_bands(list(bands), self.band_names)
        if missing or not found:
            raise InputError(f"bands {missing or list(bands)} are not in the image's bands {list(self.band_names)}",
                             self.source or None)
        idx = [self.band_names.index(b) for b in found]
        data = self.data if idx == list(range(self.channels)) else self.data[idx]
        out = self.derive(data, band_names=tuple(found))
        for key, fields in PER_BAND_META.items():
            block = out.meta.get(key)
            if not isinstance(block, dict):
                continue
            for name in fields:
                values = block.get(name)
                if isinstance(values, list) and len(values) == self.channels:
                    block[name] = [values[i] for i in idx]
        return out

    def summary(self) -> dict[str, Any]:
        """What a reader understood, as plain data (for ``domainsr info``)."""
        g = self.geometry
        finite = self.data[np.isfinite(self.data)] if self.data.dtype.kind == "f" else self.data
        valid = finite if self.mask is None or finite.ndim != self.data.ndim else self.data[:, self.mask]
        info: dict[str, Any] = {
            "source": self.source,
            "domain": self.domain,
            "shape": list(self.data.shape),
            "dtype": str(self.data.dtype),
            "storage_dtype": self.meta.get("storage_dtype", str(self.data.dtype)),
            "units": self.units,
            "bands": list(self.band_names),
            "nodata": self.nodata,
            "valid_fraction": float(self.valid_mask().mean()),
            "value_range": [float(valid.min()), float(valid.max())] if valid.size else None,
        }
        if isinstance(g, MedicalGeometry):
            info.update(spacing_mm=[round(s, 6) for s in g.spacing], orientation=g.orientation,
                        origin_mm=[round(o, 4) for o in g.origin], affine=g.affine.round(6).tolist())
        else:
            info.update(resolution=list(g.res), crs=g.crs.to_string(), bounds=list(g.bounds),
                        transform=list(g.transform)[:6])
        return info


@dataclass
class MultiResolutionImage:
    """Bands of one scene at several native resolutions (e.g. Sentinel-2's 10/20/60 m groups).

    Each group is a :class:`SpatialImage` on its own grid; all groups share the CRS and cover the
    same area.
    """

    groups: dict[str, SpatialImage]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def band_names(self) -> tuple[str, ...]:
        return tuple(b for img in self.groups.values() for b in img.band_names)

    def group_of(self, band: str) -> str:
        """The group holding ``band`` (any spelling: ``B2`` finds ``B02``, see :mod:`domainsr.bands`)."""
        key = band_key(band)
        for name, img in self.groups.items():
            if any(band_key(b) == key for b in img.band_names):
                return name
        raise KeyError(band)

    def select(self, bands: Sequence[str]) -> SpatialImage:
        """Stack ``bands`` (all from one resolution group, any spelling) into one SpatialImage,
        under the band set's own names."""
        groups = {self.group_of(b) for b in bands}
        if len(groups) != 1:
            raise GeometryError(f"bands {list(bands)} span resolution groups {sorted(groups)}")
        return self.groups[groups.pop()].select(bands)
