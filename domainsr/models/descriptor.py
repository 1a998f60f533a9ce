"""``ModelDescriptor``: a loaded model and everything the engine, the audit and provenance need to
know about it (in the spirit of spandrel's ``ModelDescriptor``).

Every way of getting a model returns one: :func:`from_checkpoint` (a trained checkpoint and its
card), :func:`from_registry` (a registry architecture or interpolation baseline),
:func:`domainsr.models.weights.load_weights` (third-party weights through spandrel) and
:func:`domainsr.models.guided.guided_descriptor`. The engine reads scale, receptive radius,
channels, size rules, supported dtypes and tiling advice from the descriptor, and provenance
records its :meth:`ModelDescriptor.record` (real name, kind, checksum), never attributes of a
bare module. :meth:`ModelDescriptor.wrap` is the one place that reads them off a bare
``nn.Module`` (modules handed to the engine directly, as tests and small scripts do).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from domainsr.errors import ConfigError, ModelError
from domainsr.models.registry import WEIGHTS_TEXT

Kind = Literal["checkpoint", "registry", "weights", "module"]
Weights = Literal["trained", "third-party", "untrained", "baseline"]
Tiling = Literal["supported", "discouraged", "internal"]
Application = Literal["direct", "slicewise", "inplane", "guided"]



def _axes(value: Any, nd: int | None, what: str) -> tuple | None:
    if value is None:
        return None
    vals = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if nd is not None and len(vals) == 1:
        vals = vals * nd
    if nd is not None and len(vals) != nd:
        raise ConfigError(f"{what}={value!r} does not fit {nd} spatial axes")
    return vals


@dataclass(frozen=True, eq=False)
class ModelDescriptor:
    """A model ready to run, and what it is.

    ``scale`` and ``receptive_radius`` are per spatial axis (LR pixels; ``None`` radius: unknown,
    the engine blends overlapping tiles). ``dtypes`` are the reduced precisions the network runs
    in under autocast (``"fp16"``, ``"bf16"``). ``size_multiple``/``min_size``: every window the
    network sees must be a multiple of / at least this many LR pixels per axis (the engine pads
    and aligns tiles to it). ``tiling``: ``"supported"``, ``"discouraged"`` (global context: tiles
    may show seams) or ``"internal"`` (the network tiles itself: one window per image is best).
    ``card``: the checkpoint's model card, or the card generated for third-party weights.
    ``sha256``: of the weights file (``None`` for registry models; ``config_sha256`` identifies
    those). ``prepare(img)``: input checks and per-image normalisation, run before inference.
    """

    module: nn.Module
    name: str
    kind: Kind
    architecture: str
    scale: tuple[int, ...]
    spatial_dims: int | None = None
    in_channels: int | None = None
    out_channels: int | None = None
    receptive_radius: tuple[float, ...] | None = None
    version: str | None = None
    sha256: str | None = None
    weights: Weights = "trained"
    bands: tuple[str, ...] = ()
    output_bands: tuple[str, ...] = ()
    units: str = ""
    input_range: tuple[float, float] | None = None
    dtypes: tuple[str, ...] = ("fp16", "bf16")
    size_multiple: int = 1
    min_size: int = 0
    tiling: Tiling = "supported"
    application: Application = "direct"
    card: Any = None
    config: Mapping[str, Any] = field(default_factory=dict)
    prepare: Callable[[Any], Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.module, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(self.module).__name__}")
        nd = self.spatial_dims
        scale = _axes(self.scale, nd, "scale")
        if not scale or any(float(f) != int(f) or f < 1 for f in scale):
            raise ConfigError(f"model {self.name!r} needs whole scale factors >= 1, got {self.scale}")
        object.__setattr__(self, "scale", tuple(int(f) for f in scale))
        radius = _axes(self.receptive_radius, nd or len(self.scale), "receptive_radius")
        if radius is not None and any(not math.isfinite(float(r)) for r in radius):
            radius = None  # a global receptive field is an unknown one to the tiler
        object.__setattr__(self, "receptive_radius", radius)
        if self.size_multiple < 1 or self.min_size < 0:
            raise ConfigError(f"bad size rules for {self.name!r}: multiple of {self.size_multiple}, "
                              f"at least {self.min_size} px")

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def wrap(cls, module: nn.Module, *, scale: int | Sequence[int] | None = None, **changes: Any
             ) -> ModelDescriptor:
        """A descriptor of a bare module, from its ``scale``, ``spatial_dims``, ``in_channels``,
        ``out_channels``, ``receptive_radius`` and ``name`` attributes (registry networks have
        them) or from ``scale=``; the only place that reads a module's attributes."""
        if isinstance(module, ModelDescriptor):
            if scale is not None:
                changes["scale"] = scale
            return replace(module, **changes) if changes else module
        if not isinstance(module, nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(module).__name__}")
        s = scale if scale is not None else getattr(module, "scale", None)
        if s is None:
            raise ConfigError(f"model {type(module).__name__} has no 'scale'; pass scale=")
        card = getattr(module, "card", None)
        base: dict[str, Any] = {
            "module": module, "kind": "module", "scale": s,
            "name": getattr(card, "name", None) or getattr(module, "name", None) or type(module).__name__,
            "architecture": type(module).__name__,
            "spatial_dims": getattr(module, "spatial_dims", None),
            "in_channels": getattr(module, "in_channels", None),
            "out_channels": getattr(module, "out_channels", None),
            "receptive_radius": getattr(module, "receptive_radius", None),
            "sha256": getattr(card, "weights_sha256", None) or getattr(module, "checksum", None),
            "card": card, "prepare": getattr(module, "prepare", None)}
        return cls(**{**base, **changes})

    def with_module(self, module: nn.Module, **changes: Any) -> ModelDescriptor:
        """The same model description around another module (e.g. a slice-wise wrapper)."""
        return replace(self, module=module, **changes)

    # ---- what it is ----------------------------------------------------------------------------
    @property
    def config_sha256(self) -> str | None:
        """For registry models: sha256 of name, scale and options (what fixes a baseline's output)."""
        if self.kind != "registry":
            return None
        payload = {"name": self.name, "scale": list(self.scale), "kwargs": dict(self.config)}
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def checksum(self) -> str | None:
        """The weights' sha256, or ``None`` (registry models: see :attr:`config_sha256`)."""
        return self.sha256

    def supports(self, amp: str) -> bool:
        """Whether the network runs in ``amp`` (``"fp16"``, ``"bf16"``; ``"off"`` always)."""
        return amp == "off" or amp in self.dtypes

    def record(self) -> dict[str, Any]:
        """Plain data for provenance and the audit's model info."""
        out: dict[str, Any] = {
            "name": self.name, "kind": self.kind, "architecture": self.architecture,
            "weights": WEIGHTS_TEXT[self.weights], "version": self.version, "sha256": self.sha256,
            "scale": list(self.scale), "application": self.application,
            "in_channels": self.in_channels, "out_channels": self.out_channels,
            "receptive_radius": None if self.receptive_radius is None else list(self.receptive_radius),
            "units": self.units or None,
            "input_range": None if self.input_range is None else list(self.input_range),
            "dtypes": list(self.dtypes), "tiling": self.tiling,
            "size_rules": {"multiple_of": self.size_multiple, "min_size": self.min_size}}
        if self.kind == "registry":
            out["config"] = dict(self.config)
            out["config_sha256"] = self.config_sha256
        return out

    def history_fields(self) -> dict[str, Any]:
        """The model part of an engine history step."""
        return {"model": self.name, "model_kind": self.kind, "model_checksum": self.sha256,
                "model_version": self.version, "model_weights": WEIGHTS_TEXT[self.weights],
                **({"model_config_sha256": self.config_sha256} if self.kind == "registry" else {})}

    # ---- running -------------------------------------------------------------------------------
    def __call__(self, img: Any) -> Any:
        """Enhance a whole :class:`~domainsr.image.SpatialImage` with default engine settings
        (an enhancer for the audit's test-time augmentation and held-out runs)."""
        import torch

        from domainsr.engine import PatchInferer, enhance_image

        with torch.inference_mode():  # prepare() may update inference-mode buffers of a previous run
            if self.prepare is not None:
                self.prepare(img)
            return enhance_image(img, PatchInferer(self))


