"""Receptive radius measured with a gradient probe, for networks without an analytic count
(third-party weights); the registry's own networks count it analytically
(:mod:`domainsr.models.layers`) and ``tests/models/test_receptive_radius.py`` checks the counts
with this same probe.

The radius (LR pixels per axis) is the farthest input pixel with a non-zero gradient of the
output block of a centre LR pixel. It is a property of the architecture, so the probe runs on a
copy of the network with random non-zero weights (no accidentally dead path of the real
weights hides a dependency) in float64, on random inputs; a network whose dependence reaches the
border of the largest probe gets ``None`` (unknown: the engine then blends overlapping tiles).
"""
from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

log = logging.getLogger(__name__)


def gradient_extent(net: Callable[[torch.Tensor], torch.Tensor], in_channels: int, scale: Sequence[int],
                    size: Sequence[int], *, phase: int = 1, batch: int = 2,
                    dtype: torch.dtype = torch.float64) -> tuple[tuple[int, ...], bool]:
    """Per axis, the largest distance from the output block of the ``phase``-wide centre LR block
    (all output pixels and channels) to an input pixel with a non-zero gradient; and whether that
    dependence reaches the input's border (the true radius may then be larger)."""
    nd = len(size)
    centre = [(s // 2) // phase * phase for s in size]
    x = torch.randn(batch, in_channels, *size, dtype=dtype, requires_grad=True)
    block = tuple(slice(c * f, (c + phase) * f) for c, f in zip(centre, scale))
    y = net(x)
    y[(slice(None), slice(None), *block)].sum().backward()
    nz = (x.grad != 0).any(0).any(0).nonzero()  # NaN counts as a dependence too
    if nz.numel() == 0:
        return (0,) * nd, False
    lo, hi = nz.min(0).values.tolist(), nz.max(0).values.tolist()
    ext = tuple(max(c + phase - 1 - a, b - c) for a, b, c in zip(lo, hi, centre))
    touches = any(a <= 0 or b >= s - 1 for a, b, s in zip(lo, hi, size))
    return ext, touches


def jittered(module: nn.Module, dtype: torch.dtype = torch.float64, seed: int = 0) -> nn.Module:
    """A copy of ``module`` in ``dtype`` and eval mode with every parameter redrawn (small,
    non-zero), so that no zero-initialised or dead weight hides a dependency."""
    net = copy.deepcopy(module).to(dtype=dtype).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            fan = max(1, p[0].numel()) if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) / fan**0.5 + 1e-3)
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def measure_receptive_radius(module: nn.Module, *, in_channels: int, scale: Sequence[int], phase: int = 1,
                             start: int = 24, largest: int = 160, budget_s: float = 20.0
                             ) -> tuple[int, ...] | None:
    """The receptive radius (LR px per axis) of a 2D/3D ``module`` mapping ``(N, C, *sp)`` to
    ``(N, C', *sp * scale)``, or ``None`` when it reaches past a ``largest``-pixel probe (or the
    probes exceed ``budget_s`` seconds). ``phase``: the window offsets the network is equivariant
    to (e.g. 2 for a net that pixel-unshuffles its input by 2); the result covers every phase."""
    nd = len(scale)
    try:
        net = jittered(module)
        dtype = torch.float64
    except (RuntimeError, TypeError):  # a network that has no float64 kernels
        net, dtype = jittered(module, torch.float32), torch.float32
    size = max(start, 4 * phase)
    t0 = time.perf_counter()
    while True:
        side = -(-size // phase) * phase + phase
        try:
            ext, touches = gradient_extent(net, in_channels, scale, (side,) * nd, phase=phase, dtype=dtype)
        except RuntimeError as exc:  # e.g. a size rule the probe broke: no measurement
            log.warning("receptive radius probe failed (%s); treating the radius as unknown", exc)
            return None
        if not touches:
            return ext
        if 2 * size > largest or time.perf_counter() - t0 > budget_s:
            log.info("receptive radius exceeds a %d px probe: treated as unknown (tiles are blended)", side)
            return None
        size *= 2


__all__ = ["gradient_extent", "jittered", "measure_receptive_radius"]
