"""Optical PSF: the measured MTF at the LR Nyquist frequency equals the requested one."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from domainsr.degrade import build_degradation
from domainsr.degrade.optical import (
    SENTINEL2_MTF,
    GaussianMean,
    OpticalDegradation,
    mtf_from_sigma,
    sensor_mtf,
    sigma_from_mtf,
)
from domainsr.errors import ConfigError, GeometryError


def nyquist_cosine(n_lr: int, f: int, axis: int) -> np.ndarray:
    """A cosine at the LR Nyquist frequency, peaking on the LR pixel centres (f*m + (f-1)/2)."""
    t = np.arange(n_lr * f)
    wave = np.cos(np.pi / f * (t - (f - 1) / 2))
    img = np.broadcast_to(wave[None, :] if axis == 1 else wave[:, None], (n_lr * f, n_lr * f))
    return img[None].astype(np.float32)


def measured_mtf(lr: np.ndarray, axis: int, margin: int = 8) -> float:
    """Amplitude of the alternating LR pattern in the interior (the input amplitude is 1)."""
    inner = lr[0, margin:-margin, margin:-margin]
    sign = (-1.0) ** (np.arange(lr.shape[1 + axis])[margin:-margin])
    sign = sign[None, :] if axis == 1 else sign[:, None]
    return float((inner * sign).mean())


@pytest.mark.parametrize("f", [2, 3, 4])
@pytest.mark.parametrize("mtf", [0.15, 0.22, 0.3, 0.45])
@pytest.mark.parametrize("axis", [0, 1])
def test_measured_mtf_at_lr_nyquist_is_the_requested_one(f, mtf, axis):
    deg = OpticalDegradation(scale=f, mtf=mtf)
    lr = deg(nyquist_cosine(40, f, axis), np.random.default_rng(0))
    assert lr.shape == (1, 40, 40)
    assert abs(measured_mtf(lr, axis) - mtf) < 0.02
    assert abs(measured_mtf(lr, axis) - mtf) < 0.003  # the sampled kernel is in fact much closer


def test_per_band_psf_and_sensor_table():
    mtf = sensor_mtf("sentinel2", ["B2", "B04", "B8A", "b11"])
    assert mtf == [SENTINEL2_MTF["B02"], SENTINEL2_MTF["B04"], SENTINEL2_MTF["B8A"], SENTINEL2_MTF["B11"]]
    deg = OpticalDegradation.for_sensor("sentinel2", ["B02", "B04", "B8A", "B11"], (2, 2))
    hr = np.concatenate([nyquist_cosine(24, 2, 1)] * 4)
    lr = deg(hr, np.random.default_rng(0))
    got = [measured_mtf(lr[i:i + 1], 1) for i in range(4)]
    np.testing.assert_allclose(got, mtf, atol=0.003)
    with pytest.raises(ConfigError, match="B10"):
        sensor_mtf("sentinel2", ["B10"])
    with pytest.raises(ConfigError, match="bands"):
        OpticalDegradation(scale=2, mtf=(0.2, 0.3))(hr, np.random.default_rng(0))


def test_sigma_formula():
    # sigma = f sqrt(-2 ln m) / pi, and the Gaussian MTF exp(-2 pi^2 sigma^2 nu^2) at nu = 1/(2f)
    assert sigma_from_mtf(0.25, 2) == pytest.approx(2 * np.sqrt(-2 * np.log(0.25)) / np.pi)
    for m, f in [(0.1, 2), (0.3, 3), (0.5, 6)]:
        s = sigma_from_mtf(m, f)
        assert np.exp(-2 * np.pi ** 2 * s ** 2 / (2 * f) ** 2) == pytest.approx(m)
        assert mtf_from_sigma(s, f) == pytest.approx(m)
    with pytest.raises(ConfigError):
        sigma_from_mtf(1.2, 2)


def test_centre_alignment_and_constant():
    rng = np.random.default_rng(0)
    assert np.allclose(OpticalDegradation(scale=3, mtf=0.2)(np.full((2, 30, 33), 7.0, np.float32), rng), 7.0)
    # a linear ramp is sampled at the LR centres: lr[m] = f*m + (f-1)/2 (interior)
    f = 4
    ramp = np.broadcast_to(np.arange(64.0), (64, 64))[None].astype(np.float32)
    lr = OpticalDegradation(scale=f, mtf=0.25)(ramp, rng)[0]
    np.testing.assert_allclose(lr[:, 3:-3], np.broadcast_to(f * np.arange(16) + (f - 1) / 2, (16, 16))[:, 3:-3],
                               atol=1e-3)


def test_noise_in_dn_is_deterministic_and_sized():
    hr = np.full((1, 64, 64), 1000.0, np.float32)
    deg = OpticalDegradation(scale=2, mtf=0.3, noise_sigma=5.0, shot_noise=0.1, value_range=(0, 1100))
    a = deg(hr, np.random.default_rng(3))
    b = deg(hr, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    assert a.std() == pytest.approx(np.sqrt(5.0 ** 2 + 0.1 * 1000), rel=0.1)
    assert not np.array_equal(a, deg(hr, np.random.default_rng(4)))
    with pytest.raises(GeometryError, match="divisible"):
        deg(np.zeros((1, 63, 64), np.float32), np.random.default_rng(0))


def test_anchor_operator_is_gaussian_sigma1_then_2x2_mean():
    rng = np.random.default_rng(0)
    hr = rng.random((3, 40, 48)).astype(np.float32)
    lr = build_degradation({"kind": "gaussian_mean", "sigma": 1.0, "scale": 2})(hr, rng)
    ref = gaussian_filter(hr, (0, 1, 1), mode="reflect", truncate=4.0).reshape(3, 20, 2, 24, 2).mean((2, 4))
    np.testing.assert_allclose(lr, ref, atol=1e-6)
    # its system MTF at the LR Nyquist (Gaussian x 2-pixel box) measured on the cosine
    g = GaussianMean(scale=2, sigma=1.0)
    measured = measured_mtf(g(nyquist_cosine(32, 2, 0), rng), 0)
    assert measured == pytest.approx(g.mtf_at_nyquist(2), abs=0.01)
    assert g.describe()["derived"]["mtf_at_lr_nyquist"][0] == pytest.approx(0.206, abs=0.002)
    # sigma=0 is the plain block mean, blurring only along decimated axes
    vol = rng.random((1, 4, 6, 8)).astype(np.float32)
    out = GaussianMean(scale=(1, 1, 4), sigma=0.0)(vol, rng)
    np.testing.assert_allclose(out, vol.reshape(1, 4, 6, 2, 4).mean(-1), atol=1e-6)
