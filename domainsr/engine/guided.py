"""Patch inference of guided models on two-grid inputs (LR bands + guide bands on the finer grid).

Tiles are planned on the LR grid exactly as :class:`~domainsr.engine.inferer.PatchInferer` plans
them (halo mode: cores partition the image, each window carries ``receptive_radius`` LR pixels of
context, windows shift inward at the border); each LR window is read together with the guide's
window over the same ground (``scale`` times larger), packed into one LR-grid tensor
(:func:`domainsr.models.guided.pack`) and run through :class:`~domainsr.models.guided.PackedGuided`.
The inferer's batching, device, AMP, threads and invalid-pixel handling are reused unchanged, and
the tiled result equals one whole-image pass (float rounding).

Typical use (Sentinel-2 20 m bands -> 10 m)::

    from domainsr.engine.guided import enhance_band_set
    from domainsr.io import read_image
    sr = enhance_band_set(read_image("S2_FOLDER"), "sentinel2-20m-guided")   # 6 bands at 10 m
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from domainsr.engine.inferer import PatchInferer
from domainsr.engine.sources import ArraySource, mask_output, upsample_nearest
from domainsr.errors import ConfigError, GeometryError, ModelCardMismatch
from domainsr.image import GeoGeometry, MultiResolutionImage, SpatialImage
from domainsr.models.guided import (
    GuidedCardModel,
    PackedGuided,
    guided_bands,
    guided_descriptor,
    load_guided_checkpoint,
    pixel_unshuffle_nd,
)


def _unshuffle(a: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    return pixel_unshuffle_nd(torch.from_numpy(np.ascontiguousarray(a))[None], scale)[0].numpy()


class GuidedSource:
    """A two-grid input read on the LR grid (the :class:`~domainsr.engine.inferer.Source` protocol):
    ``read(lr_slices)`` returns the LR bands and the pixel-unshuffled guide window over the same
    ground, ``(Ct + Cg * prod(scale), *window)``, with their invalid pixels packed the same way."""

    def __init__(self, lr: np.ndarray, guide: np.ndarray, scale: Sequence[int],
                 lr_mask: np.ndarray | None = None, guide_mask: np.ndarray | None = None) -> None:
        self.scale = tuple(int(s) for s in scale)
        want = tuple(n * s for n, s in zip(lr.shape[1:], self.scale))
        if len(self.scale) != lr.ndim - 1 or tuple(guide.shape[1:]) != want:
            raise ModelCardMismatch(f"guide of shape {tuple(guide.shape[1:])} does not cover the LR grid "
                                    f"{tuple(lr.shape[1:])} refined by {self.scale} (expected {want})")
        self._lr, self._guide = ArraySource(lr, lr_mask), ArraySource(guide, guide_mask)
        self.shape = self._lr.shape
        self.channels = self._lr.channels + self._guide.channels * math.prod(self.scale)

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        x, inv = self._lr.read(slices)
        g, ginv = self._guide.read(tuple(slice(s.start * f, s.stop * f) for s, f in zip(slices, self.scale)))
        packed = np.concatenate([x, _unshuffle(g, self.scale)])
        if inv is None and ginv is None:
            return packed, None
        inv = np.zeros(x.shape, bool) if inv is None else inv
        ginv = np.zeros(g.shape, bool) if ginv is None else ginv
        return packed, np.concatenate([inv, _unshuffle(ginv, self.scale)])


def guided_inferer(model: torch.nn.Module, **kwargs: Any) -> PatchInferer:
    """A :class:`PatchInferer` over ``model`` (``forward(lr, guide)``, e.g. a
    :class:`~domainsr.models.guided.GuidedCardModel`), described by
    :func:`~domainsr.models.guided.guided_descriptor`, in halo mode; ``kwargs`` as for PatchInferer
    (``tile``, ``batch_size``, ``device``, ``amp``, ``threads``, ``progress``). Blending overlaps and
    reflect borders are refused: reflecting a packed window would mirror the guide's sub-pixels wrongly."""
    if any(np.atleast_1d(kwargs.get("overlap", 0))) or kwargs.get("border", "model") != "model":
        raise ConfigError("guided inference tiles in halo mode only (overlap=0, border='model'); it is exact")
    return PatchInferer(guided_descriptor(model), **kwargs)


