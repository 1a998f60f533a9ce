"""Networks and their registry.

``build_model(name, spatial_dims=..., in_channels=..., scale=...)`` imports a model's module only
when it is built (see :mod:`domainsr.models.registry`); ``list_models()`` describes them all.
Everything that loads a model for inference returns a :class:`~domainsr.models.descriptor.ModelDescriptor`
(checkpoints, registry models, third-party weights: :mod:`domainsr.models.weights`).
"""
from __future__ import annotations

from typing import Any

from domainsr.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

__all__ = ["ModelDescriptor", "ModelSpec", "Normalized", "build_model", "get_spec", "list_models",
           "register_model"]


def __getattr__(name: str) -> Any:  # lazy, so importing the registry never imports network code
    if name == "Normalized":
        from domainsr.models.normalized import Normalized

        return Normalized
    if name == "ModelDescriptor":
        from domainsr.models.descriptor import ModelDescriptor

        return ModelDescriptor
    raise AttributeError(f"module 'domainsr.models' has no attribute {name!r}")
