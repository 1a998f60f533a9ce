"""Optical sensors: per-band Gaussian PSF from the MTF at the LR Nyquist frequency, decimation and
noise in DN.

PSF from the MTF. A Gaussian PSF of std ``sigma`` (HR pixels) has the transfer function
``MTF(nu) = exp(-2 pi^2 sigma^2 nu^2)`` (``nu`` in cycles per HR pixel). The LR grid (factor
``f``) has its Nyquist frequency at ``nu_N = 1 / (2 f)``, so ``MTF(nu_N) = exp(-pi^2 sigma^2 /
(2 f^2))``; asking for the value ``m`` there gives

    sigma = f * sqrt(-2 ln m) / pi        (HR pixels).

The quoted MTF at Nyquist of a sensor (e.g. Sentinel-2 MSI, 0.15-0.3 by specification) is the
*system* MTF (optics, detector footprint, motion), so the Gaussian is the whole system PSF and
the LR pixel is a *point sample* of the blurred image at the LR pixel centre (HR coordinate
``f*m + (f-1)/2``, between HR pixels for even ``f``): ``lr[m] = sum_t g(t - c_m) hr[t]`` with the
Gaussian sampled at the HR pixel centres and normalised (the usual Wald-protocol simulation,
as in pansharpening and DSen2/S2Sharp). Adding a box (area mean) on top would lower the MTF
below the requested value. For MTF <= 0.5 the sampled kernel reproduces the requested value to
within 0.002 (``tests/degrade``).

Noise in DN: additive Gaussian read noise ``noise_sigma`` and signal-dependent shot noise with
variance ``shot_noise * max(x, 0)`` (the Gaussian approximation of Poisson counts).
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
from scipy.ndimage import gaussian_filter

from domainsr.degrade.base import Degradation
from domainsr.degrade.sampling import (
    as_factors,
    as_image,
    block_mean,
    check_divisible,
    decimate_axis,
    gaussian_weights,
    response,
)
from domainsr.errors import ConfigError

# MTF at Nyquist per band of Sentinel-2 MSI (the values used by SupReME/S2Sharp, Ulfarsson et
# al. 2019, from the MSI calibration data; B10 is not listed there).
SENTINEL2_MTF: dict[str, float] = {
    "B01": 0.32, "B02": 0.26, "B03": 0.28, "B04": 0.24, "B05": 0.38, "B06": 0.34, "B07": 0.34,
    "B08": 0.26, "B8A": 0.33, "B09": 0.26, "B11": 0.22, "B12": 0.23,
}
# Landsat 8/9 OLI: one generic value inside the 0.2-0.3 range reported for OLI's MTF at Nyquist
# (not a per-band measurement; replace it with measured values where they are available).
LANDSAT_OLI_MTF: dict[str, float] = {f"B{i}": 0.25 for i in range(1, 10)}
SENSORS: dict[str, dict[str, float]] = {"sentinel2": SENTINEL2_MTF, "landsat8": LANDSAT_OLI_MTF,
                                        "landsat9": LANDSAT_OLI_MTF}


def sigma_from_mtf(mtf: float, factor: int) -> float:
    """Std (HR pixels) of the Gaussian PSF whose MTF at the LR Nyquist frequency is ``mtf``."""
    if not 0.0 < mtf < 1.0:
        raise ConfigError(f"MTF at Nyquist must be in (0, 1), got {mtf}")
    return float(factor * np.sqrt(-2.0 * np.log(mtf)) / np.pi)


def mtf_from_sigma(sigma: float, factor: int) -> float:
    """The inverse of :func:`sigma_from_mtf` (continuous Gaussian)."""
    return float(np.exp(-(np.pi * sigma / factor) ** 2 / 2.0))


def _band_key(name: str, sensor: str) -> str:
    b = name.strip().upper()
    m = re.fullmatch(r"B0*(\d+)(A?)", b)
    if not m:
        return b
    num, a = m.groups()
    if sensor == "sentinel2" and not a:
        return f"B{int(num):02d}"
    return f"B{int(num)}{a}"


def sensor_mtf(sensor: str, bands: Sequence[str]) -> list[float]:
    """MTF at Nyquist for ``bands`` (``'B2'``, ``'B02'``, ``'B8A'`` ...) of ``sensor``."""
    table = SENSORS.get(sensor.lower())
    if table is None:
        raise ConfigError(f"no MTF table for sensor {sensor!r}; known: {sorted(SENSORS)}")
    out = []
    for b in bands:
        key = _band_key(b, sensor.lower())
        if key not in table:
            raise ConfigError(f"no MTF value for band {b!r} of {sensor}; known: {sorted(table)}")
        out.append(table[key])
    return out


def add_noise(x: np.ndarray, rng: np.random.Generator, sigma: float, shot: float) -> np.ndarray:
    """Gaussian read noise (std ``sigma``) plus shot noise (variance ``shot * max(x, 0)``)."""
    if sigma <= 0 and shot <= 0:
        return x
    var = np.full(x.shape, float(sigma) ** 2, dtype=np.float64)
    if shot > 0:
        var += shot * np.maximum(x, 0.0)
    return (x + np.sqrt(var) * rng.standard_normal(x.shape)).astype(np.float32)


def psf_decimate(x: np.ndarray, factors: Sequence[int], sigmas: Sequence[float]) -> np.ndarray:
    """Blur every channel of ``(C, *spatial)`` with a Gaussian PSF (std per axis, HR pixels) and
    point-sample it at the LR pixel centres."""
    for ax, (f, s) in enumerate(zip(factors, sigmas)):
        if f > 1 or s > 0:
            t0, w = gaussian_weights(f, s, integrate=False)
            x = decimate_axis(x, ax, f, t0, w)
    return x


def _tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, (list, tuple)) else v


@dataclasses.dataclass(frozen=True)
class OpticalDegradation(Degradation):
    """Per-band Gaussian PSF (from ``mtf``, the system MTF at the LR Nyquist frequency; one value
    or one per band), point sampling at the LR centres, then noise in DN and optional clipping to
    ``value_range``. ``OpticalDegradation.for_sensor('sentinel2', ['B02', ...], 2)`` fills ``mtf``."""

    kind: ClassVar[str] = "optical"
    scale: int | tuple[int, ...] = 2
    mtf: float | tuple[float, ...] = 0.25
    noise_sigma: float = 0.0
    shot_noise: float = 0.0
    value_range: tuple[float, float] | None = None
    #: Per call, shift every band's MTF by one draw from U(-mtf_jitter, +mtf_jitter) (clipped to
    #: [0.05, 0.6]): trains models that tolerate sensors whose PSF differs from the nominal one.
    mtf_jitter: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.mtf_jitter < 0.5:
            raise ConfigError(f"mtf_jitter must be in [0, 0.5), got {self.mtf_jitter}")
        for name in ("scale", "mtf", "value_range"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))
        for m in np.atleast_1d(self.mtf):
            sigma_from_mtf(float(m), 2)  # validates the range
        if self.noise_sigma < 0 or self.shot_noise < 0:
            raise ConfigError("noise_sigma and shot_noise must be >= 0")
        if self.value_range is not None and not (len(self.value_range) == 2
                                                 and self.value_range[0] < self.value_range[1]):
            raise ConfigError(f"value_range must be [low, high], got {self.value_range}")

    @classmethod
    def for_sensor(cls, sensor: str, bands: Sequence[str], scale: int | Sequence[int], **kw: Any
                   ) -> OpticalDegradation:
        return cls(scale=_tuple(scale), mtf=tuple(sensor_mtf(sensor, bands)), **kw)

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        return as_factors(self.scale, spatial_dims)

    def band_mtf(self, channels: int) -> list[float]:
        m = [float(v) for v in np.atleast_1d(self.mtf)]
        if len(m) == 1:
            return m * channels
        if len(m) != channels:
            raise ConfigError(f"{len(m)} MTF values for an image with {channels} bands")
        return m

    def sigmas(self, channels: int, spatial_dims: int = 2, shift: float = 0.0) -> list[tuple[float, ...]]:
        """PSF std per band and axis, in HR pixels (``shift`` is added to every band's MTF)."""
        f = self.factors(spatial_dims)
        mtfs = [float(np.clip(m + shift, 0.05, 0.6)) if shift else m for m in self.band_mtf(channels)]
        return [tuple(sigma_from_mtf(m, fa) if fa > 1 else 0.0 for fa in f) for m in mtfs]

    def derived(self) -> dict[str, Any]:
        f = (self.scale,) if isinstance(self.scale, int) else self.scale
        return {"psf_sigma_hr_px": [[round(sigma_from_mtf(m, fa), 4) if fa > 1 else 0.0 for fa in f]
                                    for m in np.atleast_1d(self.mtf)],
                "decimation": "point sampling of the PSF-blurred image at the LR pixel centres"}

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "HR image")
        d = x.ndim - 1
        f = self.factors(d)
        check_divisible(x.shape[1:], f)
        shift = float(rng.uniform(-self.mtf_jitter, self.mtf_jitter)) if self.mtf_jitter else 0.0
        sig = self.sigmas(x.shape[0], d, shift)
        out = np.empty((x.shape[0], *(s // k for s, k in zip(x.shape[1:], f))), dtype=np.float32)
        for s in sorted(set(sig)):  # bands sharing a PSF are filtered together
            idx = [i for i, v in enumerate(sig) if v == s]
            out[idx] = psf_decimate(x[idx], f, s)
        out = add_noise(out, rng, self.noise_sigma, self.shot_noise)
        if self.value_range is not None:
            out = np.clip(out, *self.value_range)
        return out


@dataclasses.dataclass(frozen=True)
class GaussianMean(Degradation):
    """The operator of ANCHORS.md's reference figures: Gaussian blur (``sigma`` HR px, scipy
    ``gaussian_filter``, reflect border, truncate 4; only along axes with a factor > 1) then the
    mean over ``scale`` blocks. ``sigma=0`` is the plain block mean (the MNI152 x2 and the
    4-slice figures)."""

    kind: ClassVar[str] = "gaussian_mean"
    scale: int | tuple[int, ...] = 2
    sigma: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _tuple(self.scale))
        if self.sigma < 0:
            raise ConfigError(f"sigma must be >= 0, got {self.sigma}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        return as_factors(self.scale, spatial_dims)

    def mtf_at_nyquist(self, factor: int) -> float:
        """System MTF (Gaussian x block mean) at the LR Nyquist frequency along an axis."""
        nu = 1.0 / (2 * factor)
        box = response(0, np.full(factor, 1.0 / factor), factor, nu)
        return mtf_from_sigma(self.sigma, factor) * box

    def derived(self) -> dict[str, Any]:
        f = (self.scale,) if isinstance(self.scale, int) else self.scale
        return {"mtf_at_lr_nyquist": [round(self.mtf_at_nyquist(fa), 4) for fa in f]}

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "HR image")
        f = self.factors(x.ndim - 1)
        check_divisible(x.shape[1:], f)
        if self.sigma > 0:
            sig = (0.0,) + tuple(self.sigma if fa > 1 else 0.0 for fa in f)
            x = gaussian_filter(x, sigma=sig, mode="reflect", truncate=4.0)
        return block_mean(x, f)
