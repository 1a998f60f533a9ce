"""Where tiles come from and what happens to their invalid pixels: the :class:`Source` protocol,
in-memory arrays, nearest-valid filling, nearest upsampling of masks, output masking, and the
padding that completes windows reaching past the image (reflect borders, size-rule extensions).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from domainsr.errors import ConfigError


class Source(Protocol):
    """Where tiles are read from: ``read(slices)`` returns float32 data ``(C, *window)`` and the
    invalid pixels ``(C, *window)`` (or ``None`` when all are valid)."""

    channels: int
    shape: tuple[int, ...]

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]: ...


class ArraySource:
    """Reads tiles from an in-memory ``(C, *spatial)`` array with an optional valid mask
    (``(*spatial)`` or ``(C, *spatial)``, ``True`` = valid)."""

    def __init__(self, array: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.array = array
        self.channels = int(array.shape[0])
        self.shape = tuple(int(s) for s in array.shape[1:])
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape not in (self.shape, array.shape):
                raise ConfigError(f"mask shape {mask.shape} fits neither {self.shape} nor {array.shape}")
        self.mask = mask

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.array(self.array[(slice(None), *slices)], dtype=np.float32)  # always a fresh copy
        invalid = None
        if self.mask is not None:
            m = self.mask[slices] if self.mask.ndim == len(self.shape) else self.mask[(slice(None), *slices)]
            if not m.all():
                invalid = np.broadcast_to(~m, x.shape).copy()
        if self.array.dtype.kind in "fc":
            bad = ~np.isfinite(x)
            if bad.any():
                invalid = bad if invalid is None else invalid | bad
        return x, invalid


def fill_invalid(x: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
    """Replace invalid pixels of each channel by the nearest valid pixel of that channel (in
    place); a channel without any valid pixel becomes 0. Channels that share an invalid pattern
    share one distance transform."""
    if invalid is None:
        return x
    from scipy.ndimage import distance_transform_edt

    cached_mask, cached_idx = None, None
    for c in range(x.shape[0]):
        inv = invalid[c]
        if not inv.any():
            continue
        if inv.all():
            x[c] = 0.0
            continue
        if cached_mask is None or not np.array_equal(inv, cached_mask):
            cached_idx = distance_transform_edt(inv, return_distances=False, return_indices=True)
            cached_mask = inv
        x[c][inv] = x[c][tuple(i[inv] for i in cached_idx)]
    return x


def upsample_nearest(a: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling of the trailing ``len(scale)`` axes by integer factors."""
    lead = a.ndim - len(scale)
    for ax, f in enumerate(scale):
        if f > 1:
            a = np.repeat(a, f, axis=lead + ax)
    return a


def mask_output(y: np.ndarray, invalid: np.ndarray | None, scale: Sequence[int], fill: float) -> None:
    """Set ``y`` (``(C_out, *hr)``) to ``fill`` where the LR ``invalid`` (``(C_in, *lr)``) is set:
    per channel when ``C_out == C_in``, else where any input channel is invalid."""
    if invalid is None or not invalid.any():
        return
    m = invalid if invalid.shape[0] == y.shape[0] else invalid.any(axis=0, keepdims=True)
    np.copyto(y, np.float32(fill), where=upsample_nearest(m, scale))


def pad_window(x: np.ndarray, pads: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pad the trailing ``len(pads)`` axes of ``x``: mirrored (reflect) as far as the axis allows,
    then by repeating the edge. This is numpy's ``reflect`` for pads shorter than the axis, and
    the padding spandrel applies to meet a network's size rules."""
    lead = [(0, 0)] * (x.ndim - len(pads))
    refl = [(min(a, n - 1), min(b, n - 1)) for (a, b), n in zip(pads, x.shape[len(lead):])]
    if any(a or b for a, b in refl):
        x = np.pad(x, lead + refl, mode="reflect")
    rest = [(a - ra, b - rb) for (a, b), (ra, rb) in zip(pads, refl)]
    if any(a or b for a, b in rest):
        x = np.pad(x, lead + rest, mode="edge")
    return x
