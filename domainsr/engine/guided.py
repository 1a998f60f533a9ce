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
from dataclasses import dataclass
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


# ---------------------------------------------------------------------------------------------
# guides at several resolutions (Sentinel-2 60 m bands guided by the 10 m and the 20 m bands)


def _keys_weights(f: int) -> tuple[np.ndarray, np.ndarray]:
    """Tap offsets ``(f, 4)`` and weights ``(f, 4)`` of an exact integer-factor cubic upsampling
    (Keys, a = -0.5, GDAL's ``cubic``): fine pixel ``p`` of coarse pixel ``i`` sits at coarse
    coordinate ``i + (p + 0.5) / f - 0.5`` (pixel centres, the grids nest)."""
    x = (np.arange(f) + 0.5) / f - 0.5
    base = np.floor(x).astype(int)
    taps = base[:, None] + np.arange(-1, 3)[None]
    d = np.abs(x[:, None] - taps)
    a = -0.5
    w = np.where(d <= 1, (a + 2) * d**3 - (a + 3) * d**2 + 1,
                 np.where(d < 2, a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a, 0.0))
    return taps, w / w.sum(axis=1, keepdims=True)


def cubic_upsample(a: np.ndarray, factor: Sequence[int]) -> np.ndarray:
    """``a`` ``(C, *sp)`` on the grid ``factor`` times finer that nests in it, ``(C, *sp * factor)``
    float32: separable cubic (Keys a = -0.5, as GDAL's cubic), edges replicated."""
    out = np.asarray(a, np.float64)
    for ax, f in enumerate(int(v) for v in factor):
        if f == 1:
            continue
        axis = ax + 1
        n = out.shape[axis]
        taps, w = _keys_weights(f)
        pad = [(0, 0)] * out.ndim
        pad[axis] = (2, 2)
        padded = np.pad(out, pad, mode="edge")
        phases = []
        for p in range(f):
            acc = 0.0
            for t in range(4):
                acc = acc + w[p, t] * np.take(padded, np.arange(n) + taps[p, t] + 2, axis=axis)
            phases.append(acc)
        st = np.stack(phases, axis=axis + 1)  # (..., n, f, ...)
        out = st.reshape(*out.shape[:axis], n * f, *out.shape[axis + 1:])
    return out.astype(np.float32)


