"""An audit's regions and risk in the tools people use: GeoJSON (QGIS), a label map, a DICOM
Parametric Map and Segmentation.

* :func:`regions_geojson` (``regions.geojson``): an RFC 7946 FeatureCollection, WGS84
  longitude/latitude, one Polygon per region: its box's outer pixel edges in the raster CRS,
  densified (up to :data:`EDGE_SEGMENTS` points per edge, so a box stays right in any
  projection), transformed with pyproj, exterior ring counter-clockwise; properties ``id``,
  ``kind``, ``verdict``, ``peak_risk``, ``mean_risk``, ``score``, ``size``, ``physical_size``,
  ``physical_unit``, ``bbox_index`` (and a per-feature ``bbox``). No ``crs`` member (RFC 7946 has
  none). A raster whose CRS has no geographic position (a local or engineering CRS) gets no
  GeoJSON: index coordinates in a ``.geojson`` would be read as degrees. A region box crossing the
  antimeridian is not cut (RFC 7946 3.1.9 asks for it; Sentinel-2/Landsat tiles on it are rare).
* :func:`label_map` (``regions.nii.gz`` for volumes, ``regions.tif`` for rasters): uint16, each
  voxel the id of the region it belongs to (0: none; where boxes overlap the higher-ranked, lower
  id wins), on the full-resolution audited SR grid (:func:`audited_grid`: the SR output's affine /
  geotransform when the whole file was audited), marked AI-derived (NIfTI
  intent "label" and description; GeoTIFF tags). A region's voxels are
  ``result.region_labels == id`` when the result carries that map, else its kind's flagged
  pixels inside its box (hallucination/omission: the reference class map; inconsistency: the
  non-zero reference-free risk; uncertain: the box), else its whole box.
* :func:`parametric_map` (``risk.dcm``): the risk as a highdicom Parametric Map on the planes of
  the derived SR series, referencing its instances, same study and frame of reference
  (:func:`domainsr.io.dicom.parametric_map`); :func:`segmentation` (``regions.seg.dcm``): the
  review and fail regions as a binary Segmentation, one segment per verdict, on the same planes.

:func:`write_exports` writes what applies to ``out_dir`` and returns ``label -> path`` (the
item's extras), with ``skipped`` saying why the others were not written.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from domainsr import __version__
from domainsr.audit import hallucination as hal
from domainsr.audit.protocol import AuditResult, risk_image
from domainsr.audit.results import Region, jsonable
from domainsr.errors import GeometryError, OutputError
from domainsr.image import GeoGeometry, Geometry, MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.io.dicom import VERDICT_SEGMENTS, quiet_pydicom, regions_segmentation, verdict_labels
from domainsr.io.dicom import parametric_map as dicom_parametric_map
from domainsr.io.nifti import companion_meta

log = logging.getLogger("domainsr.audit.exports")

#: Most segments a box edge is cut into before it is projected (one per pixel below that).
EDGE_SEGMENTS = 16
#: Decimal places of longitude/latitude (1e-7 degree is about 1 cm).
LONLAT_DECIMALS = 7
GEOJSON = "regions.geojson"
LABELS_NIFTI = "regions.nii.gz"
LABELS_RASTER = "regions.tif"
PARAMETRIC_MAP = "risk.dcm"
SEGMENTATION = "regions.seg.dcm"
#: NIfTI description of the label map (at most 80 characters).
LABEL_DESCRIP = "DomainSR audit regions, AI-derived: label = region id (0 none)"
LABEL_TAGS = {"DOMAINSR_PRODUCT": "audit regions: label = region id (0 none), AI-derived",
              "DOMAINSR_VERSION": __version__}
_FEATURE_KEYS = ("id", "kind", "verdict", "peak_risk", "mean_risk", "score", "size", "physical_size",
                 "physical_unit", "bbox_index")


def _stride(result: AuditResult) -> int:
    return int(getattr(result, "stride", 1) or 1)


def audited_grid(result: AuditResult) -> tuple[Geometry, tuple[int, ...]]:
    """The full-resolution grid of the audited SR box and the box's start on the SR file's axes
    (regions' ``bbox_index`` are on those axes). Undoes the overview's decimation (``stride``)
    and checks the grid against the regions' world boxes (OutputError if they disagree)."""
    g, stride = result.sr.geometry, _stride(result)
    cov = getattr(result, "coverage", None)
    box = getattr(cov, "box", None) if cov is not None else None
    shape = tuple(b - a + 1 for a, b in box) if box else tuple(result.sr.spatial_shape)
    start = tuple(a for a, _ in box) if box else (0,) * len(shape)
    if stride > 1 and isinstance(g, GeoGeometry):
        from affine import Affine

        g = GeoGeometry(g.crs, g.transform @ Affine.scale(1.0 / stride), shape)
    elif stride > 1 and isinstance(g, MedicalGeometry):
        m = np.eye(4)  # an overview voxel is the centre of a block of stride^3 voxels
        m[:3, :3] = np.diag([float(stride)] * 3)
        m[:3, 3] = (stride - 1) / 2.0
        g = MedicalGeometry(g.affine @ np.linalg.inv(m), shape)
    for region in result.regions[:1]:
        if region.world is None:
            continue
        rel = [[a - o, b - o] for (a, b), o in zip(region.bbox_index, start)]
        got = hal.world_box(g, rel, [c - o for c, o in zip(region.centroid_index, start)])
        tol = 1e-3 * float(min(g.spacing)) + 2e-3  # world boxes are rounded to 1e-3
        if got is None or not (np.allclose(got.min, region.world.min, atol=tol)
                               and np.allclose(got.max, region.world.max, atol=tol)):
            raise OutputError("the audit result's grid does not match its regions' world boxes")
    return g, start


class NotExported(OutputError):
    """An export that does not apply to this audit (the reason is the message)."""


class Exports(dict):
    """``label -> path`` of the files written, plus ``skipped``: ``label -> why not``."""

    def __init__(self, written: dict[str, Path] | None = None, skipped: dict[str, str] | None = None) -> None:
        super().__init__(written or {})
        self.skipped = dict(skipped or {})


# --------------------------------------------------------------------------------------- GeoJSON

def _ring_index(bbox: Sequence[Sequence[int]]) -> np.ndarray:
    """The box's outer pixel edges as a closed ring of (col, row) corner coordinates, each edge
    cut into at most :data:`EDGE_SEGMENTS` segments."""
    (r0, r1), (c0, c1) = bbox
    top, bottom, left, right = float(r0), float(r1 + 1), float(c0), float(c1 + 1)

    def edge(a: tuple[float, float], b: tuple[float, float], n_px: int) -> np.ndarray:
        t = np.linspace(0.0, 1.0, max(1, min(n_px, EDGE_SEGMENTS)) + 1)[:-1]
        return np.column_stack([a[0] + t * (b[0] - a[0]), a[1] + t * (b[1] - a[1])])

    w, h = c1 - c0 + 1, r1 - r0 + 1
    ring = np.concatenate([edge((left, top), (right, top), w), edge((right, top), (right, bottom), h),
                           edge((right, bottom), (left, bottom), w), edge((left, bottom), (left, top), h)])
    return np.vstack([ring, ring[:1]])


def _to_lonlat(geometry: GeoGeometry) -> Any:
    """A pyproj transform map CRS -> WGS84 lon/lat; NotExported for a CRS without a geographic position."""
    from pyproj import CRS, Transformer
    from pyproj.exceptions import CRSError, ProjError

    try:
        crs = CRS.from_wkt(geometry.crs.to_wkt())
        if crs.is_engineering or crs.geodetic_crs is None:
            raise NotExported(f"the raster's CRS ({geometry.crs.to_string() or 'local'}) has no geographic "
                              "position; regions are in the JSON report in index and map coordinates")
        return Transformer.from_crs(crs, "EPSG:4326", always_xy=True)
    except (CRSError, ProjError) as exc:
        raise NotExported(f"the raster's CRS cannot be transformed to WGS84: {exc}") from exc


def _signed_area(ring: np.ndarray) -> float:
    x, y = ring[:, 0], ring[:, 1]
    return 0.5 * float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1]))


