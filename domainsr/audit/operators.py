"""The operators an audit runs: the generic HR -> LR degrader (area average) and the LR -> SR
enhancers (a torch module or callable, and the parameter-free interpolation baseline).

A degradation's noise-free operator (the LR-consistency check of a known physics) is
:func:`domainsr.degrade.noise_free_operator`.
"""
from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from domainsr.audit.hallucination import upsample_nearest
from domainsr.audit.uncertainty import Enhancer
from domainsr.errors import ConfigError
from domainsr.image import SpatialImage

Array = np.ndarray
Degrader = Callable[[Array], Array]  # (C, *hr_spatial) -> (C, *lr_spatial), deterministic


def area_average(scale: Sequence[int]) -> Degrader:
    """The generic degradation: each LR pixel is the mean of the SR pixels it covers."""
    f = tuple(int(s) for s in scale)

    def down(x: Array) -> Array:
        c, *sp = x.shape
        shape = [c] + [v for s, k in zip(sp, f) for v in (s // k, k)]
        return np.asarray(x, np.float32).reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(f), 2)))

    return down


def module_enhancer(module: Any) -> Enhancer:
    """Run a torch SR module (registry model or checkpoint ``CardModel``) on a whole image.

    The module's ``scale`` gives the output grid (``geometry.scaled``); a ``prepare`` method (a
    card's per-image normalisation and input checks) is called first.
    """
    import torch

    from domainsr.engine import PatchInferer, enhance_image

    def run(img: SpatialImage) -> SpatialImage:
        # inference mode also for prepare(): after a first run the engine leaves the module's
        # buffers as inference tensors, which may only be updated in inference mode
        with torch.inference_mode():
            if hasattr(module, "prepare"):
                module.prepare(img)
            return enhance_image(img, PatchInferer(module))

    return run


def as_enhancer(model: Any) -> Enhancer:
    """A callable ``SpatialImage -> SpatialImage`` for a torch module or such a callable."""
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return module_enhancer(model)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if callable(model):
        return model
    raise ConfigError(f"cannot run {type(model).__name__} as a super-resolution model")


def interpolation_enhancer(method: str, channels: int, scale: Sequence[int]) -> Enhancer:
    """The parameter-free baseline, run on the whole image (no tiling needed)."""
    import torch

    from domainsr.models import build_model

    net = build_model(method, spatial_dims=len(scale), in_channels=channels, scale=tuple(scale))

    def run(img: SpatialImage) -> SpatialImage:
        with torch.no_grad():
            out = net(torch.from_numpy(np.asarray(img.data, np.float32))[None])[0].numpy()
        mask = None if img.mask is None else upsample_nearest(img.mask, scale)
        return img.derive(out, geometry=img.geometry.scaled(scale), mask=mask,
                          step={"step": "baseline", "method": method, "scale": list(scale)})

    run.receptive_radius = tuple(int(r) for r in np.atleast_1d(net.receptive_radius))  # type: ignore[attr-defined]
    return run


def receptive_radius(enhancer: Any, spatial_dims: int) -> tuple[int, ...] | None:
    """How far (LR pixels per axis) an enhancer's output at a pixel looks around its parent LR
    pixel: its ``receptive_radius`` (torch SR modules, the interpolation baseline), else ``None``
    (unknown: it must see the whole image)."""
    r = getattr(enhancer, "receptive_radius", None)
    if r is None:
        return None
    vals = np.broadcast_to(np.ceil(np.asarray(r, np.float64)).astype(int), (spatial_dims,))
    return tuple(int(v) for v in vals)


def degrader_reach(down: Degrader, scale: Sequence[int], channels: int, probe: int = 24) -> tuple[int, ...] | None:
    """How far (LR pixels per axis) the HR pixels an LR pixel of ``down`` depends on lie from its
    own footprint, measured on impulses (one per position inside an LR pixel) on a grid of
    ``probe`` LR pixels per axis; ``None`` when the response reaches the probe's border (a global
    operator, such as k-space truncation). Area averaging reaches 0."""
    f = tuple(int(v) for v in scale)
    d = len(f)
    n = probe if d < 3 else max(12, probe // 2)
    reach = [0] * d
    centre = n // 2
    for phase in itertools.product(*(range(k) for k in f)):
        x = np.zeros((channels, *(n * k for k in f)), np.float32)
        x[(slice(None), *(centre * k + p for k, p in zip(f, phase)))] = 1.0
        y = np.asarray(down(x), np.float64)
        hit = np.argwhere(np.any(y != 0.0, axis=0))
        if hit.size == 0:
            continue
        if np.any(hit.min(0) == 0) or np.any(hit.max(0) == n - 1):
            return None
        reach = [max(r, int(np.max(np.abs(hit[:, a] - centre)))) for a, r in enumerate(reach)]
    return tuple(reach)


__all__ = ["Degrader", "area_average", "as_enhancer", "degrader_reach", "interpolation_enhancer", "module_enhancer",
           "receptive_radius"]
