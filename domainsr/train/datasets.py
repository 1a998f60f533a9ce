"""Training pairs made on the fly from one high-resolution image and a degradation.

* :func:`split_regions` cuts the image along one axis into disjoint train / val / test regions
  with a gap between train and each held-out region, so validation and test pixels are never
  seen in training, not even as context of a training patch.
* :class:`PatchDataset` draws random HR patches (plus a margin of context) inside the train
  region, skips mostly-background ones, augments them with flips and 90-degree rotations where
  the geometry allows, degrades them to LR and crops the margin off: item ``i`` is a pure function
  of ``(seed, i)``, so a run (and a resumed run) sees the same batches.
* With ``planes`` set (2.5D, SMORE-style) patches are 2D planes of a volume (or a 2D image in
  both orientations), so a 2D network learns one axis' upsampling from in-plane data.
* :func:`eval_pairs` degrades whole val/test regions once, with a fixed seed.
"""
from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from domainsr.errors import ConfigError
from domainsr.models.checkpoints import InputNormalization

Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
NormFn = Callable[[np.ndarray, np.ndarray], InputNormalization]
REGIONS = ("train", "val", "test")


@dataclass(frozen=True)
class Region:
    """``[start, stop)`` along ``axis`` of the source's spatial axes (all of every other axis)."""

    name: str
    axis: int
    start: int
    stop: int

    @property
    def size(self) -> int:
        return self.stop - self.start

    def slices(self, spatial_shape: Sequence[int]) -> tuple[slice, ...]:
        return tuple(slice(self.start, self.stop) if a == self.axis else slice(0, n)
                     for a, n in enumerate(spatial_shape))

    def describe(self) -> dict:
        return {"axis": self.axis, "start": self.start, "stop": self.stop}


def split_regions(size: int, *, axis: int, fractions: dict[str, float], order: Sequence[str],
                  gap: int, min_sizes: dict[str, int] | None = None, source: str = "") -> dict[str, Region]:
    """Cut ``[0, size)`` at the cumulative ``fractions`` (in ``order``) and leave ``gap`` pixels
    between the train region and each held-out neighbour, taken out of the train region: held-out
    regions keep their nominal extent (figures are quoted on them). Val and test may touch; both
    are unseen by training."""
    bounds, acc = {}, 0.0
    for name in order:
        a = round(acc * size)
        acc += fractions[name]
        bounds[name] = [a, round(acc * size)]
    for left, right in itertools.pairwise(order):
        if left == "train":
            bounds[left][1] = min(bounds[left][1], bounds[right][0] - gap)
        elif right == "train":
            bounds[right][0] = max(bounds[right][0], bounds[left][1] + gap)
    regions = {n: Region(n, axis, a, b) for n, (a, b) in bounds.items()}
    for name, need in (min_sizes or {}).items():
        if regions[name].size < need:
            raise ConfigError(
                f"the {name} region along axis {axis} is {regions[name].size} px after {gap} px gaps; "
                f"it needs at least {need} (image size {size}): change the split fractions, the axis "
                "or the patch size", source or None)
    return regions


def _box_sums(mask: np.ndarray, offset: Sequence[int], ext: Sequence[int], full: Sequence[int]) -> np.ndarray:
    """For every start where a ``full`` box fits in ``mask``: the count of True in the ``ext``
    box at ``start + offset`` (an N-D summed-area table; exact integer arithmetic)."""
    sat = np.zeros(tuple(n + 1 for n in mask.shape), dtype=np.int64)
    sat[tuple(slice(1, None) for _ in mask.shape)] = mask
    for a in range(mask.ndim):
        np.cumsum(sat, axis=a, out=sat)
    n_starts = [m - f + 1 for m, f in zip(mask.shape, full)]
    if min(n_starts) < 1:
        return np.zeros([max(n, 0) for n in n_starts])
    out = np.zeros(n_starts, dtype=np.int64)
    for corner in itertools.product((0, 1), repeat=mask.ndim):
        idx = tuple(slice(o + (e if c else 0), o + (e if c else 0) + n)
                    for o, e, c, n in zip(offset, ext, corner, n_starts))
        sign = (-1) ** (mask.ndim - sum(corner))
        out += sign * sat[idx]
    return out


def augment_axes(scale: Sequence[int], extent: Sequence[int]) -> list[tuple[int, int]]:
    """Axis pairs a 90-degree rotation may swap: same scale factor and same patch extent, so a
    scaled axis is never rotated into an unscaled one."""
    return [(i, j) for i, j in itertools.combinations(range(len(scale)), 2)
            if scale[i] == scale[j] and extent[i] == extent[j]]


