"""The operators an audit runs: the generic HR -> LR degrader (area average) and the LR -> SR
enhancers (a torch module or callable, and the parameter-free interpolation baseline).

A degradation's noise-free operator (the LR-consistency check of a known physics) is
:func:`domainsr.degrade.noise_free_operator`.
"""
from __future__ import annotations

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

    return run


__all__ = ["Degrader", "area_average", "as_enhancer", "interpolation_enhancer", "module_enhancer"]
