"""Tile plans: an N-D grid of equal-shaped input windows over a low-resolution (LR) grid.

Two ways to stitch tiles, chosen by the plan:

* **halo mode** (``overlap == 0`` and a known receptive radius ``halo``): the tiles' *cores* partition
  the image and each window reads at least ``halo`` LR pixels of context around its core; the
  model output is cropped to the core and pasted. For a model whose receptive radius is at most
  ``halo`` the result equals one whole-image forward pass (to float rounding), and no output
  pixel is computed twice except the halo itself.
* **blend mode** (``overlap > 0``): neighbouring tiles' valid *extents* (window minus halo) overlap
  by at least ``overlap`` LR pixels, and each tile is weighted by a separable window that is 1
  in its interior and ramps (cosine or Gaussian profile) over the overlap only. The per-axis
  weights form a partition of unity, so the accumulation needs no weight buffer; it is done as
  a running weighted mean (:meth:`TilePlan.running_alpha`), which keeps a constant image
  *exactly* constant.

Windows are shifted inward at the image border (``border="model"``: the model's own padding
acts there, exactly as in a whole-image pass) or reach ``halo`` pixels past it and are
reflect-padded (``border="reflect"``: border pixels see mirrored context). Every window of a plan
has the same shape, so tiles batch. By default windows are evenly spaced and as small as their
count allows; with ``align`` (halo mode) core boundaries fall on multiples of ``align`` LR pixels
instead, so a streaming writer receives whole output blocks.

Size rules (a network that needs windows of a ``multiple`` of k pixels, at least ``minimum``,
e.g. one that pixel-unshuffles its input): windows are multiples of k and start on multiples of
k, and the image is virtually extended at its far end to a multiple of k (reflect, then
replicate: the padding a whole-image pass of such a network applies), so tiled output equals a
whole-image pass also for networks that are equivariant only to shifts by k.

Coordinates: plans work in LR pixel indices; ``scale`` (integers per axis) maps LR regions to
the high-resolution (HR) output.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from domainsr.errors import ConfigError

Blend = Literal["cosine", "gaussian"]
Border = Literal["model", "reflect"]


def per_axis(value: float | Sequence[int | float] | None, ndim: int, name: str) -> tuple | None:
    """Broadcast a scalar or per-axis sequence to ``ndim`` values (``None`` stays ``None``)."""
    if value is None:
        return None
    vals = tuple(np.atleast_1d(np.asarray(value)).tolist())
    if len(vals) == 1:
        vals = vals * ndim
    if len(vals) != ndim:
        raise ConfigError(f"{name}={value!r} does not fit {ndim} spatial axes")
    return vals


def _ramp(n: int, blend: Blend) -> np.ndarray:
    """Rising weights over ``n`` pixels, in (0, 1); ``1 - ramp`` is the matching falling side."""
    t = (np.arange(n, dtype=np.float64) + 0.5) / n
    if blend == "cosine":
        return np.sin(0.5 * np.pi * t) ** 2
    if blend == "gaussian":  # smooth step = Gaussian CDF (sigma = 1/6 of the zone), rescaled to [0, 1]
        from scipy.special import ndtr

        lo, hi = ndtr(-3.0), ndtr(3.0)
        return (ndtr((t - 0.5) * 6.0) - lo) / (hi - lo)
    raise ConfigError(f"unknown blend window {blend!r}; expected 'cosine' or 'gaussian'")


@dataclass(frozen=True)
class AxisPlan:
    """Tiling of one axis. ``starts`` are window starts in image coordinates (negative or past the
    end only with reflect borders); ``lo``/``hi`` bound the region each tile writes (its core in
    halo mode, its extent in blend mode); ``weights[i]`` (blend mode) are the normalised weights
    over ``[lo[i], hi[i])`` and ``before[i]`` the summed weights of tiles ``< i`` there."""

    length: int
    window: int
    starts: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    weights: tuple[np.ndarray, ...] | None = None
    before: tuple[np.ndarray, ...] | None = None

    @property
    def count(self) -> int:
        return len(self.starts)


def _aligned_axis(length: int, window: int, halo: int, pad: int, align: int) -> AxisPlan | None:
    """Halo-mode cores of a multiple of ``align`` pixels starting at multiples of it (so each output
    block is written whole by one tile), windows of ``core + 2 * halo`` pushed inside the (padded)
    image at the ends. ``None`` when one window covers the axis."""
    virtual = length + 2 * pad
    core = align * max(1, round((window - 2 * halo) / align))
    w = core + 2 * halo
    if core >= length or w >= virtual:
        return None
    n = math.ceil(length / core)
    starts = tuple(min(max(i * core - halo, -pad), length + pad - w) for i in range(n))
    lo = tuple(i * core for i in range(n))
    hi = tuple(min((i + 1) * core, length) for i in range(n))
    return AxisPlan(length, w, starts, lo, hi)


def _ceil_to(n: int, k: int) -> int:
    return -(-n // k) * k


def _ruled_axis(length: int, window: int, halo: int, overlap: int, blend: Blend | None, multiple: int,
                minimum: int) -> AxisPlan:
    """Windows of a multiple of ``multiple`` (and at least ``minimum``) pixels starting on multiples
    of it, over the axis extended at its end to ``virtual`` (a multiple, at least ``minimum``);
    cores/extents stop at the real ``length``."""
    k = multiple
    virtual = _ceil_to(max(length, minimum, 1), k)
    h, o = _ceil_to(halo, k), _ceil_to(overlap, k)
    w = min(virtual, max(window // k * k, _ceil_to(minimum, k), 2 * h + o + k))
    if w == virtual:
        return _finish_axis(length, w, [0], h, blend)
    if blend is None:
        core = w - 2 * h
        n = math.ceil(virtual / core)
        keep = [i for i in range(n) if i * core < length]  # cores wholly in the extension write nothing
        starts = tuple(min(max(i * core - h, 0), virtual - w) for i in keep)
        lo = tuple(i * core for i in keep)
        hi = tuple(min((i + 1) * core, length) for i in keep)
        return AxisPlan(length, w, starts, lo, hi)
    step = w - 2 * h - o
    n = 1 + math.ceil((virtual - w) / max(1, step - k))  # room for rounding the starts down to k
    starts = sorted({i * (virtual - w) // (n - 1) // k * k for i in range(n)} | {virtual - w})
    starts = [st for i, st in enumerate(starts) if i == 0 or st + h < length]  # extents inside the image
    return _finish_axis(length, w, starts, h, blend)


def plan_axis(length: int, window: int, halo: int, overlap: int = 0, pad: int = 0,
              blend: Blend | None = None, align: int = 1, multiple: int = 1, minimum: int = 0) -> AxisPlan:
    """Evenly spaced, equal windows of at most ``window`` pixels over ``length`` (+ ``pad`` virtual
    pixels each side): the fewest that keep ``halo`` context and ``overlap`` blending between
    neighbours, each as small as that count allows (no compute on needless overlap).
    ``blend=None`` gives halo mode (cores), otherwise blend weights with that profile.
    ``align > 1`` (halo mode only) puts core boundaries on multiples of ``align`` instead, with
    cores of about ``window - 2 * halo`` (for block-aligned streaming writes). ``multiple``/``minimum``:
    the network's size rules (see the module docstring); they take precedence over ``align``."""
    if (length < 1 or window < 1 or halo < 0 or overlap < 0 or not 0 <= pad <= halo or align < 1
            or multiple < 1 or minimum < 0):
        raise ConfigError(f"bad axis plan: length={length}, window={window}, halo={halo}, "
                          f"overlap={overlap}, pad={pad}, align={align}, multiple={multiple}, minimum={minimum}")
    if multiple > 1 or minimum > min(window, length):
        if pad:
            raise ConfigError("reflect borders cannot be combined with a network's size rules")
        return _ruled_axis(length, window, halo, overlap, blend, multiple, minimum)
    virtual = length + 2 * pad
    if align > 1 and blend is None and (aligned := _aligned_axis(length, window, halo, pad, align)):
        return aligned
    window = min(window, virtual)
    if window == virtual:
        starts = [-pad]
    else:
        step = window - 2 * halo - overlap
        if step < 1:
            raise ConfigError(f"tile of {window} px leaves no core with a halo of {halo} px and an "
                              f"overlap of {overlap} px; use a larger tile")
        n = 1 + math.ceil((virtual - window) / step)
        # the fewest windows no larger than `window`, then the smallest window that still covers
        window = math.ceil((virtual + (n - 1) * (2 * halo + overlap)) / n)
        starts = [i * (virtual - window) // (n - 1) - pad for i in range(n)]
    return _finish_axis(length, window, starts, halo, blend)


def _finish_axis(length: int, window: int, starts: Sequence[int], halo: int, blend: Blend | None) -> AxisPlan:
    """Cores (halo mode) or extents and blend weights (blend mode) of windows at ``starts``."""
    n = len(starts)
    ext_lo = [0 if i == 0 else s + halo for i, s in enumerate(starts)]
    ext_hi = [length if i == n - 1 else min(length, s + window - halo) for i, s in enumerate(starts)]
    if blend is None:  # halo mode: cores split each shared stretch in the middle
        cuts = [0] + [(ext_lo[i + 1] + ext_hi[i]) // 2 for i in range(n - 1)] + [length]
        return AxisPlan(length, window, tuple(starts), tuple(cuts[:-1]), tuple(cuts[1:]))
    raw = []
    for i in range(n):
        w = np.ones(ext_hi[i] - ext_lo[i])
        if i > 0:  # rise over the stretch shared with the previous tile
            z = ext_hi[i - 1] - ext_lo[i]
            w[:z] *= _ramp(z, blend)
        if i < n - 1:  # fall over the stretch shared with the next tile
            z = ext_hi[i] - ext_lo[i + 1]
            w[len(w) - z:] *= 1.0 - _ramp(z, blend)
        raw.append(w)
    total = np.zeros(length)
    for i in range(n):
        total[ext_lo[i]:ext_hi[i]] += raw[i]
    weights, before, running = [], [], np.zeros(length)
    for i in range(n):
        sl = slice(ext_lo[i], ext_hi[i])
        w = raw[i] / total[sl]
        weights.append(w)
        before.append(running[sl].copy())
        running[sl] += w
    return AxisPlan(length, window, tuple(starts), tuple(ext_lo), tuple(ext_hi), tuple(weights),
                    tuple(before))


@dataclass(frozen=True)
class Tile:
    """One tile. ``src`` is the part of the window inside the image and ``pad`` the reflect
    padding (before, after) that completes it; ``region`` is the LR region the tile writes,
    ``out`` the same region on the HR grid and ``crop`` where it sits in the model output."""

    index: tuple[int, ...]
    src: tuple[slice, ...]
    pad: tuple[tuple[int, int], ...]
    region: tuple[slice, ...]
    out: tuple[slice, ...]
    crop: tuple[slice, ...]


@dataclass(frozen=True)
class TilePlan:
    """Tiles over an LR grid of ``shape`` for a model upsampling by integer ``scale`` per axis."""

    shape: tuple[int, ...]
    scale: tuple[int, ...]
    window: tuple[int, ...]
    halo: tuple[int, ...]
    overlap: tuple[int, ...]
    border: Border
    blend: Blend
    axes: tuple[AxisPlan, ...]

    @classmethod
    def build(cls, shape: Sequence[int], *, scale: int | Sequence[int], window: int | Sequence[int],
              halo: int | Sequence[int] = 0, overlap: int | Sequence[int] = 0,
              border: Border = "model", blend: Blend = "cosine",
              align: int | Sequence[int] = 1, multiple: int | Sequence[int] = 1,
              minimum: int | Sequence[int] = 0) -> TilePlan:
        """``align``: LR multiple for core boundaries in halo mode; ``multiple``/``minimum``: the
        network's size rules per axis (see :func:`plan_axis`)."""
        shape = tuple(int(s) for s in shape)
        nd = len(shape)
        scale_t = per_axis(scale, nd, "scale")
        if any(float(f) != int(f) or f < 1 for f in scale_t):
            raise ConfigError(f"tiling needs whole scale factors >= 1, got {scale_t}")
        scale_t = tuple(int(f) for f in scale_t)
        window_t = tuple(int(v) for v in per_axis(window, nd, "tile"))
        halo_t = tuple(int(v) for v in per_axis(halo, nd, "halo"))
        overlap_t = tuple(int(v) for v in per_axis(overlap, nd, "overlap"))
        align_t = tuple(int(v) for v in per_axis(align, nd, "align"))
        mult_t = tuple(int(v) for v in per_axis(multiple, nd, "multiple"))
        min_t = tuple(int(v) for v in per_axis(minimum, nd, "minimum"))
        if border not in ("model", "reflect"):
            raise ConfigError(f"unknown border mode {border!r}; expected 'model' or 'reflect'")
        if blend not in ("cosine", "gaussian"):
            raise ConfigError(f"unknown blend window {blend!r}; expected 'cosine' or 'gaussian'")
        # size rules: the halo (and overlap) the axes use are whole multiples
        halo_t = tuple(-(-h // k) * k for h, k in zip(halo_t, mult_t))
        overlap_t = tuple(-(-o // k) * k for o, k in zip(overlap_t, mult_t))
        blended = any(overlap_t)
        axes = []
        for n, w, h, o, a, k, m in zip(shape, window_t, halo_t, overlap_t, align_t, mult_t, min_t):
            pad = min(h, n - 1) if border == "reflect" else 0
            axes.append(plan_axis(n, w, h, o, pad, blend if blended else None, a, k, m))
        return cls(shape, scale_t, tuple(a.window for a in axes), halo_t, overlap_t, border, blend,
                   tuple(axes))

    @property
    def blended(self) -> bool:
        return self.axes[0].weights is not None

    @property
    def grid(self) -> tuple[int, ...]:
        return tuple(a.count for a in self.axes)

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(n * f for n, f in zip(self.shape, self.scale))

    @property
    def out_window(self) -> tuple[int, ...]:
        return tuple(w * f for w, f in zip(self.window, self.scale))

    def __len__(self) -> int:
        return math.prod(self.grid)

    def __iter__(self) -> Iterator[Tile]:
        """Tiles in C (row-major) order, the order :meth:`running_alpha` assumes."""
        for idx in itertools.product(*(range(a.count) for a in self.axes)):
            yield self.tile(idx)

    def tile(self, idx: Sequence[int]) -> Tile:
        src, pad, region, out, crop = [], [], [], [], []
        for a, i, f in zip(self.axes, idx, self.scale):
            s = a.starts[i]
            e = s + a.window
            src.append(slice(max(s, 0), min(e, a.length)))
            pad.append((max(0, -s), max(0, e - a.length)))
            region.append(slice(a.lo[i], a.hi[i]))
            out.append(slice(a.lo[i] * f, a.hi[i] * f))
            crop.append(slice((a.lo[i] - s) * f, (a.hi[i] - s) * f))
        return Tile(tuple(idx), tuple(src), tuple(pad), tuple(region), tuple(out), tuple(crop))

    def _axis_hr(self, arrays: Sequence[np.ndarray], axis: int) -> np.ndarray:
        v = np.repeat(arrays, self.scale[axis]) if self.scale[axis] > 1 else np.asarray(arrays)
        shape = [1] * len(self.shape)
        shape[axis] = v.size
        return v.reshape(shape)

    def weight(self, tile: Tile) -> np.ndarray:
        """Normalised HR weights of ``tile`` over ``tile.out`` (blend mode); all tiles sum to 1."""
        w = np.ones((1,) * len(self.shape))
        for ax, (a, i) in enumerate(zip(self.axes, tile.index)):
            w = w * self._axis_hr(a.weights[i], ax)
        return w

    def running_alpha(self, tile: Tile) -> np.ndarray:
        """Blend factor of ``tile`` when tiles are merged in iteration order as
        ``acc += alpha * (y - acc)``: ``alpha = w_k / sum(w_j, j <= k)``, computed from the
        separable weights without an output-sized weight buffer. It is exactly 1 where the tile
        is the first to write, so the first write copies and a constant stays exactly constant.
        """
        nd = len(self.shape)
        w_prod: np.ndarray = np.ones((1,) * nd)
        s_acc: np.ndarray = np.ones((1,) * nd)
        for ax in range(nd - 1, -1, -1):  # S = P0 + w0 (P1 + w1 (... (P_last + w_last)))
            a, i = self.axes[ax], tile.index[ax]
            w = self._axis_hr(a.weights[i], ax)
            p = self._axis_hr(a.before[i], ax)
            if ax == nd - 1:
                w_prod, s_acc = w, p + w
            else:
                w_prod, s_acc = w * w_prod, p + w * s_acc
        with np.errstate(invalid="ignore", divide="ignore"):
            alpha = np.where(s_acc > 0, w_prod / s_acc, 0.0)
        return alpha.astype(np.float32)

    def redundancy(self) -> float:
        """Model input pixels per LR pixel (1.0 = no recomputation)."""
        return float(len(self) * math.prod(self.window) / math.prod(self.shape))
