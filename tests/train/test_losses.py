"""Losses: zero at identity, ordered by error, 2D and 3D, RaGAN orientation and gradients."""
from __future__ import annotations

import pytest
import torch

from domainsr.train.config import LossSpec
from domainsr.train.losses import (
    PixelLoss,
    SSIMLoss,
    charbonnier,
    frequency_l1,
    gradient_l1,
    l1,
    l2,
    ragan_d_loss,
    ragan_g_loss,
)


@pytest.mark.parametrize("shape", [(2, 3, 24, 20), (2, 1, 12, 10, 8)])
def test_pixel_terms_vanish_at_identity_and_grow_with_error(shape):
    torch.manual_seed(0)
    t = torch.rand(shape)
    small, big = t + 0.01 * torch.randn(shape), t + 0.2 * torch.randn(shape)
    for fn in (l1, l2, frequency_l1, gradient_l1, SSIMLoss(len(shape) - 2)):
        assert float(fn(t, t)) == pytest.approx(0.0, abs=1e-6)
        assert 0 < float(fn(small, t)) < float(fn(big, t))
    assert float(charbonnier(t, t)) == pytest.approx(1e-3, rel=1e-3)  # sqrt(eps^2)
    assert float(charbonnier(big, t)) == pytest.approx(float(l1(big, t)), rel=0.02)
    assert float(l2(big, t)) == pytest.approx(float((big - t).pow(2).mean()))
    assert float(PixelLoss(LossSpec(pixel="l2"), len(shape) - 2)(big, t)) == pytest.approx(float(l2(big, t)))


def test_gradient_loss_sees_what_l1_misses():
    """A constant offset and a checkerboard have the same L1 but only one has edges."""
    t = torch.zeros(1, 1, 16, 16)
    offset = t + 0.1
    checker = 0.1 * (torch.arange(16)[:, None] + torch.arange(16)[None]).remainder(2).mul(2).sub(1).float()[None, None]
    assert float(l1(offset, t)) == pytest.approx(float(l1(checker, t)))
    assert float(gradient_l1(offset, t)) == 0.0 < float(gradient_l1(checker, t))


def test_pixel_loss_combines_terms():
    t = torch.rand(2, 1, 16, 16)
    p = t + 0.1 * torch.randn_like(t)
    plain = PixelLoss(LossSpec(pixel="l1"), 2)(p, t)
    full = PixelLoss(LossSpec(pixel="l1", ssim=0.5, frequency=0.5, gradient=0.5), 2)(p, t)
    expect = l1(p, t) + 0.5 * (SSIMLoss(2)(p, t) + frequency_l1(p, t) + gradient_l1(p, t))
    assert float(full) == pytest.approx(float(expect), rel=1e-5) and float(full) > float(plain)


def test_ragan_orientation_and_gradients():
    real = torch.full((4, 1, 8, 8), 3.0)
    fake = torch.full((4, 1, 8, 8), -3.0, requires_grad=True)
    # a discriminator that separates well has a low D loss and the generator a high one
    assert float(ragan_d_loss(real, fake.detach())) < 0.01 < float(ragan_g_loss(real, fake.detach()))
    assert float(ragan_d_loss(fake.detach(), real)) > 1.0
    ragan_g_loss(real, fake).backward()
    assert fake.grad is not None and float(fake.grad.sum()) < 0  # pushes fake logits up


def test_range_excess_counts_what_invented_extremes_counts():
    """The loss penalises exactly the pixels that leave the local LR range (widened by 25 %) where
    the truth stays inside, by how far they leave it (numpy reference: engine.consistency)."""
    import numpy as np

    from domainsr.engine.consistency import local_range
    from domainsr.train.losses import range_excess

    rng = np.random.default_rng(0)
    for scale in ((2, 2), (1, 4), (2, 2, 2)):
        lr = rng.normal(size=(2, 3, *([6] * len(scale)))).astype(np.float32)
        hr_shape = (2, 3, *(6 * f for f in scale))
        target = rng.normal(size=hr_shape).astype(np.float32)
        pred = (2.0 * rng.normal(size=hr_shape)).astype(np.float32)
        got = float(range_excess(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(lr), scale))
        want = []
        for n in range(2):
            lo, hi = local_range(lr[n], scale)
            pad = 0.25 * (hi - lo)
            inside = (target[n] <= hi + pad) & (target[n] >= lo - pad)
            want.append((np.maximum(pred[n] - hi - pad, 0) + np.maximum(lo - pad - pred[n], 0)) * inside)
        assert got == pytest.approx(float(np.mean(want)), rel=1e-5), scale
        assert got > 0
    # inside the range (or where the truth leaves it too) nothing is penalised
    lr = torch.zeros(1, 1, 4, 4)
    lr[..., 1, 1] = 1.0
    pred = torch.full((1, 1, 8, 8), 5.0)
    assert float(range_excess(pred, pred.clone(), lr, (2, 2))) == 0.0  # truth leaves too
    assert float(range_excess(torch.zeros(1, 1, 8, 8), torch.zeros(1, 1, 8, 8), lr, (2, 2))) == 0.0


def test_pixel_loss_adds_the_range_term_only_when_asked():
    from domainsr.train.config import LossSpec
    from domainsr.train.losses import PixelLoss

    lr = torch.zeros(1, 1, 4, 4)
    pred, target = torch.full((1, 1, 8, 8), 2.0), torch.zeros(1, 1, 8, 8)
    plain = PixelLoss(LossSpec(), 2, (2, 2))(pred, target, lr)
    ranged = PixelLoss(LossSpec(range=3.0), 2, (2, 2))(pred, target, lr)
    assert float(plain) == pytest.approx(2.0) and float(ranged) == pytest.approx(2.0 + 3.0 * 2.0)
    with pytest.raises(ValueError, match="LR input"):
        PixelLoss(LossSpec(range=1.0), 2, (2, 2))(pred, target)
