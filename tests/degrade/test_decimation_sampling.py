"""The shared centre-aligned decimation helpers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import correlate1d

from domainsr.degrade.sampling import block_mean, box_weights, decimate_axis, gaussian_weights, response
from domainsr.errors import GeometryError, InputError


@pytest.mark.parametrize("n", [1, 2, 3, 5, 40])
def test_filtering_matches_scipy_reflect_also_on_tiny_axes(n):
    x = np.random.default_rng(n).random((2, n, 3)).astype(np.float32)
    t0, w = gaussian_weights(1, 2.5, integrate=False)
    ref = correlate1d(x.astype(np.float64), w, axis=1, mode="reflect")
    np.testing.assert_allclose(decimate_axis(x, 0, 1, t0, w), ref, atol=1e-6)


def test_box_profile_is_the_block_mean_and_weights_are_centred():
    x = np.random.default_rng(0).random((1, 12, 9)).astype(np.float32)
    t0, w = box_weights(3, 3.0)
    np.testing.assert_allclose(decimate_axis(x, 0, 3, t0, w), block_mean(x, (3, 1)), atol=1e-6)
    for f in (2, 3, 4):
        for t0, w in (box_weights(f, f + 1.5), gaussian_weights(f, 1.3, True), gaussian_weights(f, 1.3, False)):
            c = (f - 1) / 2
            t = t0 + np.arange(len(w))
            assert w.sum() == pytest.approx(1.0)
            assert np.sum(w * t) == pytest.approx(c)  # centred on the LR centre f*m + (f-1)/2
            assert response(t0, w, f, 0.0) == pytest.approx(1.0)


def test_errors():
    with pytest.raises(GeometryError, match="divisible"):
        block_mean(np.zeros((1, 5, 4), np.float32), (2, 2))
    with pytest.raises(InputError, match="NaN"):
        from domainsr.degrade.sampling import as_image

        as_image(np.array([[np.nan, 1.0]]))
