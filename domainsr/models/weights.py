"""Bring your own weights: third-party SR weights (``.pth``, ``.pt``, ``.ckpt``, ``.safetensors``)
loaded through spandrel and run by DomainSR's engine (halo tiling, streaming, nodata, bounded
memory).

Loading is safe: ``torch.load(weights_only=True)`` or safetensors, so a file carrying pickled
code is refused before anything in it runs; spandrel then detects the architecture from the key
layout (``{'params': ...}``, ``{'params_ema': ...}`` and bare state dicts alike).

Normalisation: such networks take 0..1. The input range that maps to 0..1 is, first, the one
declared (``--input-range LO,HI``, a task config's ``model.kwargs.input_range``), else the one in
a sidecar card beside the weights (``FILE.pth.card.json`` or ``FILE.card.json``, see
:class:`SidecarCard`), else, for natural images only (an optical 8- or 16-bit file with 1 or 3
undescribed or RGB bands), the range of the file's dtype (uint8 -> /255, uint16 -> /65535).
Multispectral and medical inputs without a declared range are refused. Outputs are clamped to
0..1 (as spandrel does), mapped back to the input's units, and rounded and clipped to the
file's dtype by the writers.

The generated model card (architecture, weights sha256, scale, channels, range) goes into the
output's provenance. The receptive radius is measured with the gradient probe of
:mod:`domainsr.models.radius`; a network whose context exceeds the probe is tiled with blending.
"""
from __future__ import annotations

import json
import logging
import math
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import Field, ValidationError, model_validator
from torch import nn

from domainsr.bands import described
from domainsr.errors import ConfigError, ModelCardMismatch, ModelError
from domainsr.models.card import Architecture, FixedNormalization, ModelCard, StrictCardModel
from domainsr.models.descriptor import ModelDescriptor
from domainsr.models.layers import Runs2D
from domainsr.models.names import WEIGHT_SUFFIXES
from domainsr.models.spandrel_support import SpandrelNet, import_spandrel, spandrel_version, tiling_advice

log = logging.getLogger(__name__)

_NATURAL_DTYPES = {"uint8": (0.0, 255.0), "uint16": (0.0, 65535.0)}
_RGB_NAMES = {"r", "g", "b", "red", "green", "blue", "gray", "grey", "luminance", "y"}


class SidecarCard(StrictCardModel):
    """What third-party weights are for, beside them as ``FILE.pth.card.json`` (all optional)."""

    name: str | None = None
    domain: str | None = Field(None, pattern="^(mri|ct|optical)$")
    input_range: tuple[float, float] | None = None
    units: str | None = None
    bands: list[str] = Field(default_factory=list)
    license: str = ""
    source: str = ""
    intended_use: str = ""
    limitations: str = ""

    @model_validator(mode="after")
    def _range(self) -> SidecarCard:
        if self.input_range is not None and not self.input_range[0] < self.input_range[1]:
            raise ValueError("input_range must be [low, high] with low < high")
        return self


def sidecar_path(weights: Path) -> Path | None:
    """``FILE.pth.card.json`` or ``FILE.card.json`` beside the weights, if there is one."""
    for cand in (weights.with_name(weights.name + ".card.json"), weights.with_suffix(".card.json")):
        if cand.is_file():
            return cand
    return None


def read_sidecar(weights: Path) -> SidecarCard | None:
    path = sidecar_path(weights)
    if path is None:
        return None
    try:
        return SidecarCard.model_validate_json(path.read_text(encoding="utf-8"))
    except (OSError, ValidationError, json.JSONDecodeError) as exc:
        raise ModelError(f"invalid weights card: {exc}", path) from exc


def parse_range(value: Any) -> tuple[float, float] | None:
    """``"0,10000"``, ``[0, 10000]`` or ``None`` -> ``(0.0, 10000.0)`` / ``None``; ConfigError otherwise."""
    if value is None or value == "":
        return None
    parts = value.replace(":", ",").split(",") if isinstance(value, str) else list(value)
    try:
        lo, hi = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ConfigError(f"input range {value!r} must be LO,HI (e.g. 0,10000)") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ConfigError(f"input range {value!r} needs finite LO < HI")
    return lo, hi


