"""Consistency of an SR output with its LR input: the local LR range, the "invented extremes"
measure (issue 16), and the optional data-consistency stage of the engine.

The local LR range of an output pixel is the min/max of the 3x3 (3x3x3) LR neighbourhood of its
parent LR pixel, per band, upsampled to the SR grid by nearest. One definition serves the measure
and the stage's clamp, so the clamp bounds exactly what the measure counts.

The stage (:class:`DataConsistency`, per card: ``ModelCard.consistency``) back-projects the
network's output onto the outputs whose re-degradation through the card's noise-free operator
``D`` matches the LR input, ``x <- x + step * U(lr - D(x))``, then optionally clamps it to the
widened local LR range. It works on one window at a time: a wrong value at a window's edge
travels ``reach(D) + reach(U)`` LR pixels inwards per iteration (both measured from the operators'
impulse responses), so the engine adds :attr:`DataConsistency.halo` to the network's halo and
tiled, streamed and whole-image outputs agree.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy.ndimage import maximum_filter, minimum_filter

from domainsr.errors import ConfigError
from domainsr.models.card import ConsistencySettings, ModelCard

Operator = Callable[[np.ndarray], np.ndarray]
#: LR pixels each side of a probe impulse; an operator reaching this far is not local
PROBE_REACH = 12

#: issue 16: a pixel leaves its local LR range when it is more than this share of the range outside
LEAVE_MARGIN = 0.25
#: ... and its error is invented when it is more than this many times interpolation's error
ERROR_RATIO = 3.0


def upsample_nearest_nd(x: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """``(C, *lr)`` -> ``(C, *lr * scale)``, each LR pixel repeated over its block."""
    for ax, f in enumerate(scale):
        if f > 1:
            x = np.repeat(x, int(f), axis=ax + 1)
    return x


def local_range(lr: np.ndarray, scale: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Per band, the min and max of each LR pixel's 3^d neighbourhood (edges replicated), on the
    SR grid (nearest): two ``(C, *lr * scale)`` float32 arrays."""
    lr = np.asarray(lr, np.float32)
    size = (1,) + (3,) * (lr.ndim - 1)
    lo = minimum_filter(lr, size=size, mode="nearest")
    hi = maximum_filter(lr, size=size, mode="nearest")
    return upsample_nearest_nd(lo, scale), upsample_nearest_nd(hi, scale)


def leaves_range(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, margin: float = LEAVE_MARGIN) -> np.ndarray:
    """Where ``x`` lies more than ``margin`` x (hi - lo) below ``lo`` or above ``hi``."""
    pad = margin * (hi - lo)
    return (x < lo - pad) | (x > hi + pad)


@dataclass(frozen=True)
class Extremes:
    """Shares (0-1) of the scored pixels (all bands pooled)."""

    invented: float  #: the output leaves the local LR range AND errs > ERROR_RATIO x interpolation
    output_leaves: float  #: the output leaves the local LR range (any error)
    truth_leaves: float  #: the true HR leaves it: how often leaving is simply right
    n: int  #: scored pixels (x bands)


def invented_extremes(sr: np.ndarray, hr: np.ndarray, interp: np.ndarray, lr: np.ndarray,
                      scale: Sequence[int], mask: np.ndarray | None = None) -> Extremes:
    """Issue 16's measure of invented extremes of ``sr`` (``(C, *hr)``) against the truth ``hr``,
    an interpolation ``interp`` of ``lr`` and the local range of ``lr`` (``(C, *lr)``), over the
    spatial ``mask`` (``None``: every pixel)."""
    lo, hi = local_range(lr, scale)
    if not (sr.shape == hr.shape == interp.shape == lo.shape):
        raise ConfigError(f"shapes differ: sr {sr.shape}, hr {hr.shape}, interpolation {interp.shape}, "
                          f"lr {lr.shape} x {list(scale)}")
    m = np.ones(sr.shape[1:], bool) if mask is None else np.asarray(mask, bool)
    m = np.broadcast_to(m, sr.shape)
    n = int(m.sum())
    if n == 0:
        raise ConfigError("no pixel to score")
    out = leaves_range(sr, lo, hi) & m
    bad = out & (np.abs(sr - hr) > ERROR_RATIO * np.abs(interp - hr))
    truth = leaves_range(hr, lo, hi) & m
    return Extremes(float(bad.sum()) / n, float(out.sum()) / n, float(truth.sum()) / n, n)