def run_guided(inferer: PatchInferer, lr: np.ndarray, guide: np.ndarray, *, lr_mask: np.ndarray | None = None,
               guide_mask: np.ndarray | None = None, fill: float = np.nan) -> np.ndarray:
    """Enhance ``lr`` ``(Ct, *sp)`` with ``guide`` ``(Cg, *sp * scale)``; returns ``(Ct, *sp * scale)``
    float32. Output pixels over an invalid LR pixel, or over an LR pixel whose guide block has an
    invalid pixel, are set to ``fill``."""
    if not isinstance(inferer.model, PackedGuided):
        raise ConfigError("run_guided needs an inferer from guided_inferer()")
    scale = inferer.scale_for(lr.ndim - 1)
    source = GuidedSource(lr, guide, scale, lr_mask, guide_mask)
    plan = inferer.plan(source.shape)
    if plan.blended:
        raise ConfigError("guided inference needs a model with a known receptive radius (halo mode)")
    out = np.full((inferer.descriptor.out_channels, *plan.out_shape), fill, dtype=np.float32)
    for tile, y, invalid in inferer.tiles(plan, source):
        if y is not None:
            mask_output(y, invalid, plan.scale, fill)
            out[(slice(None), *tile.out)] = y
    return out


def _valid(img: SpatialImage) -> np.ndarray:
    ok = img.valid_mask()
    if img.data.dtype.kind in "fc":
        ok = ok & np.all(np.isfinite(img.data), axis=0)
    return ok


def enhance_guided(lr: SpatialImage, guide: SpatialImage, inferer: PatchInferer) -> SpatialImage:
    """Super-resolve ``lr`` with ``guide`` (on ``lr.geometry.scaled(scale)``): float32 target bands
    on the guide's grid, the valid mask (LR valid and guide block valid, nearest-upsampled),
    ``nodata`` (or NaN) over invalid pixels, ``storage_dtype`` kept, and a provenance step. A
    :class:`GuidedCardModel` first checks both images against its card."""
    model = inferer.model.net if isinstance(inferer.model, PackedGuided) else None
    if isinstance(model, GuidedCardModel):
        model.check(lr, guide)
    scale = inferer.scale_for(lr.spatial_dims)
    try:
        grid = lr.geometry.scaled(scale)
    except GeometryError as exc:
        raise ModelCardMismatch(f"LR grid cannot be refined by {scale}: {exc.message}",
                                lr.source or None) from exc
    if not grid.almost_equal(guide.geometry):
        raise ModelCardMismatch(f"guide grid {guide.spatial_shape} is not the LR grid {lr.spatial_shape} "
                                f"refined by {scale} (use nest_grids)", guide.source or lr.source or None)
    fill = float(lr.nodata) if lr.nodata is not None else float("nan")
    out = run_guided(inferer, lr.data, guide.data, lr_mask=lr.mask, guide_mask=guide.mask, fill=fill)
    g_ok = _valid(guide).reshape([v for n, s in zip(lr.spatial_shape, scale) for v in (n, s)])
    valid = _valid(lr) & g_ok.all(axis=tuple(range(1, 2 * len(scale), 2)))
    step = {"step": "enhance", **inferer.descriptor.history_fields(), "scale": list(scale),
            "guide_bands": list(guide.band_names), "guide_source": guide.source,
            "device": str(inferer.device), "amp": inferer.amp,
            "tiles": {"computed": inferer.stats.computed, "skipped": inferer.stats.skipped,
                      **inferer.stats.plan}}
    mask = None if valid.all() else upsample_nearest(valid, scale)
    new = lr.derive(out, geometry=grid, mask=mask, step=step)
    new.meta["storage_dtype"] = lr.meta.get("storage_dtype", str(lr.data.dtype))
    return new


# ---------------------------------------------------------------------------------------------
# two grids from a band set