# ---------------------------------------------------------------------------------------------
# checkpoints and registry models


def from_checkpoint(path_or_name: Any) -> ModelDescriptor:
    """A verified checkpoint (see :func:`~domainsr.models.checkpoints.load_checkpoint`) as a descriptor."""
    from domainsr.models.checkpoints import load_checkpoint

    module, card = load_checkpoint(path_or_name)
    return checkpoint_descriptor(module, card)


def checkpoint_descriptor(module: nn.Module, card: Any) -> ModelDescriptor:
    """The descriptor of a loaded checkpoint ``module`` (a ``CardModel``) with its ``card``."""
    from domainsr.models.guided import is_guided

    application = "guided" if is_guided(card) else card.application
    return ModelDescriptor(
        module=module, name=card.name, kind="checkpoint", architecture=card.architecture.name,
        scale=tuple(card.scale), spatial_dims=card.spatial_dims, in_channels=card.in_channels,
        out_channels=card.out_channels, receptive_radius=card.receptive_radius, version=card.version,
        sha256=card.weights_sha256 or None, weights="trained", bands=tuple(card.bands),
        output_bands=tuple(card.output_bands), units=card.units,
        input_range=None if card.input_range is None else tuple(card.input_range),
        application=application, card=card, prepare=getattr(module, "prepare", None))


def from_registry(name: str, *, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                  **kwargs: Any) -> ModelDescriptor:
    """Build registry model ``name`` (see :func:`~domainsr.models.registry.build_model`) as a
    descriptor: baselines have no weights, other architectures random (untrained) ones."""
    from domainsr.models.registry import build_model, get_spec

    spec = get_spec(name)
    module = build_model(name, spatial_dims=spatial_dims, in_channels=in_channels, scale=scale, **kwargs)
    return ModelDescriptor(
        module=module, name=spec.name, kind="registry", architecture=spec.name, scale=module.scale,
        spatial_dims=module.spatial_dims, in_channels=module.in_channels, out_channels=module.out_channels,
        receptive_radius=module.receptive_radius, sha256=None, weights=spec.weights,
        config={**spec.defaults, **kwargs})


def as_descriptor(model: ModelDescriptor | nn.Module, **changes: Any) -> ModelDescriptor:
    """``model`` itself when it is a descriptor, else :meth:`ModelDescriptor.wrap` of the module."""
    return ModelDescriptor.wrap(model, **changes)


__all__ = ["WEIGHTS_TEXT", "ModelDescriptor", "as_descriptor", "checkpoint_descriptor", "from_checkpoint",
           "from_registry"]