# ---------------------------------------------------------------------------------------------
# the data-consistency stage


def _reach_of(response: np.ndarray, centre: Sequence[int], what: str) -> tuple[int, ...]:
    """Per axis, the farthest LR cell from ``centre`` where ``response`` (``(*cells)``) is non-zero."""
    nz = np.argwhere(np.abs(response) > 1e-6 * float(np.abs(response).max()))
    reach = tuple(int(np.abs(nz[:, a] - c).max()) for a, c in enumerate(centre))
    if max(reach) >= PROBE_REACH:
        raise ConfigError(f"data consistency works window by window and needs a local {what}; this one reaches "
                          f">= {PROBE_REACH} LR px (e.g. k-space truncation is global)")
    return reach


def operator_reach(operator: Operator, scale: Sequence[int], channels: int) -> tuple[int, ...]:
    """LR pixels per axis over which ``operator`` (HR ``(C, *hr)`` -> LR) mixes its input: the
    support of its response to one LR cell of ones in the middle of a probe."""
    n = 2 * PROBE_REACH + 1
    hr = np.zeros((channels, *(n * f for f in scale)), np.float32)
    hr[(slice(None), *(slice(PROBE_REACH * f, (PROBE_REACH + 1) * f) for f in scale))] = 1.0
    lr = np.asarray(operator(hr), np.float32)
    if lr.shape[1:] != (n,) * len(scale):
        raise ConfigError(f"the degradation maps {hr.shape[1:]} to {lr.shape[1:]}, not scale {list(scale)}")
    return _reach_of(np.abs(lr).sum(axis=0), (PROBE_REACH,) * len(scale), "degradation")


def upsampler_reach(up: Callable[[np.ndarray], np.ndarray], scale: Sequence[int], channels: int
                    ) -> tuple[int, ...]:
    """LR pixels per axis each output pixel of ``up`` (LR -> HR) depends on."""
    n = 2 * PROBE_REACH + 1
    lr = np.zeros((channels, *(n,) * len(scale)), np.float32)
    lr[(slice(None), *(PROBE_REACH,) * len(scale))] = 1.0
    hr = np.abs(up(lr)).sum(axis=0)
    cells = hr.reshape([v for m, f in zip(lr.shape[1:], scale) for v in (m, f)]).max(
        axis=tuple(range(1, 2 * len(scale), 2)))
    return _reach_of(cells, (PROBE_REACH,) * len(scale), "upsampler")


def noise_level(spec: Any) -> float | None:
    """The LR noise std in the image's units of a degradation spec (its primary physics:
    ``noise_sigma`` or ``sigma_hu``, also inside ``compose`` steps); ``None`` when it states none."""
    from domainsr.degrade import primary_spec

    if not isinstance(spec, dict) or "kind" not in spec:
        return None
    spec = primary_spec(spec)
    for key in ("noise_sigma", "sigma_hu"):
        if spec.get(key):
            return float(spec[key])
    for step in spec.get("steps", []) if spec.get("kind") == "compose" else []:
        level = noise_level(step)
        if level:
            return level
    return None


