"""The Degradation interface, composition, random choice and the registry behind ``build_degradation``.

A degradation maps an HR array ``(C, *spatial)`` to its LR counterpart, float32, drawing every
random number from the ``numpy.random.Generator`` it is given (same generator state, same
output). ``describe()`` returns plain JSON data that ``build_degradation`` turns back into an
equal object; derived, informative numbers (e.g. the PSF sigma) sit under ``"derived"``.
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

from domainsr.errors import ConfigError


def _plain(v: Any) -> Any:
    if isinstance(v, Degradation):
        return v.describe()
    if isinstance(v, (tuple, list)):
        return [_plain(a) for a in v]
    if isinstance(v, Mapping):
        return {str(k): _plain(a) for k, a in v.items()}
    if isinstance(v, np.generic):
        return v.item()
    return v


@dataclasses.dataclass(frozen=True)
class Degradation:
    """Base class: subclasses are frozen dataclasses with a ``kind`` and ``__call__``."""

    kind: ClassVar[str] = ""

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:  # pragma: no cover
        raise NotImplementedError

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        """HR/LR size ratio per spatial axis (all 1 for noise-only steps)."""
        return (1,) * spatial_dims

    def derived(self) -> dict[str, Any]:
        """Informative numbers computed from the parameters (not needed to rebuild)."""
        return {}

    def describe(self) -> dict[str, Any]:
        out = {"kind": self.kind}
        out.update({f.name: _plain(getattr(self, f.name)) for f in dataclasses.fields(self)})
        extra = self.derived()
        if extra:
            out["derived"] = _plain(extra)
        return out


@dataclasses.dataclass(frozen=True)
class Compose(Degradation):
    """Apply ``steps`` in order (e.g. k-space truncation, then Rician noise)."""

    kind: ClassVar[str] = "compose"
    steps: tuple[Degradation, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))
        if not self.steps or not all(isinstance(s, Degradation) for s in self.steps):
            raise ConfigError("compose needs a non-empty list of degradation steps")

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = hr
        for step in self.steps:
            x = step(x, rng)
        return x

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        out = np.ones(spatial_dims, dtype=int)
        for s in self.steps:
            out *= np.asarray(s.factors(spatial_dims))
        return tuple(int(v) for v in out)


@dataclasses.dataclass(frozen=True)
class OneOf(Degradation):
    """Each call applies one of ``options``, drawn with the generator (``weights``: relative odds,
    default equal): training pairs from a mix of acquisition physics, e.g. block averaging and
    k-space truncation for MRI. Without a generator (the noise-free operator of the audit's
    LR-consistency check) it is the first option, the primary."""

    kind: ClassVar[str] = "one_of"
    options: tuple[Degradation, ...] = ()
    weights: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", tuple(self.options))
        if not self.options or not all(isinstance(o, Degradation) for o in self.options):
            raise ConfigError("one_of needs a non-empty list of degradation options")
        if self.weights is not None:
            w = tuple(float(v) for v in self.weights)
            if len(w) != len(self.options) or any(not np.isfinite(v) or v < 0 for v in w) or sum(w) <= 0:
                raise ConfigError(f"one_of weights {list(w)} must be one non-negative number per option")
            object.__setattr__(self, "weights", w)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator | None) -> np.ndarray:
        if rng is None:
            return self.options[0](hr, rng)
        p = None if self.weights is None else np.asarray(self.weights) / sum(self.weights)
        return self.options[int(rng.choice(len(self.options), p=p))](hr, rng)

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        found = {o.factors(spatial_dims) for o in self.options}
        if len(found) != 1:
            raise ConfigError(f"one_of options must share their scale factors, got {sorted(found)}")
        return found.pop()


_KINDS: dict[str, str] = {
    "compose": "domainsr.degrade.base:Compose",
    "one_of": "domainsr.degrade.base:OneOf",
    "optical": "domainsr.degrade.optical:OpticalDegradation",
    "gaussian_mean": "domainsr.degrade.optical:GaussianMean",
    "kspace": "domainsr.degrade.mri:KSpaceTruncation",
    "slice_profile": "domainsr.degrade.mri:SliceProfile",
    "rician": "domainsr.degrade.mri:RicianNoise",
    "mri": "domainsr.degrade.mri:MRIDegradation",
    "thick_slices": "domainsr.degrade.ct:ThickSlices",
    "hu_noise": "domainsr.degrade.ct:HUNoise",
    "ct": "domainsr.degrade.ct:CTDegradation",
    "blind": "domainsr.degrade.blind:BlindDegradation",
}


#: Parameters that draw random numbers (set to zero for the noise-free form) and kinds that are only noise.
NOISE_KEYS = ("noise_sigma", "shot_noise", "mtf_jitter", "rician_sigma", "sigma_hu")
NOISE_KINDS = ("rician", "hu_noise")


def primary_spec(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``spec`` itself, or for a training mix (``one_of``) its first option: the one physics an
    audit measures against (held-out pair and LR-consistency check alike)."""
    spec = dict(spec)
    while spec.get("kind") == "one_of" and spec.get("options"):
        spec = dict(spec["options"][0])
    return spec


