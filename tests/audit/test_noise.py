"""The robust noise estimate that every audit threshold is measured against."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from domainsr.audit.noise import QUANTISATION_SIGMA, estimate_noise


@pytest.mark.parametrize("shape", [(256, 256), (48, 48, 48)])
def test_estimates_white_noise_on_structured_images(shape):
    rng = np.random.default_rng(0)
    smooth = ndi.gaussian_filter(rng.normal(size=shape), 6.0) * 3000.0  # texture up to ~100x the noise
    steps = (np.indices(shape).sum(0) // 48 % 2) * 500.0  # sharp diagonal edges
    truth = np.array([7.0, 20.0])
    data = np.stack([smooth + steps + rng.normal(0, s, shape) for s in truth]).astype(np.float32)
    est = estimate_noise(data, integer_valued=False)
    assert np.allclose(est, truth, rtol=0.1), est


def test_flat_background_and_invalid_pixels_do_not_pull_the_estimate():
    rng = np.random.default_rng(1)
    data = np.zeros((1, 128, 128), np.float32)
    data[0, 32:96, 32:96] = 1000 + rng.normal(0, 10, (64, 64))  # a noisy object on a zero background
    mask = np.ones((128, 128), bool)
    data[0, :8] = rng.normal(0, 5000, (8, 128))  # garbage in an invalid strip
    mask[:8] = False
    est = estimate_noise(data, mask, integer_valued=False)[0]
    assert est == pytest.approx(10.0, rel=0.1)


def test_integer_data_gets_the_quantisation_floor():
    data = np.tile(np.arange(64, dtype=np.uint8), (64, 1))[None]  # a noiseless ramp
    assert estimate_noise(data)[0] == pytest.approx(QUANTISATION_SIGMA)
    assert estimate_noise(data.astype(np.float32) / 7.0)[0] == pytest.approx(0.0, abs=1e-6)
