"""The model registry: names -> ``"module:factory"`` strings, imported only when built.

Importing this module imports no network code, so a model file that fails to import (a bad
edit, a missing optional dependency) breaks only its own names. ``defaults`` are the factory's
keyword defaults (a test checks they agree with the signature); unknown keywords are refused.
"""
from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from domainsr.errors import ModelError

#: How ``domainsr models list`` and provenance spell what weights an entry has.
WEIGHTS_TEXT: Mapping[str, str] = MappingProxyType({
    "trained": "trained checkpoint", "third-party": "trained (third-party weights)",
    "untrained": "untrained (random)", "baseline": "baseline (no weights)"})


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    factory: str  # "package.module:callable"
    spatial_dims: tuple[int, ...]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    kind: Literal["sr", "discriminator"] = "sr"

    def __post_init__(self) -> None:
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))

    @property
    def weights(self) -> Literal["untrained", "baseline"]:
        """``"baseline"`` for interpolation (no weights at all), else ``"untrained"``: a registry
        architecture is built with random weights (trained ones come as checkpoints)."""
        return "baseline" if self.family == "baseline" else "untrained"

    @property
    def aliases(self) -> tuple[str, ...]:
        """Other names this model answers to (e.g. ``bicubic`` for ``cubic``)."""
        return tuple(sorted(a for a, n in ALIASES.items() if n == self.name))

    def summary(self) -> dict[str, Any]:
        """Plain data for ``domainsr models`` and JSON."""
        return {"name": self.name, "aliases": list(self.aliases), "family": self.family, "kind": self.kind,
                "spatial_dims": list(self.spatial_dims), "description": self.description,
                "weights": WEIGHTS_TEXT[self.weights], "defaults": dict(self.defaults)}


_M = "domainsr.models."
_REGISTRY: dict[str, ModelSpec] = {}

