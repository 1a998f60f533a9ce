"""How held-out figures are measured: the scored mask, pooled PSNR / SSIM, the best interpolation
baseline and the card's :class:`~domainsr.models.checkpoints.RegionMetrics`.

Shared by both pairing strategies and the quality benchmark (``benchmarks/quality.py``), so a
card's figures and the benchmark's are the same computation. Metrics come from
:mod:`domainsr.audit.metrics`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
from torch import nn

from domainsr.audit import metrics as M
from domainsr.errors import ConfigError
from domainsr.models.checkpoints import RegionMetrics

#: the interpolations (registry models) a trained model is compared with; the best is reported
BASELINES = ("linear", "cubic", "lanczos")


class HeldOut(Protocol):
    """A held-out pair as scoring sees it: the reference ``hr`` ``(C, *spatial)``, its degraded
    ``lr`` and the ``valid`` mask over ``hr``."""

    hr: np.ndarray
    lr: np.ndarray
    valid: np.ndarray


@dataclass(frozen=True)
class Baseline:
    """The best interpolation on a held-out region (by PSNR), scored once."""

    name: str
    psnr: float
    ssim: float


def border(pair: HeldOut, scale: Sequence[int]) -> np.ndarray:
    """The pair's valid mask without a border of 2 LR pixels (model and baselines are scored on it)."""
    m = pair.valid.copy()
    for a, s in enumerate(scale):
        b = min(2 * s, m.shape[a] // 4)
        if b:
            idx: list[slice] = [slice(None)] * m.ndim
            idx[a] = slice(0, b)
            m[tuple(idx)] = False
            idx[a] = slice(m.shape[a] - b, None)
            m[tuple(idx)] = False
    return m


def score(outputs: Sequence[np.ndarray], pairs: Sequence[HeldOut], scale: Sequence[int]
          ) -> tuple[float, float, float, int]:
    """Pooled PSNR (mean over bands of ``10 log10(range^2 / MSE)`` with the MSE pooled over all
    pairs and the range = the HR's valid span per band over all pairs), pixel-weighted mean SSIM,
    the mean range and the number of scored pixels (on :func:`border` masks)."""
    masks = [border(p, scale) for p in pairs]
    keep = [i for i, m in enumerate(masks) if m.any()]
    if not keep:
        raise ConfigError("no valid pixel is left to score in the held-out region; check data.background")
    outputs, pairs, masks = [outputs[i] for i in keep], [pairs[i] for i in keep], [masks[i] for i in keep]
    counts = np.array([m.sum() for m in masks], dtype=np.float64)
    lo = np.min([[np.min(b[m]) for b in p.hr] for p, m in zip(pairs, masks)], axis=0)
    hi = np.max([[np.max(b[m]) for b in p.hr] for p, m in zip(pairs, masks)], axis=0)
    rng = np.maximum(hi - lo, 1e-12)
    mse = np.sum([M.mse(o, p.hr, m) * n for o, p, m, n in zip(outputs, pairs, masks, counts)], axis=0) / counts.sum()
    psnr = 10.0 * np.log10(rng ** 2 / np.maximum(mse, 1e-300))
    ssim = np.sum([M.ssim(o, p.hr, m, rng) * n for o, p, m, n in zip(outputs, pairs, masks, counts)],
                  axis=0) / counts.sum()
    return float(np.mean(psnr)), float(np.mean(ssim)), float(np.mean(rng)), int(counts.sum())


def best_baseline(pairs: Sequence[HeldOut], spatial_dims: int, scale: Sequence[int],
                  interpolate: Callable[[nn.Module, HeldOut], np.ndarray]) -> Baseline:
    """Score every interpolation of :data:`BASELINES` on ``pairs`` and keep the best;
    ``interpolate(net, pair)`` is the interpolation's output in the data's units."""
    from domainsr.models import build_model

    best = None
    for name in BASELINES:
        net = build_model(name, spatial_dims=spatial_dims, in_channels=pairs[0].lr.shape[0], scale=scale)
        psnr, ssim, _, _ = score([interpolate(net, p) for p in pairs], pairs, scale)
        if best is None or psnr > best.psnr:
            best = Baseline(name, psnr, ssim)
    assert best is not None
    return best


def region_metrics(outputs: Sequence[np.ndarray], pairs: Sequence[HeldOut], scale: Sequence[int],
                   baseline: Baseline, region: str, description: str) -> RegionMetrics:
    """The card's figures for one held-out region: model ``outputs`` against ``baseline``."""
    psnr, ssim, rng, n = score(outputs, pairs, scale)
    return RegionMetrics(region=region, psnr=psnr, ssim=ssim, baseline=baseline.name,
                         psnr_baseline=baseline.psnr, ssim_baseline=baseline.ssim,
                         gain_db=psnr - baseline.psnr, data_range=rng, n_pixels=n, description=description)


__all__ = ["BASELINES", "Baseline", "HeldOut", "best_baseline", "border", "region_metrics", "score"]