def nest_grids(lr: SpatialImage, guide: SpatialImage, scale: Sequence[int], *, resample: bool = False
               ) -> tuple[SpatialImage, SpatialImage]:
    """Crop ``lr`` and ``guide`` (map rasters in one CRS, guide pixels ``scale`` times smaller) to
    their common extent so that ``guide.geometry == lr.geometry.scaled(scale)`` exactly (what
    ``read_sentinel2(align=True)`` does at read time). When the guide grid is offset by a fraction
    of a pixel (Landsat 8: the 15 m pan grid sits half a pan pixel off the 30 m grid), ``resample``
    moves the guide onto the refined LR grid with cubic interpolation; otherwise that is refused."""
    f = tuple(int(s) for s in scale)
    if lr.geometry.ndim == len(f) and lr.geometry.scaled(f).almost_equal(guide.geometry):
        return lr, guide
    L, G = lr.geometry, guide.geometry
    where = guide.source or lr.source or None
    if not (isinstance(L, GeoGeometry) and isinstance(G, GeoGeometry)) or L.is_rotated or G.is_rotated:
        raise GeometryError("guide and LR grids are not nested; only north-up map grids can be nested", where)
    if L.crs != G.crs:
        raise GeometryError(f"guide CRS {G.crs} differs from the LR bands' {L.crs}", where)
    if not all(math.isclose(a, b * s, rel_tol=1e-9) for a, b, s in zip(L.spacing, G.spacing, f)):
        raise GeometryError(f"guide pixels {G.spacing} are not the LR pixels {L.spacing} divided by {f}",
                            where)
    lb, gb = L.bounds, G.bounds
    left, bottom, right, top = max(lb[0], gb[0]), max(lb[1], gb[1]), min(lb[2], gb[2]), min(lb[3], gb[3])
    t, eps = L.transform, 1e-6
    c0, c1 = math.ceil((left - t.c) / t.a - eps), math.floor((right - t.c) / t.a + eps)
    r0, r1 = math.ceil((top - t.f) / t.e - eps), math.floor((bottom - t.f) / t.e + eps)
    if c1 <= c0 or r1 <= r0:
        raise GeometryError("the guide and the LR bands do not overlap", where)
    lr_c = _crop(lr, (r0, c0), (r1 - r0, c1 - c0))
    grid = lr_c.geometry.scaled(f)
    gt, ht = G.transform, grid.transform
    g0 = ((ht.f - gt.f) / gt.e, (ht.c - gt.c) / gt.a)  # (row, col) of the refined grid in the guide
    if all(abs(v - round(v)) < 1e-6 for v in g0):
        return lr_c, _crop(guide, tuple(round(v) for v in g0), grid.shape)
    if not resample:
        raise GeometryError(f"the guide grid is offset by {g0} pixels from the refined LR grid (not whole "
                            "pixels); pass resample=True to move the guide with cubic interpolation", where)
    return lr_c, _reproject(guide, grid)


def _crop(img: SpatialImage, start: Sequence[int], shape: Sequence[int]) -> SpatialImage:
    box = tuple(slice(a, a + n) for a, n in zip(start, shape))
    mask = None if img.mask is None else img.mask[box]
    return img.derive(img.data[(slice(None), *box)], geometry=img.geometry.cropped(start, shape), mask=mask)


def _reproject(img: SpatialImage, grid: GeoGeometry) -> SpatialImage:
    """``img`` resampled onto ``grid`` (cubic, rasterio/GDAL); pixels without full support are invalid."""
    from rasterio.warp import Resampling, reproject

    src = np.asarray(img.data, np.float32)
    valid = _valid(img)
    out = np.empty((img.channels, *grid.shape), np.float32)
    for c in range(img.channels):
        band = np.where(valid, src[c], np.nan).astype(np.float32)
        reproject(band, out[c], src_transform=img.geometry.transform, src_crs=img.geometry.crs,
                  dst_transform=grid.transform, dst_crs=grid.crs, src_nodata=np.nan, dst_nodata=np.nan,
                  resampling=Resampling.cubic)
    ok = np.all(np.isfinite(out), axis=0)
    fill = float(img.nodata) if img.nodata is not None else 0.0
    out[:, ~ok] = fill
    return img.derive(out, geometry=grid, mask=None if ok.all() else ok,
                      step={"step": "resample guide", "method": "cubic", "to": list(grid.transform)[:6]})


def guided_inputs(bands: MultiResolutionImage, target: Sequence[str], guide: Sequence[str],
                  scale: Sequence[int], *, resample: bool = False) -> tuple[SpatialImage, SpatialImage]:
    """The LR target bands and the guide bands of a band set, on nested grids (see :func:`nest_grids`)."""
    lr, g = bands.select(list(target)), bands.select(list(guide))
    for img in (lr, g):
        img.provenance.setdefault("source", bands.provenance.get("source", ""))
    return nest_grids(lr, g, scale, resample=resample)


def enhance_band_set(bands: MultiResolutionImage, model: str | GuidedCardModel, *, resample: bool = True,
                     **inferer_kwargs: Any) -> SpatialImage:
    """Super-resolve the card's target bands of a band set with its guide bands (a checkpoint name
    or path, or a loaded :class:`GuidedCardModel`); ``inferer_kwargs`` go to :func:`guided_inferer`.
    ``resample``: move a guide that sits a fraction of a pixel off the LR grid (as training does)."""
    if isinstance(model, str):
        model, _ = load_guided_checkpoint(model)
    target, guide = guided_bands(model.card)
    missing = [b for b in (*target, *guide) if b not in bands.band_names]
    if missing:
        raise ModelCardMismatch(f"model {model.card.name!r} needs bands {missing}, the band set has "
                                f"{list(bands.band_names)}", bands.provenance.get("source") or None)
    lr, g = guided_inputs(bands, target, guide, model.card.scale, resample=resample)
    return enhance_guided(lr, g, guided_inferer(model, **inferer_kwargs))


__all__ = ["GuidedSource", "enhance_band_set", "enhance_guided", "guided_inferer", "guided_inputs",
           "nest_grids", "run_guided"]