def region_polygon(region: Region, geometry: GeoGeometry, transformer: Any = None,
                   start: Sequence[int] = (0, 0)) -> list[list[float]]:
    """The region's box as a closed, counter-clockwise lon/lat ring (RFC 7946 exterior ring);
    ``geometry`` is the grid whose pixel (0, 0) is the SR file's ``start``."""
    if len(region.bbox_index) != 2:
        raise NotExported(f"region {region.id} is not 2D")
    tr = transformer or _to_lonlat(geometry)
    cols_rows = _ring_index(region.bbox_index) - np.asarray([start[1], start[0]], float)
    t = geometry.transform
    x = t.a * cols_rows[:, 0] + t.b * cols_rows[:, 1] + t.c
    y = t.d * cols_rows[:, 0] + t.e * cols_rows[:, 1] + t.f
    lon, lat = tr.transform(x, y)
    ring = np.round(np.column_stack([lon, lat]), LONLAT_DECIMALS)
    if not np.isfinite(ring).all():
        raise NotExported(f"region {region.id} lies outside the area where its CRS maps to WGS84")
    ring[-1] = ring[0]
    if _signed_area(ring) < 0:
        ring = ring[::-1]
    return ring.tolist()


def regions_geojson(result: AuditResult) -> dict[str, Any]:
    """The regions of a raster audit as an RFC 7946 FeatureCollection (WGS84 lon/lat polygons with
    the region's properties). NotExported for a volume or a CRS without a geographic position."""
    if not isinstance(result.sr.geometry, GeoGeometry):
        raise NotExported("GeoJSON is for rasters on a map; this audit is of a volume")
    geometry, start = audited_grid(result)
    assert isinstance(geometry, GeoGeometry)
    tr = _to_lonlat(geometry)
    features = []
    for region in result.regions:
        ring = region_polygon(region, geometry, tr, start)
        arr = np.asarray(ring)
        record = jsonable(region)
        props = {k: record.get(k) for k in _FEATURE_KEYS}
        features.append({"type": "Feature", "id": region.id,
                         "bbox": [*arr.min(0).tolist(), *arr.max(0).tolist()],
                         "geometry": {"type": "Polygon", "coordinates": [ring]}, "properties": props})
    collection: dict[str, Any] = {"type": "FeatureCollection", "name": "domainsr_audit_regions"}
    if features:
        boxes = np.asarray([f["bbox"] for f in features])
        collection["bbox"] = [*boxes[:, :2].min(0).tolist(), *boxes[:, 2:].max(0).tolist()]
    collection["features"] = features
    collection["domainsr"] = {"verdict": result.verdict, "source_crs": geometry.crs.to_string(),
                              "geometry": "each region's box (outer pixel edges), not its exact outline"}
    return collection


