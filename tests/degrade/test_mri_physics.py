"""MRI: k-space truncation, slice profiles, Rician noise and the ``mri`` preset."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.degrade.mri import MRIDegradation, RicianNoise, kspace_truncate, rician_noise, slice_profile
from domainsr.degrade.sampling import block_mean
from domainsr.errors import ConfigError, InputError


def cosines(n: int, k_low: int, k_high: int, offset: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    t = np.arange(n)
    low = np.cos(2 * np.pi * k_low * t / n)
    high = np.cos(2 * np.pi * k_high * t / n)
    img = offset + low[:, None] + high[None, :] + 0.5 * high[:, None]
    return img[None].astype(np.float32), (offset, low)


@pytest.mark.parametrize("f", [2, 4])
def test_truncation_keeps_low_and_removes_high_frequencies(f):
    n = 64
    hr, _ = cosines(n, k_low=3, k_high=n // f // 2 + 4)  # the high one is above the LR Nyquist
    lr = kspace_truncate(hr, (f, f))
    assert lr.shape == (1, n // f, n // f)
    # the LR image is exactly the low cosine sampled at the LR voxel centres f*m + (f-1)/2
    c = f * np.arange(n // f) + (f - 1) / 2
    want = 3.0 + np.cos(2 * np.pi * 3 * c / n)
    np.testing.assert_allclose(lr[0], np.broadcast_to(want[:, None], lr.shape[1:]), atol=1e-4)
    # energy check on the spectrum of the HR image vs the LR one
    spec_lr = np.abs(np.fft.fft2(lr[0])) / lr[0].size
    assert spec_lr.sum() == pytest.approx(3.0 + 0.5 * 2, rel=1e-3)  # DC + the kept cosine


def test_truncation_is_centred_and_keeps_intensity():
    y, x = np.mgrid[0:72, 0:72]
    blob = np.exp(-((y - 30.3) ** 2 + (x - 20.7) ** 2) / (2 * 4.0 ** 2))[None].astype(np.float32)
    for f in (2, 3):
        lr = kspace_truncate(blob, (f, f))[0]
        yy, xx = np.mgrid[0:lr.shape[0], 0:lr.shape[1]]
        cy, cx = (lr * yy).sum() / lr.sum(), (lr * xx).sum() / lr.sum()
        assert (cy + 0.5) * f - 0.5 == pytest.approx(30.3, abs=0.02)  # geometry.scaled convention
        assert (cx + 0.5) * f - 0.5 == pytest.approx(20.7, abs=0.02)
        assert lr.sum() * f * f == pytest.approx(blob.sum(), rel=1e-3)
    const = np.full((2, 16, 12, 8), 5.0, np.float32)
    for window in (None, "hamming", "tukey"):
        np.testing.assert_allclose(kspace_truncate(const, (2, 2, 1), window), 5.0, atol=1e-4)


@pytest.mark.parametrize("window,alpha", [("hamming", 0.5), ("tukey", 0.5), ("tukey", 1.0)])
def test_windows_taper_each_kept_frequency_as_specified(window, alpha):
    n, f = 64, 2
    m = n // f
    c = f * np.arange(m) + (f - 1) / 2  # LR voxel centres in HR coordinates
    for k in (2, 8, 12):  # below the LR Nyquist (m/2 = 16)
        hr = (5.0 + np.cos(2 * np.pi * k * np.arange(n) / n))[None, :, None] * np.ones((1, 1, 4))
        lr = kspace_truncate(hr.astype(np.float32), (f, 1), window, alpha)[0, :, 0]
        r = k / (m / 2)
        if window == "hamming":
            w = 0.54 + 0.46 * np.cos(np.pi * r)
        else:
            w = 1.0 if r <= 1 - alpha else 0.5 * (1 + np.cos(np.pi * (r - 1 + alpha) / alpha))
        np.testing.assert_allclose(lr, 5.0 + w * np.cos(2 * np.pi * k * c / n), atol=1e-4)
    with pytest.raises(ConfigError):
        kspace_truncate(hr.astype(np.float32), (f, 1), "kaiser")


def test_slice_profiles():
    rng = np.random.default_rng(0)
    vol = rng.random((1, 6, 5, 16)).astype(np.float32)
    box = slice_profile(vol, -1, 4)
    np.testing.assert_allclose(box, block_mean(vol, (1, 1, 4)), atol=1e-6)
    const = np.full((1, 4, 4, 16), 2.5, np.float32)
    gauss = slice_profile(const, 2, 4, "gaussian", fwhm=6.0)
    np.testing.assert_allclose(gauss, 2.5, atol=1e-5)
    ramp = np.broadcast_to(np.arange(32.0), (1, 3, 32)).astype(np.float32)
    for prof, fwhm in (("box", 4.0), ("box", 6.0), ("gaussian", 4.0)):
        out = slice_profile(ramp, 1, 4, prof, fwhm)[0, 0]
        np.testing.assert_allclose(out[2:-2], 4 * np.arange(8)[2:-2] + 1.5, atol=1e-4)  # slab centres
    with pytest.raises(InputError, match="axis 3"):
        slice_profile(vol, 3, 2)


def test_rician_bias_on_zero_background():
    rng = np.random.default_rng(0)
    x = np.zeros((1, 200, 200), np.float32)
    x[:, :, 100:] = 1.0  # half signal, half zero background
    out = RicianNoise(sigma=0.05)(x, rng)  # relative: the 99th percentile is 1
    bg = out[0, :, :100]
    assert bg.mean() == pytest.approx(0.05 * np.sqrt(np.pi / 2), rel=0.02)
    assert (out >= 0).all()
    fg = out[0, :, 100:]
    assert fg.mean() == pytest.approx(np.sqrt(1 + 0.05 ** 2), rel=0.01)  # E|A + n| ~ sqrt(A^2 + s^2)
    absolute = rician_noise(np.zeros((1, 100, 100), np.float32), 2.0, np.random.default_rng(1))
    assert absolute.mean() == pytest.approx(2.0 * np.sqrt(np.pi / 2), rel=0.02)


def test_mri_preset_picks_slice_axes():
    iso = MRIDegradation(scale=2)
    assert iso.split_axes(3) == ([], [0, 1, 2])
    thick = MRIDegradation(scale=(1, 1, 4))
    assert thick.split_axes(3) == ([2], [])
    mixed = MRIDegradation(scale=(2, 2, 4))
    assert mixed.split_axes(3) == ([2], [0, 1])
    assert MRIDegradation(scale=(2, 2, 4), slice_axes=()).split_axes(3) == ([], [0, 1, 2])
    rng = np.random.default_rng(0)
    vol = rng.random((1, 8, 8, 16)).astype(np.float32) + 1
    np.testing.assert_allclose(thick(vol, rng), block_mean(vol, (1, 1, 4)), atol=1e-6)
    assert mixed(vol, rng).shape == (1, 4, 4, 4) and mixed.factors(3) == (2, 2, 4)
    noisy = MRIDegradation(scale=2, rician_sigma=0.05)
    np.testing.assert_array_equal(noisy(vol, np.random.default_rng(5)), noisy(vol, np.random.default_rng(5)))