# ---------------------------------------------------------------------------------------------
# reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, without running any code in it; spandrel's unwrapping of
    ``{'params_ema': ...}`` / ``{'params': ...}`` / ``{'state_dict': ...}`` and common prefixes applied."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise ModelError(f"not a weights file (expected {', '.join(WEIGHT_SUFFIXES)})", path)
    if not path.is_file():
        raise ModelError("no such weights file", path)
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:
            raise ModelError("reading .safetensors needs the safetensors package (pip install safetensors)") from exc
        try:
            state: Any = load_file(str(path), device="cpu")
        except Exception as exc:  # SafetensorError and friends
            raise ModelError(f"cannot read safetensors file: {exc}", path) from exc
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # UnpicklingError: the file holds code or objects, not just tensors
            raise ModelError("refused to load weights: the file holds pickled objects other than tensors "
                             f"(only plain state dicts are loaded; {type(exc).__name__})", path) from exc
    if not isinstance(state, dict):
        raise ModelError(f"weights file holds a {type(state).__name__}, not a state dict", path)
    state = import_spandrel().canonicalize_state_dict(state)
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ModelError("weights file holds no tensors", path)
    return tensors


def detect(path: str | Path) -> Any:
    """spandrel's descriptor of the network in ``path`` (eval mode, CPU, float32)."""
    spandrel = import_spandrel()
    state = read_state_dict(path)
    try:
        desc = spandrel.ModelLoader(device="cpu").load_from_state_dict(state)
    except spandrel.UnsupportedModelError as exc:
        raise ModelError("spandrel recognises no supported architecture in these weights", path) from exc
    except Exception as exc:  # shape mismatches inside an architecture loader
        raise ModelError(f"cannot build the network for these weights: {type(exc).__name__}: {exc}", path) from exc
    if not isinstance(desc, spandrel.ImageModelDescriptor) or desc.purpose != "SR" or int(desc.scale) < 2:
        raise ModelError(f"{desc.architecture.name} weights are for {getattr(desc, 'purpose', '?')} "
                         f"(scale {getattr(desc, 'scale', '?')}), not super-resolution", path)
    desc.model.eval()
    for p in desc.model.parameters():
        p.requires_grad_(False)
    return desc


def _phase(desc: Any) -> int:
    return max(1, int(desc.size_requirements.multiple_of))


@lru_cache(maxsize=16)
def _measured_radius(sha256: str, path: str) -> tuple[int, int] | None:
    from domainsr.models.radius import measure_receptive_radius

    desc = detect(path)
    r = measure_receptive_radius(desc.model, in_channels=int(desc.input_channels), scale=(int(desc.scale),) * 2,
                                 phase=_phase(desc))
    return None if r is None else (int(r[0]), int(r[1]))


def inspect_weights(path: str | Path) -> dict[str, Any]:
    """What a weights file holds, without an image: architecture, scale, channels, sha256 (for
    ``model_identity``, ``domainsr models show`` and the run key)."""
    from domainsr.models.checkpoints import sha256_file

    path = Path(path).expanduser()
    desc = detect(path)
    return {"architecture": desc.architecture.id, "architecture_name": desc.architecture.name,
            "tags": list(desc.tags), "scale": int(desc.scale), "in_channels": int(desc.input_channels),
            "out_channels": int(desc.output_channels), "sha256": sha256_file(path),
            "dtypes": [n for n, ok in (("fp16", desc.supports_half), ("bf16", desc.supports_bfloat16)) if ok],
            "size_rules": {"multiple_of": int(desc.size_requirements.multiple_of),
                           "min_size": int(desc.size_requirements.minimum),
                           "square": bool(desc.size_requirements.square)},
            "tiling": tiling_advice(desc), "spandrel": spandrel_version()}