def stack_guides(groups: Sequence[np.ndarray], factors: Sequence[Sequence[int]], positions: Sequence[Sequence[int]],
                 scale: Sequence[int]) -> np.ndarray:
    """All guide bands on the finest guide grid, in guide-list order: group ``k`` (on the target
    grid refined by ``factors[k]``; the finest is refined by ``scale``) is upsampled by
    ``scale / factors[k]`` with :func:`cubic_upsample`, and its channels go to ``positions[k]``.

    The one function that builds what a guided model sees: at inference from the band set
    (:func:`guided_inputs`) and in training from each group degraded by the scale with its own PSF
    (:mod:`domainsr.train.guided`), so both put the coarser guides on the finest grid alike."""
    s = tuple(int(v) for v in scale)
    n = sum(len(p) for p in positions)
    if sorted(i for p in positions for i in p) != list(range(n)) or len(groups) != len(positions):
        raise ConfigError(f"guide group positions {list(map(list, positions))} do not cover {n} guide bands once")
    out: np.ndarray | None = None
    for g, f, pos in zip(groups, factors, positions):
        ratio = []
        for a, b in zip(s, f):
            if int(b) <= 0 or a % int(b):
                raise GeometryError(f"guide group on the target grid refined by {tuple(f)} does not nest in the "
                                    f"finest guide grid (target refined by {s})")
            ratio.append(a // int(b))
        up = cubic_upsample(g, ratio) if any(r > 1 for r in ratio) else np.asarray(g, np.float32)
        if out is None:
            out = np.empty((n, *up.shape[1:]), np.float32)
        if up.shape[1:] != out.shape[1:] or up.shape[0] != len(pos):
            raise GeometryError(f"guide group of shape {tuple(g.shape)} refined by {ratio} is {tuple(up.shape)}, "
                                f"not {len(pos)} bands on {tuple(out.shape[1:])}")
        out[list(pos)] = up
    assert out is not None
    return out


@dataclass
class GuideGroups:
    """The LR target bands and the guide bands of a band set grouped by native resolution, every
    group nested with ``lr`` (group ``k`` on ``lr.geometry.scaled(factors[k])``, its bands at
    ``positions[k]`` of the guide list), and ``guide``: all of them on the finest guide grid
    (:func:`stack_guides`), ``lr.geometry.scaled(scale)``."""

    lr: SpatialImage
    guide: SpatialImage
    groups: list[SpatialImage]
    factors: list[tuple[int, ...]]
    positions: list[list[int]]


def _factor(lr: SpatialImage, g: SpatialImage) -> tuple[int, ...]:
    out = []
    for a, b in zip(lr.geometry.spacing, g.geometry.spacing):
        f = round(a / b)
        if f < 1 or not math.isclose(a, f * b, rel_tol=1e-9):
            raise GeometryError(f"guide pixels {g.geometry.spacing} do not divide the target pixels "
                                f"{lr.geometry.spacing}", g.source or lr.source or None)
        out.append(f)
    return tuple(out)


def _on_finest(groups: Sequence[SpatialImage], factors: Sequence[tuple[int, ...]],
               positions: Sequence[Sequence[int]], scale: tuple[int, ...], names: Sequence[str]) -> SpatialImage:
    from scipy import ndimage

    k = [tuple(f) for f in factors].index(scale)
    finest = groups[k]
    data = stack_guides([g.data for g in groups], factors, positions, scale)
    ok = _valid(finest)
    for g, f in zip(groups, factors):
        ratio = [a // b for a, b in zip(scale, f)]
        if all(r == 1 for r in ratio):
            continue
        bad = ~_valid(g)
        if g.nodata is not None and not np.isnan(g.nodata):
            bad |= np.all(np.asarray(g.data) == g.nodata, axis=0)
        if bad.any():  # a fine pixel is valid when its whole cubic support (2 coarse px each side) is
            bad = ndimage.binary_dilation(bad, np.ones((5,) * bad.ndim, bool))
            ok = ok & ~upsample_nearest(bad, ratio)
    fill = float(finest.nodata) if finest.nodata is not None else 0.0
    data[:, ~ok] = fill
    step = {"step": "guides on the finest grid", "method": "cubic (Keys a=-0.5), exact integer factor",
            "groups": [{"bands": list(g.band_names), "upsampled_by": [a // b for a, b in zip(scale, f)]}
                       for g, f in zip(groups, factors)]}
    return finest.derive(data, mask=None if ok.all() else ok, step=step, band_names=tuple(names))


def guide_groups(bands: MultiResolutionImage, target: Sequence[str], guide: Sequence[str],
                 scale: Sequence[int], *, resample: bool = False) -> GuideGroups:
    """Target and guide bands of a band set on nested grids, the guides grouped by resolution
    (see :class:`GuideGroups`). Guides of one resolution are :func:`nest_grids` as ever; with
    several, the target grid is cropped to the extent every group covers, each group is nested in
    it, and the coarser ones are put on the finest guide grid (``scale`` finer than the target
    grid) with :func:`stack_guides`."""
    s = tuple(int(v) for v in scale)
    src = bands.provenance.get("source", "")
    lr = bands.select(list(target))
    lr.provenance.setdefault("source", src)
    order: dict[str, list[int]] = {}
    for i, b in enumerate(guide):
        order.setdefault(bands.group_of(b), []).append(i)
    positions = list(order.values())
    raw = [bands.select([guide[i] for i in pos]) for pos in positions]
    for g in raw:
        g.provenance.setdefault("source", src)
    if len(raw) == 1:
        lr, g = nest_grids(lr, raw[0], s, resample=resample)
        return GuideGroups(lr, g, [g], [s], positions)
    factors = [_factor(lr, g) for g in raw]
    if s not in factors:
        raise GeometryError(f"no guide group is on the target grid refined by the scale {s} (groups refine it by "
                            f"{factors})", src or None)
    for g, f in zip(raw, factors):
        lr, _ = nest_grids(lr, g, f, resample=resample)
    nested = []
    for g, f in zip(raw, factors):
        lr2, g2 = nest_grids(lr, g, f, resample=resample)
        if lr2.spatial_shape != lr.spatial_shape:
            raise GeometryError("guide groups do not share a nested extent with the target bands", src or None)
        nested.append(g2)
    names = [""] * len(guide)
    for g, pos in zip(nested, positions):
        for i, b in zip(pos, g.band_names):
            names[i] = b
    return GuideGroups(lr, _on_finest(nested, factors, positions, s, names), nested, factors, positions)


def guided_inputs(bands: MultiResolutionImage, target: Sequence[str], guide: Sequence[str],
                  scale: Sequence[int], *, resample: bool = False) -> tuple[SpatialImage, SpatialImage]:
    """The LR target bands and the guide bands of a band set, on nested grids (see :func:`nest_grids`);
    guides of several resolutions are first put on the finest guide grid (:func:`guide_groups`)."""
    gg = guide_groups(bands, target, guide, scale, resample=resample)
    return gg.lr, gg.guide


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


__all__ = ["GuideGroups", "GuidedSource", "cubic_upsample", "enhance_band_set", "enhance_guided", "guide_groups",
           "guided_inferer", "guided_inputs", "nest_grids", "run_guided", "stack_guides"]