class PatchDataset(torch.utils.data.Dataset):
    """Random (LR, HR) patch pairs from the train region of ``data`` (``(C, *spatial)``, float32).

    ``patch`` and ``scale`` are per network axis. In direct mode the network axes are the source's
    spatial axes; with ``planes`` each item is a 2D plane spanned by source axes ``(a, b)`` (a pair
    is picked at random), cropped from the region with every other axis of extent 1.
    Pairs come back normalised with ``norm`` as float32 tensors ``(C, *patch // scale)`` and
    ``(C, *patch)``.
    """

    def __init__(self, data: np.ndarray, region: Region, *, scale: Sequence[int], patch: Sequence[int],
                 degradation: Degradation, norm: InputNormalization, foreground: np.ndarray | None = None,
                 min_foreground: float = 0.5, planes: Sequence[tuple[int, int]] | None = None,
                 margin: int = 4, augment: bool = True, seed: int = 0, length: int = 2**62,
                 source: str = "") -> None:
        self.data = data
        self.region = region
        self.scale = tuple(int(s) for s in scale)
        self.patch = tuple(int(p) for p in patch)
        self.degradation = degradation
        self.norm = norm
        self.margin = int(margin)
        self.augment = augment
        self.seed = int(seed)
        self.length = int(length)
        spatial = data.shape[1:]
        nd = len(spatial)
        self.full = tuple(p + 2 * self.margin * s for p, s in zip(self.patch, self.scale))
        self.orientations = list(planes) if planes else [tuple(range(nd))]
        if planes is None and len(self.patch) != nd:
            raise ConfigError(f"a {len(self.patch)}D patch needs planes (2.5D) on a {nd}D source", source or None)
        box = region.slices(spatial)
        fg = np.ones(spatial, bool) if foreground is None else foreground
        fg = fg[box]
        self._starts: list[tuple[np.ndarray, tuple[int, ...]]] = []
        for axes in self.orientations:
            full, core, off = [1] * nd, [1] * nd, [0] * nd
            for i, a in enumerate(axes):
                full[a], core[a], off[a] = self.full[i], self.patch[i], self.margin * self.scale[i]
            sums = _box_sums(fg, off, core, full)
            ok = np.flatnonzero(sums >= math.ceil(min_foreground * math.prod(core) - 1e-9))
            if ok.size == 0:
                raise ConfigError(
                    f"no {self.patch} patch (+{self.margin} LR px margin) in the train region "
                    f"{region.describe()} has {min_foreground:.0%} foreground; lower data.min_foreground "
                    "or the patch size", source or None)
            self._starts.append((ok, sums.shape))
        self.rot_axes = augment_axes(self.scale, self.patch)

    def __len__(self) -> int:
        return self.length

    def draw_box(self, rng: np.random.Generator) -> tuple[tuple[int, ...], tuple[slice, ...]]:
        """An orientation (network axes as source axes) and the source index box (margin included)
        of one patch, drawn from ``rng`` among the starts with enough foreground."""
        k = int(rng.integers(len(self.orientations)))
        axes = self.orientations[k]
        ok, shape = self._starts[k]
        start = np.unravel_index(int(ok[rng.integers(ok.size)]), shape)
        nd = self.data.ndim - 1
        ext = [1] * nd
        for i, a in enumerate(axes):
            ext[a] = self.full[i]
        base = [self.region.start if a == self.region.axis else 0 for a in range(nd)]
        return axes, tuple(slice(b + s, b + s + e) for b, s, e in zip(base, start, ext))

    def sample_box(self, index: int) -> tuple[slice, ...]:
        """Source index box (margin included) that item ``index`` reads: for leakage checks."""
        return self.draw_box(np.random.default_rng((self.seed, int(index))))[1]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(index)))
        axes, box = self.draw_box(rng)
        hr = self.data[(slice(None), *box)]
        # keep the network axes (in the order ``axes``), drop the extent-1 ones
        others = [a for a in range(hr.ndim - 1) if a not in axes]
        hr = np.transpose(hr, (0, *[a + 1 for a in axes], *[a + 1 for a in others]))
        hr = hr.reshape(hr.shape[: 1 + len(axes)])
        if self.augment:
            (hr,) = self.flip_rotate(rng, hr)
        hr = np.ascontiguousarray(hr, dtype=np.float32)
        lr = np.asarray(self.degradation(hr, rng), dtype=np.float32)
        if lr.shape[1:] != self.lr_extent:
            raise ConfigError(f"degradation returned LR shape {lr.shape[1:]} for HR {hr.shape[1:]}, "
                              f"expected {self.lr_extent} at scale {self.scale}")
        lr, (hr,) = self.crop_margin(lr, hr)
        return (torch.from_numpy(normalize(lr, self.norm)), torch.from_numpy(normalize(hr, self.norm)))

    @property
    def lr_extent(self) -> tuple[int, ...]:
        """LR extent of a patch with its margin (``full // scale``)."""
        return tuple(f // s for f, s in zip(self.full, self.scale))

    def flip_rotate(self, rng: np.random.Generator, *arrays: np.ndarray) -> list[np.ndarray]:
        """``(C, *spatial)`` arrays flipped alike along each axis with probability 1/2, then
        rotated alike by a random multiple of 90 degrees in each :func:`augment_axes` plane."""
        out = list(arrays)
        for a in range(out[0].ndim - 1):
            if rng.random() < 0.5:
                out = [np.flip(x, axis=a + 1) for x in out]
        for i, j in self.rot_axes:
            k = int(rng.integers(4))
            out = [np.rot90(x, k=k, axes=(i + 1, j + 1)) for x in out]
        return out

    def crop_margin(self, lr: np.ndarray, *hr: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Drop the degradation margin: ``margin`` px of ``lr`` and ``margin * scale`` px of each
        HR-grid array."""
        m = self.margin
        if not m:
            return lr, list(hr)
        core = (slice(None), *[slice(m * s, n - m * s) for n, s in zip(self.full, self.scale)])
        return lr[(slice(None), *[slice(m, n - m) for n in self.lr_extent])], [x[core] for x in hr]


class MixedPatchDataset(torch.utils.data.Dataset):
    """Patches of several sources (multi-scene / multi-subject training): item ``i`` comes from
    part ``k`` with probability ``weights[k] / sum(weights)``, drawn from ``(seed, i)`` as the
    parts draw theirs, so a run (and a resumed run) still sees the same batches."""

    def __init__(self, parts: Sequence[PatchDataset], weights: Sequence[float], seed: int = 0) -> None:
        if not parts or len(parts) != len(weights) or min(weights) <= 0:
            raise ConfigError("a mixed patch dataset needs one positive weight per part")
        self.parts = list(parts)
        w = np.asarray(weights, np.float64)
        self.cumulative = np.cumsum(w / w.sum())
        self.seed = int(seed)
        self.length = min(p.length for p in self.parts)

    def __len__(self) -> int:
        return self.length

    def part_of(self, index: int) -> int:
        """Which part item ``index`` is drawn from."""
        u = np.random.default_rng((self.seed, int(index), 0x313)).random()
        return min(int(np.searchsorted(self.cumulative, u, side="right")), len(self.parts) - 1)

    def sample_box(self, index: int) -> tuple[int, tuple[slice, ...]]:
        """``(part, source index box)`` item ``index`` reads: for leakage checks."""
        k = self.part_of(index)
        return k, self.parts[k].sample_box(index)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.parts[self.part_of(index)][index]


def normalize(x: np.ndarray, norm: InputNormalization) -> np.ndarray:
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - norm.offset.reshape(shape)) / norm.scale.reshape(shape)).astype(np.float32)


def denormalize(x: np.ndarray, norm: InputNormalization) -> np.ndarray:
    shape = (-1,) + (1,) * (x.ndim - 1)
    return (x * norm.scale.reshape(shape) + norm.offset.reshape(shape)).astype(np.float32)


@dataclass
class EvalPair:
    """A held-out HR array, its degraded LR, the valid mask over HR and the normalisation."""

    hr: np.ndarray
    lr: np.ndarray
    valid: np.ndarray
    norm: InputNormalization


def eval_pairs(data: np.ndarray, region: Region, *, scale: Sequence[int], degradation: Degradation,
               norm: InputNormalization, valid: np.ndarray | None = None, foreground: np.ndarray | None = None,
               planes: Sequence[tuple[int, int]] | None = None, max_planes: int = 48,
               min_foreground: float = 0.5, seed: int = 0) -> list[EvalPair]:
    """Degrade the whole region once (deterministic ``seed``): one pair in direct mode, or up to
    ``max_planes`` evenly spaced 2D planes (with enough foreground) over the orientations."""
    spatial = data.shape[1:]
    box = region.slices(spatial)
    sub = data[(slice(None), *box)]
    ok = (np.ones(spatial, bool) if valid is None else valid)[box]
    fg = (ok if foreground is None else foreground[box])
    rng = np.random.default_rng((seed, 0x5EED))
    views: list[tuple[np.ndarray, np.ndarray]] = []
    if not planes:
        views.append((sub, ok))
    else:
        per = max(1, max_planes // len(planes))
        for axes in planes:
            others = [a for a in range(sub.ndim - 1) if a not in axes]
            order = (*axes, *others)
            s = np.transpose(sub, (0, *[a + 1 for a in order]))
            o, f = np.transpose(ok, order), np.transpose(fg, order)
            n2 = math.prod(s.shape[1:3])
            s = s.reshape(s.shape[0], *s.shape[1:3], -1)
            o, f = o.reshape(*o.shape[:2], -1), f.reshape(*f.shape[:2], -1)
            frac = f.sum(axis=(0, 1)) / n2
            cand = np.flatnonzero(frac >= min_foreground / 2)
            if cand.size == 0:
                cand = np.flatnonzero(frac > 0)
            pick = cand[np.unique(np.linspace(0, cand.size - 1, min(per, cand.size)).round().astype(int))]
            views += [(s[..., p], o[..., p]) for p in pick]
    pairs = []
    for hr, v in views:
        crop = tuple(slice(0, (n // sc) * sc) for n, sc in zip(hr.shape[1:], scale))
        hr = np.ascontiguousarray(hr[(slice(None), *crop)], dtype=np.float32)
        lr = np.asarray(degradation(hr, rng), dtype=np.float32)
        pairs.append(EvalPair(hr, lr, np.ascontiguousarray(v[crop]), norm))
    return pairs
