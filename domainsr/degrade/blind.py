"""Blind, higher-order degradations in the style of Real-ESRGAN (Wang et al. 2021), 2D.

Pipeline on ``(C, H, W)`` (values mapped from ``value_range`` to [0, 1] and back):

1. blur with a random kernel: isotropic / anisotropic Gaussian, generalised Gaussian
   ``exp(-0.5 (x' S^-1 x)^beta)``, plateau ``1 / (1 + (x' S^-1 x)^beta)``, or (``sinc_prob``) a
   circular low-pass sinc; odd kernel size drawn from ``kernel_size``;
2. random resize (up / down / keep with ``resize_probs``, factor from ``resize_range``; area,
   bilinear or bicubic);
3. Gaussian noise (std from ``noise_range`` in 1/255 units; gray = same on all bands with
   ``gray_noise_prob``) or Poisson noise (255 levels, times a factor from ``poisson_range``);
4. JPEG-like compression: 8x8 block DCT per band, quantised with the standard luminance table at
   a quality from ``jpeg_range`` (no chroma subsampling: bands are not colours);
5. with ``second_blur_prob`` a second blur (``blur_sigma2``), then 2-4 again with the ``*2``
   ranges, the second resize being relative to the target LR size;
6. in random order: [resize to the exact LR size ``(H/f_r, W/f_c)`` + sinc with
   ``final_sinc_prob``] and [JPEG].

Defaults are Real-ESRGAN's published settings (for 8-bit photographs); narrow them for
scientific data. Every random draw comes from the generator passed in.
"""
from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import numpy as np
from scipy.fft import dctn, idctn
from scipy.signal import fftconvolve
from scipy.special import j1

from domainsr.degrade.base import Degradation
from domainsr.degrade.sampling import as_factors, as_image, check_divisible
from domainsr.errors import ConfigError, InputError