def noise_free_spec(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The deterministic form of a degradation spec (``describe()`` output): noise and PSF jitter
    set to zero, pure-noise steps dropped, a mix reduced to its primary. ``{}`` when nothing but
    noise is left; ``None`` for random degradations (``blind``), which have no such form."""
    spec = primary_spec(spec)
    kind = spec.get("kind")
    if kind == "blind":
        return None
    if kind in NOISE_KINDS:
        return {}
    if kind == "compose":
        steps = [noise_free_spec(s) for s in spec.get("steps", [])]
        if any(s is None for s in steps):
            return None
        steps = [s for s in steps if s]
        return {"kind": "compose", "steps": steps} if steps else {}
    return {k: (0.0 if k in NOISE_KEYS else v) for k, v in spec.items() if k != "derived"}


def degradation_kinds() -> list[str]:
    return sorted(_KINDS)


def degradation_class(kind: str) -> type[Degradation]:
    if kind not in _KINDS:
        raise ConfigError(f"unknown degradation kind {kind!r}; known: {degradation_kinds()}")
    module, _, name = _KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def build_degradation(spec: Mapping[str, Any]) -> Degradation:
    """``{"kind": "optical", "scale": 2, "mtf": 0.25, ...}`` -> a Degradation (strict: an unknown
    key is a ConfigError naming it). ``"derived"`` (from ``describe()``) is ignored."""
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise ConfigError(f"a degradation spec needs a 'kind', got {spec!r}")
    params = {k: v for k, v in spec.items() if k not in ("kind", "derived")}
    cls = degradation_class(str(spec["kind"]))
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(params) - names)
    if unknown:
        raise ConfigError(f"degradation {spec['kind']!r}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    if cls is Compose:
        steps = params.get("steps")
        if not isinstance(steps, Sequence) or isinstance(steps, (str, bytes)):
            raise ConfigError("compose needs 'steps': a list of degradation specs")
        params["steps"] = tuple(s if isinstance(s, Degradation) else build_degradation(s) for s in steps)
    if cls is OneOf:
        options = params.get("options")
        if not isinstance(options, Sequence) or isinstance(options, (str, bytes)):
            raise ConfigError("one_of needs 'options': a list of degradation specs")
        params["options"] = tuple(o if isinstance(o, Degradation) else build_degradation(o) for o in options)
    try:
        return cls(**params)
    except TypeError as exc:
        raise ConfigError(f"degradation {spec['kind']!r}: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class NoiseFreeOperator:
    """A degradation's deterministic form as ``x -> lr`` (``degradation(x, rng=None)``): the operator
    an audit re-degrades SR with to check it against its LR input. ``describe()`` is the
    degradation's own description, or, with a ``note``, the noise-free ``spec`` and the note."""

    degradation: Degradation
    spec: dict[str, Any]
    note: str | None = None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.degradation(np.asarray(x, np.float32), None), np.float32)

    def describe(self) -> dict[str, Any]:
        return {**self.spec, "note": self.note} if self.note else self.degradation.describe()


def noise_free_operator(degradation: Degradation | Mapping[str, Any] | None, scale: Sequence[int], channels: int,
                        *, note: str | None = None) -> NoiseFreeOperator | None:
    """The noise-free operator of ``degradation`` (a Degradation, anything with ``describe()``, or
    its spec) for ``channels`` bands at ``scale``, or ``None`` when it has no deterministic form:
    random blind degradations, pure noise, an operator that needs random numbers, or no spec."""
    spec = degradation if isinstance(degradation, Mapping) else getattr(degradation, "describe", lambda: None)()
    clean = noise_free_spec(spec) if isinstance(spec, Mapping) and "kind" in spec else None
    if not clean:
        return None
    op = NoiseFreeOperator(build_degradation(clean), clean, note)
    try:  # rng=None is the noise-free form; a degradation that needs random numbers has none
        op(np.zeros((channels, *(4 * int(f) for f in scale)), np.float32))
    except (AttributeError, TypeError):
        return None
    return op