#: Other names of the interpolation baselines, as the SR literature and other tools call them.
ALIASES: Mapping[str, str] = MappingProxyType({
    "bicubic": "cubic", "tricubic": "cubic", "bilinear": "linear", "trilinear": "linear"})


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add ``spec`` (refuses a name that is taken, also as an alias)."""
    if spec.name in _REGISTRY or spec.name in ALIASES:
        raise ModelError(f"model name {spec.name!r} is already registered")
    if ":" not in spec.factory:
        raise ModelError(f"factory {spec.factory!r} must be 'module:callable'", spec.name)
    _REGISTRY[spec.name] = spec
    return spec


def _builtin() -> None:
    r = register_model
    bd = {"boundary": "replicate"}
    r(ModelSpec("nearest", "baseline", _M + "baselines:nearest", (2, 3), "nearest neighbour (block copy)"))
    r(ModelSpec("linear", "baseline", _M + "baselines:linear", (2, 3), "bilinear / trilinear", bd))
    r(ModelSpec("cubic", "baseline", _M + "baselines:cubic", (2, 3),
                "bicubic / tricubic, separable Keys kernel (a=-0.5; a=-0.75 is torch's bicubic)", {**bd, "a": -0.5}))
    r(ModelSpec("lanczos", "baseline", _M + "baselines:lanczos", (2, 3), "separable Lanczos-3", bd))
    base = {"base": None}
    r(ModelSpec("rescnn", "rescnn", _M + "rescnn:ResCNN", (2, 3),
                "light residual CNN over an interpolation base (ANCHORS.md); the main shipped family",
                {"n_blocks": 8, "n_feats": 32, **base, "zero_init_tail": True}))
    r(ModelSpec("span", "span", _M + "span:SPAN", (2, 3),
                "SPAN-style swift parameter-free attention blocks over an interpolation base (NTIRE 2024)",
                {"n_blocks": 6, "n_feats": 32, **base, "zero_init_tail": True}))
    r(ModelSpec("guided_rescnn", "guided", _M + "guided:GuidedResCNN", (2, 3),
                "guided residual CNN on the HR grid (DSen2-style): LR bands + finer guide bands",
                {"guide_channels": 0, "n_blocks": 8, "n_feats": 32, **base, "zero_init_tail": True}))
    r(ModelSpec("srcnn", "srcnn", _M + "srcnn:SRCNN", (2, 3), "SRCNN 9-1-5 on the interpolated input",
                {"features": (64, 32), "kernels": (9, 1, 5), **base}))
    r(ModelSpec("vdsr", "vdsr", _M + "vdsr:VDSR", (2, 3), "VDSR: 20 convs, residual over the interpolated input",
                {"depth": 20, "n_feats": 64, **base}))
    r(ModelSpec("espcn", "espcn", _M + "espcn:ESPCN", (2, 3), "ESPCN: LR convs and a sub-pixel output layer",
                {"features": (64, 32), "act": "tanh"}))
    r(ModelSpec("fsrcnn", "fsrcnn", _M + "fsrcnn:FSRCNN", (2, 3),
                "FSRCNN: shrink/map/expand and a transposed conv with per-axis stride",
                {"d": 56, "s": 12, "m": 4}))
    r(ModelSpec("edsr", "edsr", _M + "edsr:EDSR", (2, 3), "EDSR (baseline size 16x64 by default)",
                {"n_resblocks": 16, "n_feats": 64, "res_scale": 1.0}))
    r(ModelSpec("mdsr", "edsr", _M + "edsr:MDSR", (2, 3), "MDSR: shared body, heads per scale",
                {"scales": (2, 3, 4), "n_resblocks": 16, "n_feats": 64}))
    r(ModelSpec("rcan", "rcan", _M + "rcan:RCAN", (2, 3),
                "RCAN-style residual groups with (local-window) channel attention",
                {"n_resgroups": 4, "n_resblocks": 8, "n_feats": 64, "reduction": 16, "ca_radius": 3}))
    r(ModelSpec("srresnet", "srresnet", _M + "srresnet:SRResNet", (2, 3), "SRResNet (SRGAN generator)",
                {"n_blocks": 16, "n_feats": 64, "batch_norm": False}))
    r(ModelSpec("rrdbnet", "rrdbnet", _M + "rrdbnet:RRDBNet", (2, 3), "RRDBNet (ESRGAN generator), small default",
                {"n_blocks": 6, "n_feats": 64, "growth": 32}))
    r(ModelSpec("repsr", "repsr", _M + "repsr:RepSR", (2, 3),
                "re-parameterisable multi-branch blocks (RepVGG/ECBSR) folding to plain convs",
                {"n_blocks": 4, "n_feats": 16, "act": "prelu", "axial": True, "expand": 2, "edge": True,
                 **base, "deploy": False}))
    r(ModelSpec("vgg_discriminator", "discriminator", _M + "discriminators:VGGDiscriminator", (2, 3),
                "SRGAN VGG-style discriminator, one logit per image", {"n_feats": 64, "n_stages": 4,
                                                                      "batch_norm": True,
                                                                      "use_spectral_norm": False},
                kind="discriminator"))
    r(ModelSpec("unet_discriminator", "discriminator", _M + "discriminators:UNetDiscriminatorSN", (2, 3),
                "Real-ESRGAN U-Net discriminator with spectral norm, one logit per pixel",
                {"n_feats": 64, "skip_connection": True}, kind="discriminator"))


_builtin()


def list_models(kind: str | None = None) -> list[ModelSpec]:
    """Registered models, sorted by name (optionally only one ``kind``)."""
    return [s for n, s in sorted(_REGISTRY.items()) if kind is None or s.kind == kind]


def canonical_name(name: str) -> str:
    """The registered name ``name`` stands for (``bicubic`` -> ``cubic``); unknown names unchanged."""
    return ALIASES.get(name, name)


def get_spec(name: str) -> ModelSpec:
    """The spec of registered model ``name`` or one of its aliases."""
    try:
        return _REGISTRY[canonical_name(name)]
    except KeyError:
        raise ModelError(f"unknown model; registered: {sorted(_REGISTRY)}", name) from None


def load_factory(spec: ModelSpec):
    module, _, attr = spec.factory.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except Exception as exc:  # ImportError, SyntaxError, AttributeError...: only this model fails
        raise ModelError(f"cannot import {spec.factory}: {type(exc).__name__}: {exc}", spec.name) from exc


def build_model(name: str, *, spatial_dims: int, in_channels: int, scale: int | Sequence[int] | None = None,
                out_channels: int | None = None, **kwargs: Any):
    """Build registered model ``name``.

    SR models need ``scale`` (int or one int per spatial axis) and map ``(N, in_channels, *sp)``
    to ``(N, out_channels or in_channels, *(sp * scale))``. Discriminators take no scale or
    out_channels. Unknown keywords raise :class:`ModelError`.
    """
    spec = get_spec(name)
    if spatial_dims not in spec.spatial_dims:
        raise ModelError(f"spatial_dims={spatial_dims} is not supported (supported: {spec.spatial_dims})", name)
    unknown = sorted(set(kwargs) - set(spec.defaults))
    if unknown:
        raise ModelError(f"unknown option(s) {unknown}; options are {sorted(spec.defaults)}", name)
    factory = load_factory(spec)
    params = {**spec.defaults, **kwargs}
    try:
        if spec.kind == "discriminator":
            if scale is not None or out_channels is not None:
                raise ModelError("a discriminator takes no scale or out_channels", name)
            return factory(spatial_dims=spatial_dims, in_channels=in_channels, **params)
        if scale is None:
            raise ModelError("an SR model needs a scale", name)
        return factory(spatial_dims=spatial_dims, in_channels=in_channels, scale=scale,
                       out_channels=out_channels, **params)
    except ModelError as exc:
        if exc.path:
            raise
        raise ModelError(exc.message, name) from exc
    except (TypeError, ValueError) as exc:
        raise ModelError(f"invalid options {kwargs}: {exc}", name) from exc
