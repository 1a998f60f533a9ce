"""CT: thick-slice averaging along an axis, noise in Hounsfield units and clipping to the HU range.

A thick slice of thickness ``T`` (in HR slices; default the factor, i.e. contiguous slices of
``factor x spacing`` mm) is the box-profile average of the HR slices it covers, partial volumes
at its edges weighted by overlap; LR slice ``m`` is centred at HR coordinate ``f*m + (f-1)/2``.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np

from domainsr.degrade.base import Degradation
from domainsr.degrade.mri import slice_profile, spatial_axis
from domainsr.degrade.sampling import as_factors, as_image, check_divisible
from domainsr.errors import ConfigError

HU_RANGE = (-1024.0, 3071.0)  # 12-bit CT with the usual -1024 intercept


def thick_slices(x: np.ndarray, axis: int, factor: int, thickness: float | None = None) -> np.ndarray:
    """Box average of ``thickness`` HR slices (default ``factor``) around each LR slice centre."""
    return slice_profile(x, axis, factor, "box", thickness)


def clip_hu(x: np.ndarray, hu_range: tuple[float, float] = HU_RANGE) -> np.ndarray:
    return np.clip(x, hu_range[0], hu_range[1]).astype(np.float32, copy=False)


def hu_noise(x: np.ndarray, sigma_hu: float, rng: np.random.Generator,
             hu_range: tuple[float, float] | None = HU_RANGE) -> np.ndarray:
    """Additive Gaussian noise of ``sigma_hu`` HU, then clipping to ``hu_range`` (None: no clip)."""
    x = as_image(x, "CT image")
    y = (x + sigma_hu * rng.standard_normal(x.shape)).astype(np.float32)
    return y if hu_range is None else clip_hu(y, hu_range)


@dataclasses.dataclass(frozen=True)
class ThickSlices(Degradation):
    kind: ClassVar[str] = "thick_slices"
    axis: int = -1
    factor: int = 4
    thickness: float | None = None

    def __post_init__(self) -> None:
        if int(self.factor) < 1:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")
        if self.thickness is not None and self.thickness <= 0:
            raise ConfigError(f"thickness must be > 0 HR slices, got {self.thickness}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        out = [1] * spatial_dims
        out[spatial_axis(self.axis, spatial_dims)] = int(self.factor)
        return tuple(out)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return thick_slices(hr, self.axis, int(self.factor), self.thickness)


@dataclasses.dataclass(frozen=True)
class HUNoise(Degradation):
    kind: ClassVar[str] = "hu_noise"
    sigma_hu: float = 10.0
    hu_range: tuple[float, float] | None = HU_RANGE

    def __post_init__(self) -> None:
        if self.hu_range is not None:
            object.__setattr__(self, "hu_range", tuple(float(v) for v in self.hu_range))
            if len(self.hu_range) != 2 or self.hu_range[0] >= self.hu_range[1]:
                raise ConfigError(f"hu_range must be [low, high], got {self.hu_range}")
        if self.sigma_hu < 0:
            raise ConfigError(f"sigma_hu must be >= 0, got {self.sigma_hu}")

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return hu_noise(hr, self.sigma_hu, rng, self.hu_range)


@dataclasses.dataclass(frozen=True)
class CTDegradation(Degradation):
    """Thick slices along every axis with a factor > 1 (box of ``thickness`` HR slices, default
    the factor), then ``sigma_hu`` Gaussian noise and clipping to ``hu_range``."""

    kind: ClassVar[str] = "ct"
    scale: int | tuple[int, ...] = (1, 1, 4)
    thickness: float | None = None
    sigma_hu: float = 0.0
    hu_range: tuple[float, float] | None = HU_RANGE

    def __post_init__(self) -> None:
        if isinstance(self.scale, (list, tuple)):
            object.__setattr__(self, "scale", tuple(self.scale))
        HUNoise(self.sigma_hu, self.hu_range)  # validates
        if self.hu_range is not None:
            object.__setattr__(self, "hu_range", tuple(float(v) for v in self.hu_range))
        if self.thickness is not None and self.thickness <= 0:
            raise ConfigError(f"thickness must be > 0 HR slices, got {self.thickness}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        return as_factors(self.scale, spatial_dims)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "CT image")
        f = self.factors(x.ndim - 1)
        check_divisible(x.shape[1:], f)
        for a, fa in enumerate(f):
            if fa > 1:
                x = thick_slices(x, a, fa, self.thickness)
        if self.sigma_hu > 0:
            return hu_noise(x, self.sigma_hu, rng, self.hu_range)
        return x if self.hu_range is None else clip_hu(x, self.hu_range)