def weights_identity(reference: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """What identifies the outputs of third-party weights: file sha256, architecture, scale and the
    declared input range. ``reference`` is the path, optionally ``?input_range=LO,HI``; ``kwargs``
    (a task config's ``model.kwargs``) may give ``input_range`` too (not a different one)."""
    from domainsr.models.names import split_reference

    path_text, opts = split_reference(reference)
    extra = sorted(set(opts) - {"input_range"}) + sorted(set(kwargs or {}) - {"input_range"})
    if extra:
        raise ConfigError(f"third-party weights take only input_range as an option, not {extra}", path_text)
    a, b = parse_range(opts.get("input_range")), parse_range((kwargs or {}).get("input_range"))
    if a is not None and b is not None and a != b:
        raise ConfigError(f"two input ranges for {path_text}: {list(a)} and {list(b)}")
    path = Path(path_text).expanduser()
    info = inspect_weights(path)
    sidecar = read_sidecar(path)
    declared = a or b or (sidecar.input_range if sidecar else None)
    return {"kind": "weights", "name": sidecar.name if sidecar and sidecar.name else path.stem,
            "version": "1", "sha256": info["sha256"], "architecture": f"spandrel:{info['architecture']}",
            "scale": [info["scale"]] * 2, "application": "direct", "guided": False,
            "input_range": None if declared is None else list(declared), "path": str(path)}


# ---------------------------------------------------------------------------------------------
# the input range


def natural_image(img: Any, channels: int) -> bool:
    """An optical 8-/16-bit image of 1 or 3 bands the file does not name as sensor bands."""
    dtype = str(img.meta.get("storage_dtype", img.data.dtype))
    if img.domain != "optical" or dtype not in _NATURAL_DTYPES or img.channels != channels or channels not in (1, 3):
        return False
    return not described(img) or all(str(b).strip().lower() in _RGB_NAMES for b in img.band_names)


def input_range_for(img: Any, channels: int, declared: tuple[float, float] | None,
                    sidecar: SidecarCard | None, path: Path) -> tuple[tuple[float, float], str]:
    """The range that maps to the network's 0..1, and where it came from."""
    if declared is not None:
        return declared, "declared"
    if sidecar is not None and sidecar.input_range is not None:
        return sidecar.input_range, "weights card"
    if natural_image(img, channels):
        return _NATURAL_DTYPES[str(img.meta.get("storage_dtype", img.data.dtype))], "file dtype"
    dtype = img.meta.get("storage_dtype", img.data.dtype)
    what = "medical" if img.domain in ("mri", "ct") else f"{img.channels}-band {dtype}"
    raise ModelCardMismatch(f"third-party weights {path.name} expect 0..1 inputs: declare the range of this {what} "
                            f"image with --input-range LO,HI (or input_range in {path.name}.card.json)",
                            img.source or None)


# ---------------------------------------------------------------------------------------------
# the descriptor


class InPlane(Runs2D):
    """A 2D network run on every slice of a volume, in the plane of the two axes other than ``axis``."""

    def __init__(self, net: nn.Module, axis: int) -> None:
        super().__init__()
        self.inner, self.axis = net, int(axis)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.movedim(2 + self.axis, 1)  # (B, K, C, P, Q)
        b, k = x.shape[:2]
        y = self.inner(x.reshape(b * k, *x.shape[2:]).contiguous(memory_format=torch.channels_last))
        return y.reshape(b, k, *y.shape[1:]).movedim(1, 2 + self.axis)


def through_plane_axis(img: Any) -> int:
    """The axis a 2D network does not touch in a volume: a single-slice axis, else the one with
    the largest spacing (the last of equals)."""
    ones = [a for a, n in enumerate(img.spatial_shape) if n == 1]
    if ones:
        return ones[-1]
    spacing = np.asarray(img.geometry.spacing, float)
    return int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])