class _Upsampler:
    """A registry interpolation as an ``(C, *lr) -> (C, *hr)`` numpy function."""

    def __init__(self, method: str, scale: Sequence[int], channels: int) -> None:
        from domainsr.models import build_model

        self.net = build_model(method, spatial_dims=len(scale), in_channels=channels, scale=tuple(scale))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return self.net(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()


@dataclass(frozen=True)
class DataConsistency:
    """The stage for one model: ``operator`` (noise-free, HR -> LR over the output bands), the
    ``settings``, the scale, and which input bands the output bands are (``lr_bands``)."""

    operator: Operator
    settings: ConsistencySettings
    scale: tuple[int, ...]
    channels: int
    lr_bands: tuple[int, ...]
    up: Callable[[np.ndarray], np.ndarray]
    halo: tuple[int, ...]  #: LR pixels per axis the stage adds to the network's halo
    tolerance: float = 0.0  #: residuals within this (image units) are left alone

    @classmethod
    def build(cls, operator: Operator, settings: ConsistencySettings, scale: Sequence[int], channels: int,
              lr_bands: Sequence[int] | None = None, noise: float | None = None) -> DataConsistency:
        """Measure the operators' reach; ``channels``: output bands; ``noise``: the LR noise std
        (image units) that ``settings.noise_tolerance`` multiplies."""
        if settings.noise_tolerance and not noise:
            raise ConfigError("noise_tolerance needs the degradation's noise level (noise_sigma or sigma_hu)")
        scale = tuple(int(f) for f in scale)
        up = _Upsampler(settings.upsampler, scale, channels)
        nd = len(scale)
        halo = (0,) * nd
        if settings.iterations:
            rd, ru = operator_reach(operator, scale, channels), upsampler_reach(up, scale, channels)
            halo = tuple(settings.iterations * (a + b) for a, b in zip(rd, ru))
        if settings.clamp_margin is not None:
            halo = tuple(max(h, 1) for h in halo)
        bands = tuple(range(channels)) if lr_bands is None else tuple(int(b) for b in lr_bands)
        if len(bands) != channels:
            raise ConfigError(f"{len(bands)} LR bands for {channels} output bands")
        return cls(operator, settings, scale, channels, bands, up, halo,
                   float(settings.noise_tolerance * (noise or 0.0)))

    @classmethod
    def from_card(cls, card: ModelCard, settings: ConsistencySettings | None = None) -> DataConsistency:
        """The stage of ``card`` (``settings`` default: the card's own) through its degradation."""
        from domainsr.degrade import noise_free_operator

        settings = settings or card.consistency
        if settings is None:
            raise ConfigError(f"model {card.name!r} has no data-consistency settings")
        if card.application != "direct":
            raise ConfigError(f"data consistency needs a direct model; {card.name!r} is {card.application}")
        op = noise_free_operator(card.degradation or None, card.scale, card.out_channels)
        if op is None:
            raise ConfigError(f"model {card.name!r} has no deterministic degradation to check its output "
                              "against (data consistency needs one)")
        bands = [card.bands.index(b) for b in card.output_bands] if card.output_bands else None
        return cls.build(op, settings, card.scale, card.out_channels, bands, noise_level(card.degradation))

    def describe(self) -> dict[str, Any]:
        return {**self.settings.model_dump(), "halo": list(self.halo), "tolerance": self.tolerance}

    def __call__(self, sr: np.ndarray, lr: np.ndarray) -> np.ndarray:
        """``sr`` ``(C, *lr * scale)`` made consistent with ``lr`` ``(C_in, *lr)``; float32."""
        s = self.settings
        target = torch.from_numpy(np.ascontiguousarray(np.asarray(lr, np.float32)[list(self.lr_bands)]))
        x = torch.from_numpy(np.array(sr, np.float32))
        for _ in range(s.iterations):  # torch's two threads: 1.7x the numpy form on a 4 x 2084^2 window
            r = target - torch.from_numpy(np.asarray(self.operator(x.numpy()), np.float32))
            if self.tolerance:
                r = torch.nn.functional.softshrink(r, self.tolerance)
            x.add_(torch.from_numpy(self.up(r.numpy())), alpha=float(s.step))
        if s.clamp_margin is not None:
            lo, hi = (torch.from_numpy(v) for v in local_range(target.numpy(), self.scale))
            pad = (hi - lo).mul_(float(s.clamp_margin))
            torch.maximum(x, lo.sub_(pad), out=x)
            torch.minimum(x, hi.add_(pad), out=x)
        return x.numpy()

    def batch(self, y: np.ndarray, x: np.ndarray) -> np.ndarray:
        """:meth:`__call__` over a batch: outputs ``(B, C, *hr)``, inputs ``(B, C_in, *lr)``."""
        return np.stack([self(a, b) for a, b in zip(y, x)])
