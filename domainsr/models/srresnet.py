"""SRResNet (Ledig et al. 2017, the SRGAN generator): 9^d head, residual blocks, sub-pixel
upsampling with PReLU, 9^d output conv. Batch norm is off by default (as in later work such as
ESRGAN's MSRResNet); with ``batch_norm=True`` it follows the paper."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.models.layers import SRModule, Upsampler, chain_radius, conv, conv_nd

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class SRResBlock(nn.Module):
    def __init__(self, dims: int, feats: int, batch_norm: bool) -> None:
        super().__init__()
        norm = (lambda: _BN[dims](feats)) if batch_norm else nn.Identity
        self.body = nn.Sequential(conv_nd(dims, feats, feats, 3, bias=not batch_norm), norm(), nn.PReLU(feats),
                                  conv_nd(dims, feats, feats, 3, bias=not batch_norm), norm())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)


class SRResNet(SRModule):
    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_blocks: int = 16, n_feats: int = 64,
                 batch_norm: bool = False) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        self.head = nn.Sequential(conv_nd(d, self.in_channels, n_feats, 9), nn.PReLU(n_feats))
        mid = [conv_nd(d, n_feats, n_feats, 3, bias=not batch_norm)]
        if batch_norm:
            mid.append(_BN[d](n_feats))
        self.body = nn.Sequential(*(SRResBlock(d, n_feats, batch_norm) for _ in range(n_blocks)), *mid)
        self.upsample = Upsampler(d, n_feats, self.scale, act=lambda: nn.PReLU(n_feats))
        self.tail = conv_nd(d, n_feats, self.out_channels, 9)
        ops = [conv(4)] + [conv(1)] * (2 * n_blocks + 1) + self.upsample.radius_ops() + [conv(4)]
        self.receptive_radius = chain_radius(ops, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.upsample(self.body(f) + f))
