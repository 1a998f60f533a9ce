"""CT: thick slices, noise in HU, clipping."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.degrade.ct import HU_RANGE, CTDegradation, HUNoise, ThickSlices, hu_noise, thick_slices
from domainsr.errors import ConfigError, GeometryError


def test_constant_stays_constant_and_ramp_gives_slab_means():
    const = np.full((1, 5, 6, 20), -300.0, np.float32)
    np.testing.assert_allclose(thick_slices(const, 2, 4), -300.0)
    ramp = np.broadcast_to(np.arange(20.0) * 10 - 500, (1, 5, 6, 20)).astype(np.float32)
    out = ThickSlices(axis=-1, factor=4)(ramp, np.random.default_rng(0))
    assert out.shape == (1, 5, 6, 5)
    want = ramp[0, 0, 0].reshape(5, 4).mean(1)  # the mean of each slab of 4 slices
    np.testing.assert_allclose(out[0, 0, 0], want, atol=1e-4)
    # an overlapping 6-slice thickness: interior slabs average slices centred on the same place
    thick = thick_slices(ramp, 2, 4, thickness=6.0)[0, 0, 0]
    np.testing.assert_allclose(thick[1:-1], want[1:-1], atol=1e-4)
    rng = np.random.default_rng(1)
    vol = rng.normal(0, 100, (1, 4, 4, 24)).astype(np.float32)
    w6 = thick_slices(vol, 2, 4, thickness=6.0)
    w4 = thick_slices(vol, 2, 4)
    assert w6[..., 1:-1].std() < w4[..., 1:-1].std()  # thicker slabs average more noise away


def test_noise_and_clipping_in_hu():
    x = np.zeros((1, 100, 100), np.float32)
    out = hu_noise(x, 12.0, np.random.default_rng(0))
    assert out.std() == pytest.approx(12.0, rel=0.03) and abs(out.mean()) < 0.5
    air = np.full((1, 50, 50), -1024.0, np.float32)
    clipped = HUNoise(sigma_hu=20.0)(air, np.random.default_rng(0))
    assert clipped.min() == HU_RANGE[0] and (clipped == -1024.0).mean() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ConfigError):
        HUNoise(sigma_hu=-1)


def test_ct_preset():
    rng = np.random.default_rng(0)
    vol = rng.uniform(-1100, 3200, (1, 6, 6, 12)).astype(np.float32)
    deg = CTDegradation(scale=(1, 1, 3))
    out = deg(vol, rng)
    assert out.shape == (1, 6, 6, 4) and deg.factors(3) == (1, 1, 3)
    assert out.min() >= HU_RANGE[0] and out.max() <= HU_RANGE[1]
    a = CTDegradation(scale=(1, 3), sigma_hu=5.0)(vol[:, 0], np.random.default_rng(2))
    b = CTDegradation(scale=(1, 3), sigma_hu=5.0)(vol[:, 0], np.random.default_rng(2))
    np.testing.assert_array_equal(a, b)
    with pytest.raises(GeometryError, match="divisible"):
        deg(vol[..., :10], rng)
