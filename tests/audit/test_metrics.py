"""Metrics against their direct formulas and an independent SSIM implementation (MONAI)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from domainsr.audit import metrics as mt


def smooth_image(shape, seed=0, scale=1000.0, offset=0.0):
    rng = np.random.default_rng(seed)
    return (ndi.gaussian_filter(rng.normal(size=shape), 2.0) * scale + offset).astype(np.float32)


def test_psnr_uses_the_reference_range_not_255():
    ref = np.zeros((1, 32, 32), np.float32)
    ref[0, :, 16:] = 4095.0  # 12-bit data
    x = ref + 10.0
    assert mt.psnr(x, ref)[0] == pytest.approx(10 * math.log10(4095.0 ** 2 / 100.0), abs=1e-9)
    hu = np.full((1, 8, 8, 8), -1000.0, np.float32)
    hu[0, 4:] = 3000.0  # Hounsfield units: range 4000
    assert mt.psnr(hu + 20.0, hu)[0] == pytest.approx(10 * math.log10(4000.0 ** 2 / 400.0), abs=1e-9)
    refl = np.linspace(0, 0.4, 64, dtype=np.float32).reshape(1, 8, 8)  # reflectance
    assert mt.psnr(refl + 0.004, refl)[0] == pytest.approx(10 * math.log10(0.4 ** 2 / 0.004 ** 2), abs=1e-4)


def test_psnr_ignores_invalid_pixels_and_reports_per_band():
    ref = np.stack([smooth_image((40, 40), 1), smooth_image((40, 40), 2, 50.0)])
    x = ref.copy()
    x[:, :10] += 1e6  # garbage in the invalid strip
    x[1, 10:] += 2.0
    mask = np.ones((40, 40), bool)
    mask[:10] = False
    out = mt.psnr(x, ref, mask)
    assert math.isinf(out[0])
    rng1 = ref[1][mask].max() - ref[1][mask].min()
    assert out[1] == pytest.approx(10 * math.log10(rng1 ** 2 / 4.0), abs=1e-4)


@pytest.mark.parametrize("dims", [2, 3])
def test_ssim_matches_monai(dims):
    from monai.metrics.regression import SSIMMetric

    # Zero-mean data: MONAI computes E[x^2] - E[x]^2 in float32, which loses ~0.04 of SSIM on a
    # 3D image offset by 500 (ours centres the data first and agrees with float64 to 1e-10).
    shape = (48,) * dims if dims == 2 else (28,) * 3
    ref = smooth_image(shape, 3, 100.0, 0.0)
    x = ref + smooth_image(shape, 4, 30.0) + np.random.default_rng(5).normal(0, 5, shape).astype(np.float32)
    rng = float(ref.max() - ref.min())
    ours = mt.ssim(x[None], ref[None])[0]
    monai = SSIMMetric(spatial_dims=dims, data_range=rng, win_size=11, kernel_sigma=1.5)(
        torch.from_numpy(x)[None, None], torch.from_numpy(ref)[None, None]).item()
    assert ours == pytest.approx(monai, abs=2e-4)
    assert mt.ssim(ref[None], ref[None])[0] == pytest.approx(1.0, abs=1e-6)
    assert ours < 0.999


def test_sam_of_identical_and_scaled_spectra_is_zero_and_of_orthogonal_is_90():
    ref = np.abs(smooth_image((4, 16, 16), 6)) + 1.0
    assert mt.sam(ref, ref) == pytest.approx(0.0, abs=1e-3)
    assert mt.sam(2.5 * ref, ref) == pytest.approx(0.0, abs=1e-3)  # SAM ignores brightness
    a = np.zeros((2, 4, 4), np.float32)
    b = np.zeros((2, 4, 4), np.float32)
    a[0], b[1] = 1.0, 3.0
    assert mt.sam(a, b) == pytest.approx(90.0)


def test_ergas_direct_formula():
    rng = np.random.default_rng(7)
    ref = (rng.uniform(100, 200, (3, 10, 10))).astype(np.float32)
    err = np.array([1.0, 2.0, 4.0], np.float32)
    x = ref + err[:, None, None]
    means = ref.reshape(3, -1).mean(1)
    expected = 100.0 * 0.5 * math.sqrt(np.mean((err / means) ** 2))
    assert mt.ergas(x, ref, scale=(2, 2)) == pytest.approx(expected, rel=1e-5)
    assert mt.ergas(ref, ref, scale=2) == 0.0


def test_hfen_and_gradient_error():
    ref = smooth_image((40, 40), 8)[None]
    assert mt.hfen(ref, ref)[0] == pytest.approx(0.0, abs=1e-7)
    assert mt.hfen(ref + 123.0, ref)[0] < 5e-3  # LoG ignores an offset (up to kernel truncation)
    assert mt.gradient_error(ref + 5.0, ref)[0] == pytest.approx(0.0, abs=1e-6)
    blurred = ndi.gaussian_filter(ref, (0, 1.5, 1.5))
    assert mt.hfen(blurred, ref)[0] > 0.2
    # relative gradient error of x = ref * 1.1 is exactly 0.1
    assert mt.gradient_error(1.1 * ref, ref)[0] == pytest.approx(0.1, rel=1e-4)
    # anisotropic spacing weighs the axes: an error only along axis 0 shrinks with a larger spacing
    vol = smooth_image((12, 12, 12), 9)[None]
    bump = vol + np.linspace(0, 50, 12, dtype=np.float32)[None, :, None, None]
    assert mt.gradient_error(bump, vol, spacing=(4.0, 1, 1))[0] < mt.gradient_error(bump, vol)[0]


def test_reference_metrics_shares_the_reference():
    ref = smooth_image((3, 32, 32), 10, 100.0, 500.0)
    x = ref + 3.0
    both = mt.reference_metrics({"a": x, "b": ref}, ref, scale=(2, 2))
    assert set(both) == {"a", "b"}
    assert set(both["a"]) == {"psnr", "ssim", "hfen", "gradient_error", "sam", "ergas"}
    assert np.allclose(both["a"]["psnr"], mt.psnr(x, ref))
    assert np.allclose(both["b"]["ssim"], 1.0)
    assert both["b"]["sam"] == pytest.approx(0.0, abs=1e-3)