def load_weights(path: str | Path, img: Any, *, input_range: Any = None) -> ModelDescriptor:
    """The descriptor that runs third-party weights ``path`` on ``img`` (2D, or each slice of a
    volume in its plane), its input checked and normalised as the module docstring says."""
    from domainsr.models.checkpoints import CardModel, sha256_file

    path = Path(path).expanduser()
    declared = parse_range(input_range)
    sidecar = read_sidecar(path)
    desc = detect(path)
    digest = sha256_file(path)
    cin, cout, s = int(desc.input_channels), int(desc.output_channels), int(desc.scale)
    if img.channels != cin:
        raise ModelCardMismatch(f"weights {path.name} ({desc.architecture.name}) take {cin} channel(s), the image has "
                                f"{img.channels} ({', '.join(img.band_names)}); select bands with --bands",
                                img.source or None)
    if cout != cin:
        raise ModelError(f"weights map {cin} to {cout} channels; DomainSR enhances the input's bands", path)
    (lo, hi), origin = input_range_for(img, cin, declared, sidecar, path)
    radius = _measured_radius(digest, str(path))
    volume = img.spatial_dims == 3
    card = ModelCard(
        name=(sidecar.name if sidecar and sidecar.name else path.stem), version="1",
        architecture=Architecture(name=f"spandrel:{desc.architecture.id}",
                                  kwargs={"tags": list(desc.tags), "spandrel": spandrel_version()}),
        domain=(sidecar.domain if sidecar and sidecar.domain else img.domain), spatial_dims=2, scale=(s, s), in_channels=cin, out_channels=cout,
        bands=list(sidecar.bands) if sidecar and sidecar.bands else [],
        channel_meaning=f"input range [{lo:g}, {hi:g}] ({origin}) -> 0..1; output clamped to 0..1 and mapped back",
        units=(sidecar.units if sidecar and sidecar.units else img.units) or "", input_range=(lo, hi),
        normalization=FixedNormalization(offset=[lo] * cin, scale=[hi - lo] * cin),
        receptive_radius=radius, application="inplane" if volume else "direct", weights_sha256=digest,
        license=sidecar.license if sidecar else "",
        intended_use=(sidecar.intended_use if sidecar and sidecar.intended_use
                      else f"third-party {desc.architecture.name} weights, run through spandrel"),
        limitations=(sidecar.limitations if sidecar and sidecar.limitations
                     else "not trained or validated by DomainSR; natural-image weights may invent detail"))
    model = CardModel(SpandrelNet(desc), card).eval()
    phase, minimum = _phase(desc), int(desc.size_requirements.minimum)
    common = {"name": card.name, "kind": "weights", "architecture": card.architecture.name,
              "in_channels": cin, "out_channels": cout, "version": card.version, "sha256": digest,
              "weights": "third-party", "units": card.units, "input_range": (lo, hi), "card": card,
              "dtypes": tuple(n for n, ok in (("fp16", desc.supports_half), ("bf16", desc.supports_bfloat16)) if ok),
              "tiling": tiling_advice(desc), "prepare": model.prepare,
              "config": {"input_range_from": origin, "spandrel": spandrel_version()}}
    if not volume:
        return ModelDescriptor(module=model, scale=(s, s), spatial_dims=2, receptive_radius=radius,
                               size_multiple=phase, min_size=minimum, application="direct", **common)
    if phase > 1 or minimum > 1:
        raise ModelError(f"{desc.architecture.name} has size rules (multiple of {phase}, at least {minimum} px) "
                         "that slice-by-slice volumes do not support yet", path)
    axis = through_plane_axis(img)
    scale3 = tuple(1 if a == axis else s for a in range(3))
    r3 = None if radius is None else tuple(0 if a == axis else radius[0] for a in range(3))
    return ModelDescriptor(module=InPlane(model, axis), scale=scale3, spatial_dims=3, receptive_radius=r3,
                           application="inplane", **common)


__all__ = ["InPlane", "SidecarCard", "detect", "input_range_for", "inspect_weights", "load_weights",
           "natural_image", "parse_range", "read_sidecar", "read_state_dict", "sidecar_path", "weights_identity"]