def write_regions_geojson(result: AuditResult, path: str | Path, *, risk_map: Path | None = None) -> Path:
    """Write :func:`regions_geojson` to ``path`` (atomically); ``risk_map`` is named in the
    collection's ``domainsr`` member."""
    collection = regions_geojson(result)
    if risk_map is not None:
        collection["domainsr"]["risk_map"] = Path(risk_map).name
    p = Path(path)
    with atomic_path(p) as tmp:
        tmp.write_text(json.dumps(collection, indent=1, allow_nan=False) + "\n", encoding="utf-8")
    return p


# ------------------------------------------------------------------------------------- label map

def _kind_mask(result: AuditResult, kind: str) -> np.ndarray | None:
    """The pixels a region of ``kind`` was made of (on the SR grid), when the result has them."""
    if kind in ("hallucination", "omission") and result.classes is not None:
        return result.classes == (hal.HALLUCINATED if kind == "hallucination" else hal.OMITTED)
    if kind in ("inconsistency", "lr-inconsistency") and result.reference is None:
        return result.risk > 0
    return None


def region_labels(result: AuditResult) -> np.ndarray:
    """The uint16 label array on the full-resolution audited SR grid (:func:`audited_grid`):
    region id per pixel, 0 none (see the module doc)."""
    grid, start = audited_grid(result)
    shape = tuple(grid.shape)
    given = getattr(result, "region_labels", None)
    if given is not None and tuple(np.shape(given)) == shape:
        return np.asarray(given).astype(np.uint16)
    if max((r.id for r in result.regions), default=0) > np.iinfo(np.uint16).max:
        raise OutputError(f"{len(result.regions)} regions do not fit a uint16 label map")
    labels = np.zeros(shape, np.uint16)
    full = _stride(result) == 1 and tuple(result.risk.shape) == shape
    for region in sorted(result.regions, key=lambda r: -r.id):  # lower ids (higher risk) painted last
        box = tuple(slice(max(a - o, 0), max(b + 1 - o, 0)) for (a, b), o in zip(region.bbox_index, start))
        mask = _kind_mask(result, region.kind) if full else None
        inside = mask[box] if mask is not None else None
        if inside is None or not inside.any():
            labels[box] = region.id
        else:
            labels[box][inside] = region.id
    return labels


