"""The Real-ESRGAN-style blind pipeline: shapes, determinism, ranges and the JPEG model."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.degrade.blind import BlindDegradation, anisotropic_kernel, jpeg_compress, sinc_kernel
from domainsr.errors import ConfigError, InputError


@pytest.fixture(scope="module")
def hr():
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:64] / 64.0
    base = 0.5 + 0.3 * np.sin(8 * x) * np.cos(5 * y)
    return np.stack([base, base ** 2, rng.random((64, 64)) * 0.2 + 0.4]).astype(np.float32)


@pytest.mark.parametrize("scale", [2, (2, 2), (1, 4), 4])
def test_shapes_and_determinism(hr, scale):
    deg = BlindDegradation(scale=scale)
    a = deg(hr, np.random.default_rng(11))
    f = (scale, scale) if isinstance(scale, int) else scale
    assert a.shape == (3, 64 // f[0], 64 // f[1]) and a.dtype == np.float32
    np.testing.assert_array_equal(a, deg(hr, np.random.default_rng(11)))
    assert not np.array_equal(a, deg(hr, np.random.default_rng(12)))
    assert deg.factors(2) == f


def test_value_range_is_respected(hr):
    dn = hr * 10000.0
    deg = BlindDegradation(scale=2, value_range=(0.0, 10000.0))
    outs = np.stack([deg(dn, np.random.default_rng(s)) for s in range(6)])
    assert outs.min() >= 0 and outs.max() <= 10000
    assert abs(outs.mean() - dn.mean()) < 0.05 * dn.mean()  # degraded, not rescaled
    with pytest.raises(InputError, match="2D"):
        deg(np.zeros((1, 8, 8, 8), np.float32), np.random.default_rng(0))


def test_kernels_and_jpeg():
    k = anisotropic_kernel(21, 3.0, 1.0, 0.0)
    assert k.sum() == pytest.approx(1.0) and k[10].sum() > k[:, 10].sum()  # wide along x
    for shape in ("generalized", "plateau"):
        assert anisotropic_kernel(15, 2.0, 2.0, 0.3, shape, 1.5).sum() == pytest.approx(1.0)
    s = sinc_kernel(21, np.pi / 3)
    assert s.sum() == pytest.approx(1.0) and np.allclose(s, s.T)
    noise = np.random.default_rng(0).random((1, 40, 44))
    errs = [np.abs(jpeg_compress(noise, q) - noise).mean() for q in (95, 50, 10)]
    assert errs[0] < errs[1] < errs[2]
    assert jpeg_compress(noise, 10).shape == (1, 40, 44)  # sizes that are not multiples of 8


@pytest.mark.parametrize("quality", [95, 75, 50, 30, 10])
def test_jpeg_model_matches_a_real_encoder(quality):
    import io

    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:64, 0:72] / 64.0
    img = np.clip(0.5 + 0.3 * np.sin(9 * x) * np.cos(6 * y) + 0.1 * rng.standard_normal((64, 72)), 0, 1)
    u8 = np.round(img * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(u8, "L").save(buf, "JPEG", quality=quality)
    pil = np.asarray(Image.open(buf), dtype=np.float64)
    ours = jpeg_compress(u8[None] / 255.0, quality)[0] * 255.0
    gap = np.abs(ours - pil).mean()
    assert gap < 1.0 and gap < 0.3 * np.abs(pil - u8).mean()  # same codec up to integer-DCT rounding


def test_config_is_validated_and_round_trips():
    with pytest.raises(ConfigError):
        BlindDegradation(scale=2, kernel_probs=(0.5, 0.5))
    with pytest.raises(ConfigError):
        BlindDegradation(scale=2, noise_range=(5, 1))
    with pytest.raises(ConfigError):
        BlindDegradation(scale=(2, 2, 2))
    deg = BlindDegradation(scale=(1, 2), jpeg_range=[60, 90])
    assert deg.jpeg_range == (60.0, 90.0)
    assert type(deg)(**{k: v for k, v in deg.describe().items() if k != "kind"}) == deg
