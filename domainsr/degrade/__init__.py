"""The physics of low resolution, per domain (training pairs and held-out audits; never inference).

Every degradation is a small object ``deg(hr, rng) -> lr`` on ``(C, *spatial)`` float32 arrays
with per-axis integer factors, deterministic given a ``numpy.random.Generator``, and
``deg.describe()`` gives JSON for the model card; ``build_degradation(spec)`` builds one from
such a dict. Kinds: ``optical``, ``gaussian_mean`` (ANCHORS.md's reference operator), ``kspace``,
``slice_profile``, ``rician``, ``thick_slices``, ``hu_noise``, ``blind``, ``compose``, ``one_of`` (a
random choice per pair: a mix of acquisition physics) and the
domain presets ``mri`` (slice profile / k-space truncation / Rician) and ``ct`` (thick slices,
noise in HU, clipping).
"""
from domainsr.degrade.base import (
    Compose,
    Degradation,
    NoiseFreeOperator,
    OneOf,
    build_degradation,
    degradation_kinds,
    noise_free_operator,
    noise_free_spec,
    primary_spec,
)

__all__ = ["Compose", "Degradation", "NoiseFreeOperator", "OneOf", "build_degradation", "degradation_kinds",
           "noise_free_operator", "noise_free_spec", "primary_spec"]