def label_map(result: AuditResult) -> SpatialImage:
    """The regions as a uint16 label image on the full-resolution audited SR grid (the SR
    output's geometry when the whole file was audited) with companion metadata (NIfTI intent
    label; GeoTIFF tags)."""
    sr = result.sr
    grid, _ = audited_grid(result)
    data = region_labels(result)[None]
    meta: dict[str, Any] = {"storage_dtype": "uint16"}
    if isinstance(grid, MedicalGeometry):
        like = sr if grid is sr.geometry else SpatialImage(data=data, domain=sr.domain, geometry=grid)
        meta.update(companion_meta(like, descrip=LABEL_DESCRIP, intent="label", intent_name="region id"))
    else:
        meta["raster"] = {"tags": dict(LABEL_TAGS)}
    return SpatialImage(data=data, domain=sr.domain, geometry=grid, band_names=("region",), units="",
                        nodata=None, mask=None, provenance={"source": "domainsr audit regions", "history": []},
                        meta=meta)


def write_label_map(result: AuditResult, path: str | Path) -> Path:
    """Write :func:`label_map` with the writer ``path``'s suffix names (.nii.gz / .tif)."""
    from domainsr.io import write_image

    return Path(write_image(label_map(result), path))


# ----------------------------------------------------------------------------------------- DICOM

@quiet_pydicom()
def read_series_headers(folder: str | Path) -> list[Dataset]:
    """The headers (no pixels) of the DICOM files in ``folder``: a derived series on disk."""
    files = sorted(Path(folder).glob("*.dcm"))
    if not files:
        raise OutputError("no DICOM files in the derived series folder", folder)
    return [pydicom.dcmread(f, stop_before_pixels=True) for f in files]


def parametric_map(result: AuditResult, derived_series: Sequence[Dataset]) -> Dataset:
    """The risk map as a DICOM Parametric Map on the planes of ``derived_series`` (the SR output
    written as a derived series: same study and frame of reference), referencing its instances.
    NotExported for a raster or a risk overview (``result.stride`` > 1)."""
    if not isinstance(result.sr.geometry, MedicalGeometry) or result.sr.geometry.ndim != 3:
        raise NotExported("a DICOM Parametric Map is for volumes")
    if _stride(result) != 1:
        raise NotExported("the risk map is an overview (stride > 1), not on the SR grid")
    th = result.thresholds
    return dicom_parametric_map(risk_image(result), derived_series,
                                window=(float(th.fail_risk) / 2, float(th.fail_risk)),
                                software_version=__version__)


