"""The held-out protocol: degrade a real high-resolution reference with the domain's physics,
super-resolve it with the model and with the baseline, and compare both with the reference
(:func:`audit_heldout`); for a checkpoint, on the region its card says training never saw
(:func:`audit_checkpoint`, :func:`heldout_region`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from domainsr.audit.operators import Degrader, area_average, as_enhancer
from domainsr.audit.protocol import AuditResult, audit_output
from domainsr.audit.settings import AuditThresholds
from domainsr.audit.uncertainty import Enhancer
from domainsr.degrade import noise_free_operator
from domainsr.errors import ConfigError, GeometryError, InputError
from domainsr.image import MultiResolutionImage, SpatialImage

Array = np.ndarray
HELD_OUT_NOTE = "noise-free copy of the held-out degradation"


def crop_to_multiple(img: SpatialImage, scale: Sequence[int]) -> SpatialImage:
    """The largest leading sub-grid of ``img`` whose shape is a whole multiple of ``scale``."""
    shape = tuple((s // f) * f for s, f in zip(img.spatial_shape, scale))
    if shape == img.spatial_shape:
        return img
    if any(s == 0 for s in shape):
        raise GeometryError(f"image {img.spatial_shape} is smaller than the scale {tuple(scale)}", img.source or None)
    sl = (slice(None),) + tuple(slice(0, s) for s in shape)
    mask = None if img.mask is None else img.mask[sl[1:]]
    return img.derive(img.data[sl], geometry=img.geometry.cropped([0] * len(shape), shape), mask=mask)


def audit_heldout(reference: SpatialImage, model: Any, degradation: Callable[..., Array], *,
                  scale: Sequence[int], consistency: Degrader | None = None,
                  thresholds: AuditThresholds | None = None, baseline: Enhancer | None = None,
                  ensemble: Sequence[Any] = (), model_info: dict[str, Any] | None = None,
                  seed: int = 0, allow_identifiers: bool = False) -> AuditResult:
    """Held-out protocol: degrade the real high-resolution ``reference`` with the domain's
    ``degradation(hr, rng) -> lr``, super-resolve with ``model`` and with the baseline, and compare
    both to the reference. ``consistency`` is the noise-free operator for the LR-consistency check
    (default: :func:`~domainsr.degrade.noise_free_operator` of ``degradation``, else the area average)."""
    scale = tuple(int(s) for s in scale)
    ref = crop_to_multiple(reference, scale)
    rng = np.random.default_rng(seed)
    lr_data = np.asarray(degradation(np.asarray(ref.data, np.float32), rng), np.float32)
    lr_grid = ref.geometry.scaled([1.0 / f for f in scale])
    if tuple(lr_data.shape[1:]) != tuple(lr_grid.shape):
        raise GeometryError(f"degradation gave LR {lr_data.shape[1:]} for reference {ref.spatial_shape} at "
                            f"scale {scale}; expected {lr_grid.shape}", ref.source or None)
    lr_mask = None
    if ref.mask is not None:
        lr_mask = area_average(scale)(ref.mask[None].astype(np.float32))[0] >= 1.0
    described = getattr(degradation, "describe", lambda: repr(degradation))()
    lr = ref.derive(lr_data, geometry=lr_grid, mask=lr_mask,
                    step={"step": "held-out degradation", "seed": seed, "degradation": described})
    sr = as_enhancer(model)(lr)
    down = consistency or noise_free_operator(degradation, scale, ref.channels, note=HELD_OUT_NOTE) \
        or area_average(scale)
    result = audit_output(sr, lr, ref, down, thresholds=thresholds, baseline=baseline, model=model,
                          ensemble=ensemble, model_info=model_info, allow_identifiers=allow_identifiers,
                          mode="held-out")
    result.provenance["held_out"] = {
        "degradation": getattr(degradation, "describe", lambda: repr(degradation))(), "seed": seed,
        "reference_region": {"start": [0] * len(scale), "shape": list(ref.spatial_shape)}}
    return result


def heldout_region(card: Any, reference: SpatialImage | MultiResolutionImage, region: str = "test") -> SpatialImage:
    """The part of ``reference`` a checkpoint never saw in training: its card's ``region`` of the
    spatial split (``training_data.split.regions``), when the card records one for this image's
    grid; else the whole image. Bands are selected as the card names them (also from a
    multi-resolution band set such as a Sentinel-2 folder)."""
    img = reference.select(card.bands) if isinstance(reference, MultiResolutionImage) else reference
    if card.bands and list(img.band_names) != list(card.bands):
        missing = [b for b in card.bands if b not in img.band_names]
        if missing:
            raise InputError(f"reference lacks band(s) {missing} that model {card.name!r} needs", img.source or None)
        idx = [img.band_names.index(b) for b in card.bands]
        img = img.derive(img.data[idx], band_names=tuple(card.bands))
    split = (card.training_data.split if card.training_data is not None else {}) or {}
    bounds = (split.get("regions") or {}).get(region)
    if bounds is None:
        return img
    axis = int(split["axis"])
    start, stop = int(bounds[0]), int(bounds[1])
    if not 0 <= start < stop <= img.spatial_shape[axis]:
        raise InputError(f"the card's {region} region {bounds} does not fit this image's axis {axis} "
                         f"({img.spatial_shape[axis]} px)", img.source or None)
    first = [0] * img.spatial_dims
    first[axis] = start
    shape = list(img.spatial_shape)
    shape[axis] = stop - start
    sl = tuple(slice(a, a + n) for a, n in zip(first, shape))
    mask = None if img.mask is None else img.mask[sl]
    return img.derive(np.ascontiguousarray(img.data[(slice(None), *sl)]), geometry=img.geometry.cropped(first, shape),
                      mask=mask, step={"step": "held-out region", "region": region, "axis": axis,
                                       "start": start, "stop": stop})


def audit_checkpoint(reference: SpatialImage | MultiResolutionImage, checkpoint: str, *, region: str = "test",
                     thresholds: AuditThresholds | None = None, seed: int = 0,
                     allow_identifiers: bool = False) -> AuditResult:
    """Held-out audit of a shipped or user checkpoint on a real reference image: its card gives
    the bands, the scale, the degradation and the held-out region (see :func:`heldout_region`)."""
    from domainsr.degrade import build_degradation, primary_spec
    from domainsr.models.checkpoints import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    if card.application != "direct":
        raise ConfigError(f"model {card.name!r} is applied {card.application}; pass its enhancer to "
                          "audit_heldout instead")
    ref = heldout_region(card, reference, region)
    degradation = build_degradation(primary_spec(card.degradation))  # a training mix: its primary
    info = {"name": card.name, "checkpoint": str(checkpoint), "card": card.model_dump(mode="json"),
            "held_out_region": region}
    return audit_heldout(ref, model, degradation, scale=card.scale, thresholds=thresholds, seed=seed,
                         model_info=info, allow_identifiers=allow_identifiers)


__all__ = ["HELD_OUT_NOTE", "audit_checkpoint", "audit_heldout", "crop_to_multiple", "heldout_region"]
