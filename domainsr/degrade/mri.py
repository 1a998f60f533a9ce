"""MRI: k-space truncation, slice profiles and Rician noise.

* :func:`kspace_truncate` keeps the central ``N / f`` k-space samples per axis (what a lower
  acquisition matrix measures), optionally tapered (along the truncated axes) by a Hamming or
  Tukey window to limit Gibbs ringing, and returns the magnitude image. A linear phase moves
  the LR samples to the LR voxel centres (HR coordinate ``f*m + (f-1)/2``), so the result lines
  up with ``geometry.scaled``; the intensity scale is kept (a constant image stays constant).
* :func:`slice_profile` averages along one axis with a box or Gaussian slice-sensitivity
  profile of a given FWHM (in HR slices, default the factor) and decimates.
* :func:`rician_noise` gives ``|x + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma^2)``; on a zero
  background its mean is ``sigma * sqrt(pi / 2)``.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import numpy as np

from domainsr.degrade.base import Degradation
from domainsr.degrade.sampling import (
    as_factors,
    as_image,
    box_weights,
    check_divisible,
    decimate_axis,
    gaussian_weights,
)
from domainsr.errors import ConfigError, InputError

FWHM_TO_SIGMA = 1.0 / (2.0 * np.sqrt(2.0 * np.log(2.0)))


def _window(k: np.ndarray, half: float, window: str | None, alpha: float) -> np.ndarray:
    """Taper over signed frequency indices ``k`` (|k| <= half), 1 at DC."""
    r = np.abs(k) / half
    if window is None:
        return np.ones_like(r)
    if window == "hamming":
        return 0.54 + 0.46 * np.cos(np.pi * np.minimum(r, 1.0))
    if window == "tukey":
        if alpha <= 0:
            return np.ones_like(r)
        edge = 1.0 - alpha
        return np.where(r <= edge, 1.0, 0.5 * (1 + np.cos(np.pi * (np.minimum(r, 1.0) - edge) / alpha)))
    raise ConfigError(f"unknown k-space window {window!r}; use null, 'hamming' or 'tukey'")


def kspace_truncate(x: np.ndarray, factors: Sequence[int], window: str | None = None,
                    tukey_alpha: float = 0.5) -> np.ndarray:
    """Magnitude image from the central ``1/f`` of k-space per spatial axis of ``(C, *spatial)``."""
    x = as_image(x, "HR image")
    d = x.ndim - 1
    f = as_factors(factors, d)
    lr = check_divisible(x.shape[1:], f)
    axes = tuple(range(1, d + 1))
    k = np.fft.fftn(x.astype(np.float64), axes=axes)
    for a, (n, m, fa) in enumerate(zip(x.shape[1:], lr, f)):
        if fa == 1:
            continue
        ax = a + 1
        keep = np.fft.fftfreq(m, 1.0 / m).astype(int)  # the m lowest, in fft order
        k = np.take(k, np.where(keep < 0, keep + n, keep), axis=ax)
        shift = (fa - 1) / 2.0  # sample at the LR voxel centres (HR coordinate f*m + (f-1)/2)
        taper = _window(keep.astype(float), m / 2.0, window, tukey_alpha)
        phase = taper * np.exp(2j * np.pi * keep * shift / n)
        shape = [1] * k.ndim
        shape[ax] = m
        k = k * phase.reshape(shape)
    img = np.fft.ifftn(k, axes=axes) / float(np.prod(f))
    return np.abs(img).astype(np.float32)


def slice_profile(x: np.ndarray, axis: int, factor: int, profile: str = "box",
                  fwhm: float | None = None) -> np.ndarray:
    """Average along spatial ``axis`` with a ``box`` or ``gaussian`` profile of ``fwhm`` HR slices
    (default ``factor``: contiguous slices), integrated over each HR slice, then keep every
    ``factor``-th (centred) slab."""
    x = as_image(x, "HR image")
    ax = spatial_axis(axis, x.ndim - 1)
    width = float(factor if fwhm is None else fwhm)
    if width <= 0:
        raise ConfigError(f"slice profile FWHM must be > 0, got {fwhm}")
    if profile == "box":
        t0, w = box_weights(factor, width)
    elif profile == "gaussian":
        t0, w = gaussian_weights(factor, width * FWHM_TO_SIGMA, integrate=True)
    else:
        raise ConfigError(f"unknown slice profile {profile!r}; use 'box' or 'gaussian'")
    return decimate_axis(x, ax, factor, t0, w)


def rician_noise(x: np.ndarray, sigma: float | np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``|x + n1 + i n2|`` with independent ``N(0, sigma^2)`` real and imaginary parts (``sigma``
    a number or an array broadcasting against ``x``, e.g. one value per channel)."""
    x = as_image(x, "image")
    n1 = rng.standard_normal(x.shape) * sigma
    n2 = rng.standard_normal(x.shape) * sigma
    return np.hypot(x + n1, n2).astype(np.float32)