def segmentation(result: AuditResult, derived_series: Sequence[Dataset]) -> Dataset:
    """The flagged regions as a DICOM Segmentation on the planes of ``derived_series``: one
    segment per verdict (``review``, ``fail``) holding the pixels of the regions with that verdict
    (the label map's pixels). NotExported for a raster or when no region needs a review."""
    if not isinstance(result.sr.geometry, MedicalGeometry) or result.sr.geometry.ndim != 3:
        raise NotExported("a DICOM Segmentation is for volumes")
    verdicts = {r.id: r.verdict for r in result.regions}
    if not set(verdicts.values()) & set(VERDICT_SEGMENTS.values()):
        raise NotExported("no region needs a review")
    grid, _ = audited_grid(result)
    img = SpatialImage(data=verdict_labels(region_labels(result), verdicts)[None], domain=result.sr.domain,
                       geometry=grid)
    try:
        return regions_segmentation(img, derived_series, software_version=__version__)
    except OutputError as exc:  # nothing to segment on these planes (a GeometryError passes)
        raise NotExported(exc.message) from exc


def _dicom_file(ds: Dataset, path: Path) -> Path:
    with atomic_path(path) as tmp, quiet_pydicom():
        ds.save_as(tmp, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------- all of it

def write_exports(result: AuditResult, out_dir: str | Path, *, risk_map: Path | None = None,
                  derived_series: Sequence[Dataset] | str | Path | None = None) -> Exports:
    """Write every export that applies into ``out_dir``: ``regions.geojson`` (rasters with a
    geographic CRS), ``regions.nii.gz`` (volumes) or ``regions.tif`` (rasters audited at full
    resolution), and ``risk.dcm`` (a Parametric Map) and ``regions.seg.dcm`` (a Segmentation of the
    review/fail regions) when the derived series is given (datasets or its folder; a series that
    is not on the audited SR grid is skipped, with the reason). Returns ``label -> path``;
    ``.skipped`` says why the others were not written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    done = Exports()
    raster = isinstance(result.sr.geometry, GeoGeometry)
    if raster:
        try:
            done[GEOJSON] = write_regions_geojson(result, out / GEOJSON, risk_map=risk_map)
        except NotExported as exc:
            done.skipped[GEOJSON] = exc.message
        if _stride(result) == 1:
            done[LABELS_RASTER] = write_label_map(result, out / LABELS_RASTER)
        else:
            done.skipped[LABELS_RASTER] = "the scene was audited windowed (overview arrays); regions.geojson has the boxes"
    else:
        done[LABELS_NIFTI] = write_label_map(result, out / LABELS_NIFTI)
        if derived_series is not None:
            series = (read_series_headers(derived_series) if isinstance(derived_series, (str, Path))
                      else list(derived_series))
            for label, make in ((PARAMETRIC_MAP, parametric_map), (SEGMENTATION, segmentation)):
                try:
                    done[label] = _dicom_file(make(result, series), out / label)
                except (NotExported, GeometryError) as exc:  # e.g. the SR file's grid is not the audited grid
                    done.skipped[label] = exc.message
        else:
            done.skipped[PARAMETRIC_MAP] = "no derived DICOM series given"  # (nor a Segmentation)
    for label, why in done.skipped.items():
        log.info("audit export %s not written: %s", label, why)
    return done


__all__ = ["EDGE_SEGMENTS", "GEOJSON", "LABELS_NIFTI", "LABELS_RASTER", "PARAMETRIC_MAP", "SEGMENTATION",
           "Exports", "NotExported", "audited_grid", "label_map", "parametric_map",
           "read_series_headers", "region_labels", "region_polygon", "regions_geojson", "segmentation",
           "write_exports", "write_label_map", "write_regions_geojson"]
