"""Training losses on ``(N, C, *spatial)`` tensors with 2 or 3 spatial axes.

Pixel terms (L1, L2, Charbonnier, SSIM via MONAI, FFT-L1, gradient-L1) for the PSNR stage and the
generator's content term, and the relativistic-average GAN losses (ESRGAN). No perceptual (VGG)
term: no pretrained weights can be downloaded here, so the GAN stage relies on pixel, gradient
and frequency terms plus RaGAN against a U-Net discriminator with spectral norm.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from domainsr.train.config import LossSpec


def l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error: what PSNR scores (a fine-tune of an L1 model for PSNR)."""
    return F.mse_loss(pred, target)


def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """``mean(sqrt((p - t)^2 + eps^2))``: L1 with a smooth minimum."""
    return torch.sqrt((pred - target).pow(2) + eps * eps).mean()


def frequency_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the (orthonormal) spectra over the spatial axes, real and imaginary parts."""
    dims = tuple(range(2, pred.ndim))
    fp = torch.fft.rfftn(pred.float(), dim=dims, norm="ortho")
    ft = torch.fft.rfftn(target.float(), dim=dims, norm="ortho")
    return (torch.view_as_real(fp) - torch.view_as_real(ft)).abs().mean()


def gradient_l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between forward differences along every spatial axis (edge fidelity)."""
    total = pred.new_zeros(())
    for d in range(2, pred.ndim):
        total = total + F.l1_loss(torch.diff(pred, dim=d), torch.diff(target, dim=d))
    return total / (pred.ndim - 2)


def range_excess(pred: torch.Tensor, target: torch.Tensor, lr: torch.Tensor, scale: tuple[int, ...],
                 margin: float = 0.25) -> torch.Tensor:
    """Mean amount by which ``pred`` leaves the local range of ``lr`` (min / max of each LR pixel's
    3^d neighbourhood, edges replicated, nearest on the SR grid, widened by ``margin`` x the range)
    where ``target`` stays inside that widened range: issue 16's invented extremes as a loss
    (:func:`domainsr.engine.consistency.invented_extremes` counts the same pixels). Pixels whose
    truth itself leaves the range are not penalised (the truth does so for 12-25 % of them)."""
    pool = F.max_pool2d if lr.ndim == 4 else F.max_pool3d
    hi, lo = pool(lr, 3, stride=1, padding=1), -pool(-lr, 3, stride=1, padding=1)  # -inf padding = replicate
    for axis, f in enumerate(scale):
        if f > 1:
            hi, lo = hi.repeat_interleave(f, dim=2 + axis), lo.repeat_interleave(f, dim=2 + axis)
    pad = margin * (hi - lo)
    top, bottom = hi + pad, lo - pad
    inside = (target <= top) & (target >= bottom)
    over = F.relu(pred - top) + F.relu(bottom - pred)
    return (over * inside).mean()


class SSIMLoss(nn.Module):
    """``1 - SSIM`` (MONAI, Gaussian window) with the data range taken from each target batch, so it
    works on any normalisation; windows shrink to fit small patches."""

    def __init__(self, spatial_dims: int, win_size: int = 7) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.win_size = win_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from monai.metrics.regression import compute_ssim_and_cs

        win = [min(self.win_size, n if n % 2 else n - 1) for n in target.shape[2:]]
        rng = float((target.amax() - target.amin()).clamp_min(1e-6))
        ssim, _ = compute_ssim_and_cs(pred.float(), target.float(), self.spatial_dims, kernel_size=win,
                                      kernel_sigma=[1.5 * w / 11 for w in win], data_range=rng,
                                      kernel_type="gaussian", k1=0.01, k2=0.03)
        return 1.0 - ssim.mean()


class PixelLoss(nn.Module):
    """The PSNR-stage objective: L1, L2 or Charbonnier plus optional SSIM, frequency and gradient terms."""

    def __init__(self, spec: LossSpec, spatial_dims: int, scale: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.base = {"l1": l1, "l2": l2, "charbonnier": charbonnier}[spec.pixel]
        self.ssim = SSIMLoss(spatial_dims) if spec.ssim > 0 else None
        self.scale = tuple(scale) if scale is not None else None

    def forward(self, pred: torch.Tensor, target: torch.Tensor, lr: torch.Tensor | None = None) -> torch.Tensor:
        loss = self.base(pred, target)
        if self.spec.range > 0:
            if lr is None or self.scale is None:
                raise ValueError("the range term needs the LR input and the scale")
            loss = loss + self.spec.range * range_excess(pred, target, lr, self.scale)
        if self.ssim is not None:
            loss = loss + self.spec.ssim * self.ssim(pred, target)
        if self.spec.frequency > 0:
            loss = loss + self.spec.frequency * frequency_l1(pred, target)
        if self.spec.gradient > 0:
            loss = loss + self.spec.gradient * gradient_l1(pred, target)
        return loss


def _bce(logits: torch.Tensor, value: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits, torch.full_like(logits, value))


def ragan_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Discriminator: real should look more real than the average fake, and vice versa."""
    return 0.5 * (_bce(real_logits - fake_logits.mean(), 1.0) + _bce(fake_logits - real_logits.mean(), 0.0))


def ragan_g_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Generator: the symmetric objective (gradients flow through both terms, as in ESRGAN)."""
    return 0.5 * (_bce(real_logits - fake_logits.mean(), 0.0) + _bce(fake_logits - real_logits.mean(), 1.0))