def spatial_axis(axis: int, ndim: int) -> int:
    """``axis`` (negative: from the end) as an index into ``ndim`` spatial axes; InputError if absent."""
    if not -ndim <= axis < ndim:
        raise InputError(f"axis {axis} does not exist in an image with {ndim} spatial axes")
    return axis % ndim


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class KSpaceTruncation(Degradation):
    kind: ClassVar[str] = "kspace"
    scale: int | tuple[int, ...] = 2
    window: Literal["hamming", "tukey"] | None = None
    tukey_alpha: float = 0.5

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _tuple(self.scale))
        _window(np.zeros(1), 1.0, self.window, self.tukey_alpha)  # validates
        if not 0.0 <= self.tukey_alpha <= 1.0:
            raise ConfigError(f"tukey_alpha must be in [0, 1], got {self.tukey_alpha}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        return as_factors(self.scale, spatial_dims)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return kspace_truncate(hr, self.factors(np.ndim(hr) - 1), self.window, self.tukey_alpha)


@dataclasses.dataclass(frozen=True)
class SliceProfile(Degradation):
    kind: ClassVar[str] = "slice_profile"
    axis: int = -1
    factor: int = 2
    profile: Literal["box", "gaussian"] = "box"
    fwhm: float | None = None

    def __post_init__(self) -> None:
        if int(self.factor) < 1:
            raise ConfigError(f"factor must be >= 1, got {self.factor}")
        if self.profile not in ("box", "gaussian"):
            raise ConfigError(f"unknown slice profile {self.profile!r}; use 'box' or 'gaussian'")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        out = [1] * spatial_dims
        out[spatial_axis(self.axis, spatial_dims)] = int(self.factor)
        return tuple(out)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return slice_profile(hr, self.axis, int(self.factor), self.profile, self.fwhm)


@dataclasses.dataclass(frozen=True)
class RicianNoise(Degradation):
    """Rician noise; ``sigma`` is absolute, or relative to each channel's 99th percentile
    (a robust signal maximum) when ``relative`` (the default)."""

    kind: ClassVar[str] = "rician"
    sigma: float = 0.02
    relative: bool = True

    def __post_init__(self) -> None:
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "image")
        if not self.relative:
            return rician_noise(x, self.sigma, rng)
        ref = np.percentile(x.reshape(x.shape[0], -1), 99, axis=1)
        return rician_noise(x, (self.sigma * ref).reshape((-1,) + (1,) * (x.ndim - 1)), rng)


@dataclasses.dataclass(frozen=True)
class MRIDegradation(Degradation):
    """A low-resolution MR acquisition: slice-selected axes get a slice profile (``profile``,
    ``fwhm`` in HR slices, default the factor), the other axes with a factor > 1 get k-space
    truncation (``window``), then Rician noise (``rician_sigma`` relative to the 99th percentile;
    0 = none).

    ``slice_axes=None`` picks them from the scale: an isotropic scale is a 3D acquisition with a
    smaller matrix (k-space on every axis); otherwise the axes with the largest factor are the
    slice axes (e.g. ``(1, 1, 4)`` thick slices along k, or ``(1, 4)`` through-plane planes).
    """

    kind: ClassVar[str] = "mri"
    scale: int | tuple[int, ...] = 2
    slice_axes: tuple[int, ...] | None = None
    profile: Literal["box", "gaussian"] = "box"
    fwhm: float | None = None
    window: Literal["hamming", "tukey"] | None = None
    tukey_alpha: float = 0.5
    rician_sigma: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _tuple(self.scale))
        if self.slice_axes is not None:
            object.__setattr__(self, "slice_axes", tuple(int(a) for a in self.slice_axes))
        _window(np.zeros(1), 1.0, self.window, self.tukey_alpha)
        if self.profile not in ("box", "gaussian"):
            raise ConfigError(f"unknown slice profile {self.profile!r}; use 'box' or 'gaussian'")
        if self.rician_sigma < 0:
            raise ConfigError(f"rician_sigma must be >= 0, got {self.rician_sigma}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        return as_factors(self.scale, spatial_dims)

    def split_axes(self, spatial_dims: int) -> tuple[list[int], list[int]]:
        """(slice-profile axes, k-space axes) among the axes with a factor > 1."""
        f = self.factors(spatial_dims)
        if self.slice_axes is None:
            top = max(f)
            slices = [] if len(set(f)) == 1 else [a for a, v in enumerate(f) if v == top]
        else:
            slices = sorted({spatial_axis(a, spatial_dims) for a in self.slice_axes})
        return ([a for a in slices if f[a] > 1],
                [a for a, v in enumerate(f) if v > 1 and a not in slices])

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "HR image")
        d = x.ndim - 1
        f = self.factors(d)
        check_divisible(x.shape[1:], f)
        slices, kaxes = self.split_axes(d)
        for a in slices:
            x = slice_profile(x, a, f[a], self.profile, self.fwhm)
        if kaxes:
            x = kspace_truncate(x, [f[a] if a in kaxes else 1 for a in range(d)], self.window, self.tukey_alpha)
        if self.rician_sigma > 0:
            x = RicianNoise(self.rician_sigma)(x, rng)
        return x