# JPEG Annex K luminance quantisation table
JPEG_LUMA = np.array([
    [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
    [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
    [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
    [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99]], dtype=np.float64)

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


# ------------------------------------------------------------------------------------------------
# kernels


def anisotropic_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, shape: str = "gaussian",
                       beta: float = 1.0) -> np.ndarray:
    """Normalised ``size x size`` kernel with covariance ``R diag(sx^2, sy^2) R'``; ``shape`` is
    ``gaussian``, ``generalized`` (``exp(-0.5 q^beta)``) or ``plateau`` (``1 / (1 + q^beta)``)."""
    r = (size - 1) / 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    c, s = np.cos(theta), np.sin(theta)
    rot = np.array([[c, -s], [s, c]])
    cov = rot @ np.diag([sigma_x ** 2, sigma_y ** 2]) @ rot.T
    inv = np.linalg.inv(cov)
    pts = np.stack([xx, yy], -1)
    q = np.einsum("...i,ij,...j->...", pts, inv, pts)
    if shape == "gaussian":
        k = np.exp(-0.5 * q)
    elif shape == "generalized":
        k = np.exp(-0.5 * q ** beta)
    elif shape == "plateau":
        k = 1.0 / (1.0 + q ** beta)
    else:
        raise ConfigError(f"unknown kernel shape {shape!r}")
    return k / k.sum()


def sinc_kernel(size: int, cutoff: float) -> np.ndarray:
    """Circular low-pass (ideal, ``cutoff`` in radians per pixel, <= pi) of odd ``size``."""
    r = (size - 1) / 2
    yy, xx = np.mgrid[-r:r + 1, -r:r + 1]
    d = np.hypot(xx, yy)
    with np.errstate(invalid="ignore", divide="ignore"):
        k = cutoff * j1(cutoff * d) / (2 * np.pi * d)
    k[d == 0] = cutoff ** 2 / (4 * np.pi)
    return k / k.sum()


def convolve(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """Convolve every band of ``(C, H, W)`` with ``kernel``, mirrored borders (FFT based)."""
    p = kernel.shape[0] // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p)), mode="reflect")
    return fftconvolve(xp, kernel[None], mode="valid", axes=(1, 2)).astype(np.float32)


def resize(x: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``area`` / ``bilinear`` / ``bicubic`` resize of ``(C, H, W)`` (torch, align_corners=False)."""
    import torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    kw = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(t, size=size, mode=mode, **kw)[0].numpy()


def jpeg_compress(x: np.ndarray, quality: int) -> np.ndarray:
    """JPEG-like round trip of ``(C, H, W)`` in [0, 1]: per band 8x8 DCT, quantisation with the
    luminance table at ``quality`` (IJG scaling), 8-bit rounding."""
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in [1, 100], got {quality}")
    scale = 5000.0 / quality if quality < 50 else 200.0 - 2.0 * quality
    q = np.clip(np.floor((JPEG_LUMA * scale + 50.0) / 100.0), 1, 255)
    c, h, w = x.shape
    ph, pw = -h % 8, -w % 8
    y = np.pad(np.clip(x, 0, 1) * 255.0 - 128.0, ((0, 0), (0, ph), (0, pw)), mode="edge")
    hb, wb = y.shape[1] // 8, y.shape[2] // 8
    blocks = y.reshape(c, hb, 8, wb, 8)
    coef = dctn(blocks, axes=(2, 4), norm="ortho")
    qs = q[None, None, :, None, :]
    coef = np.round(coef / qs) * qs
    y = idctn(coef, axes=(2, 4), norm="ortho").reshape(c, hb * 8, wb * 8)
    y = np.clip(np.round(y + 128.0), 0, 255)[:, :h, :w]
    return (y / 255.0).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# the random pipeline


def _pair(v: Any) -> tuple[float, float]:
    t = tuple(float(a) for a in v)
    if len(t) != 2 or t[0] > t[1]:
        raise ConfigError(f"a range must be [low, high], got {v!r}")
    return t


@dataclasses.dataclass(frozen=True)
class BlindDegradation(Degradation):
    kind: ClassVar[str] = "blind"
    scale: int | tuple[int, int] = 2
    value_range: tuple[float, float] = (0.0, 1.0)
    kernel_size: tuple[int, int] = (7, 21)
    kernel_probs: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)  # KERNEL_TYPES order
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    sinc_prob: float = 0.1
    sinc_prob2: float = 0.1
    second_blur_prob: float = 0.8
    final_sinc_prob: float = 0.8
    resize_probs: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)
    poisson_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_range2: tuple[float, float] = (0.05, 2.5)
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    jpeg_range2: tuple[float, float] = (30.0, 95.0)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "kernel_size":
                object.__setattr__(self, f.name, tuple(int(a) for a in _pair(v)))
            elif f.name in ("scale", "kernel_probs", "resize_probs") and isinstance(v, (list, tuple)):
                object.__setattr__(self, f.name, tuple(v))
            elif isinstance(v, (list, tuple)):
                object.__setattr__(self, f.name, _pair(v))
        as_factors(self.scale, 2)
        lo, hi = self.kernel_size
        if lo < 3 or hi < lo:
            raise ConfigError(f"kernel_size must be [low, high] with 3 <= low <= high, got {self.kernel_size}")
        for name in ("kernel_probs", "resize_probs"):
            p = np.asarray(getattr(self, name), dtype=float)
            want = len(KERNEL_TYPES) if name == "kernel_probs" else 3
            if p.size != want or np.any(p < 0) or not np.isclose(p.sum(), 1.0):
                raise ConfigError(f"{name} needs {want} probabilities summing to 1, got {tuple(p)}")
        if self.value_range[0] >= self.value_range[1]:
            raise ConfigError(f"value_range must be [low, high], got {self.value_range}")

    def factors(self, spatial_dims: int) -> tuple[int, ...]:
        if spatial_dims != 2:
            raise ConfigError("the blind degradation is 2D")
        return as_factors(self.scale, 2)

    # -- steps
    def _kernel(self, rng: np.random.Generator, sigma_range: tuple[float, float], sinc_prob: float) -> np.ndarray:
        lo, hi = self.kernel_size
        size = 2 * int(rng.integers((lo - 1) // 2, (hi - 1) // 2 + 1)) + 1
        if rng.random() < sinc_prob:
            cut = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
            return sinc_kernel(size, cut)
        kind = KERNEL_TYPES[int(rng.choice(len(KERNEL_TYPES), p=self.kernel_probs))]
        sx = rng.uniform(*sigma_range)
        if kind.endswith("aniso"):
            sy, theta = rng.uniform(*sigma_range), rng.uniform(-np.pi, np.pi)
        else:
            sy, theta = sx, 0.0
        if kind.startswith("generalized"):
            beta = rng.uniform(*self.betag_range)
            return anisotropic_kernel(size, sx, sy, theta, "generalized", beta)
        if kind.startswith("plateau"):
            beta = rng.uniform(*self.betap_range)
            return anisotropic_kernel(size, sx, sy, theta, "plateau", beta)
        return anisotropic_kernel(size, sx, sy, theta)

    @staticmethod
    def _mode(rng: np.random.Generator) -> str:
        return ("area", "bilinear", "bicubic")[int(rng.integers(3))]

    def _random_resize(self, x: np.ndarray, rng: np.random.Generator, ref: tuple[int, int],
                       rrange: tuple[float, float]) -> np.ndarray:
        which = int(rng.choice(3, p=self.resize_probs))
        s = rng.uniform(1.0, rrange[1]) if which == 0 else rng.uniform(rrange[0], 1.0) if which == 1 else 1.0
        size = (max(1, round(ref[0] * s)), max(1, round(ref[1] * s)))
        return resize(x, size, self._mode(rng))

    def _noise(self, x: np.ndarray, rng: np.random.Generator, nrange: tuple[float, float],
               prange: tuple[float, float]) -> np.ndarray:
        gray = rng.random() < self.gray_noise_prob
        shape = (1,) + x.shape[1:] if gray else x.shape
        if rng.random() < self.gaussian_noise_prob:
            noise = rng.standard_normal(shape) * (rng.uniform(*nrange) / 255.0)
        else:
            base = np.clip(x.mean(0, keepdims=True) if gray else x, 0, 1)
            noise = (rng.poisson(base * 255.0) / 255.0 - base) * rng.uniform(*prange)
        return np.clip(x + noise, 0, 1).astype(np.float32)

    def __call__(self, hr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        x = as_image(hr, "HR image")
        if x.ndim != 3:
            raise InputError(f"the blind degradation is 2D: expected (C, H, W), got shape {x.shape}")
        f = self.factors(2)
        target = check_divisible(x.shape[1:], f)
        lo, hi = self.value_range
        x = (x - lo) / (hi - lo)
        # first order
        x = convolve(x, self._kernel(rng, self.blur_sigma, self.sinc_prob))
        x = self._random_resize(x, rng, x.shape[1:], self.resize_range)
        x = self._noise(x, rng, self.noise_range, self.poisson_range)
        x = jpeg_compress(x, round(rng.uniform(*self.jpeg_range)))
        # second order
        if rng.random() < self.second_blur_prob:
            x = convolve(x, self._kernel(rng, self.blur_sigma2, self.sinc_prob2))
        x = self._random_resize(x, rng, target, self.resize_range2)
        x = self._noise(x, rng, self.noise_range2, self.poisson_range2)
        # final: resize to the target (+ sinc) and JPEG, in random order
        sinc = sinc_kernel(21, rng.uniform(np.pi / 3, np.pi)) if rng.random() < self.final_sinc_prob else None
        quality = round(rng.uniform(*self.jpeg_range2))
        mode = self._mode(rng)
        steps = [lambda a: self._finish(a, target, mode, sinc), lambda a: jpeg_compress(a, quality)]
        if rng.random() < 0.5:
            steps.reverse()
        for step in steps:
            x = step(x)
        return (np.clip(x, 0, 1) * (hi - lo) + lo).astype(np.float32)

    @staticmethod
    def _finish(x: np.ndarray, target: tuple[int, ...], mode: str, sinc: np.ndarray | None) -> np.ndarray:
        x = resize(x, (int(target[0]), int(target[1])), mode)
        return convolve(x, sinc) if sinc is not None else x
