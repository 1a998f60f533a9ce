"""Networks and their registry.

``build_model(name, spatial_dims=..., in_channels=..., scale=...)`` imports a model's module only
when it is built (see :mod:`domainsr.models.registry`); ``list_models()`` describes them all.
"""
from __future__ import annotations

from typing import Any

from domainsr.models.registry import ModelSpec, build_model, get_spec, list_models, register_model

__all__ = ["ModelSpec", "Normalized", "build_model", "get_spec", "list_models", "register_model"]


def __getattr__(name: str) -> Any:  # lazy, so importing the registry never imports network code
    if name == "Normalized":
        from domainsr.models.normalized import Normalized

        return Normalized
    raise AttributeError(f"module 'domainsr.models' has no attribute {name!r}")
