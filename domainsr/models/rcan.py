"""RCAN-style network (Zhang et al. 2018): residual groups of residual channel-attention blocks.

Deliberate deviation: the channel attention pools over a *local* window (radius ``ca_radius``)
instead of the whole image. Global pooling makes every output pixel depend on the whole input,
so patch-wise inference would give tile-dependent results (seams); with a local window the
receptive radius stays finite and tiling with that overlap is exact.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainsr.models.layers import SRModule, Upsampler, chain_radius, conv, conv_nd

_CONVF = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def local_mean(x: torch.Tensor, radius: int) -> torch.Tensor:
    """Mean over the ``(2r+1)^d`` neighbours inside the image (fewer at the border), separable:
    a depthwise box conv per axis divided by the in-image count (any input size works)."""
    d, c = x.ndim - 2, x.shape[1]
    if radius == 0:
        return x
    for a in range(d):
        shape = [1] * d
        shape[a] = 2 * radius + 1
        pad = [0] * d
        pad[a] = radius
        box = torch.ones(c, 1, *shape, dtype=x.dtype, device=x.device)
        total = _CONVF[d](x, box, padding=tuple(pad), groups=c)
        n = x.shape[2 + a]
        ones = torch.ones(1, 1, n, dtype=x.dtype, device=x.device)
        count = F.conv1d(ones, box[:1].reshape(1, 1, -1), padding=radius).reshape(
            [n if i == a else 1 for i in range(d)])
        x = total / count
    return x


class LocalChannelAttention(nn.Module):
    def __init__(self, dims: int, feats: int, reduction: int, radius: int) -> None:
        super().__init__()
        mid = max(1, feats // reduction)
        self.radius = radius
        self.gate = nn.Sequential(conv_nd(dims, feats, mid, 1), nn.ReLU(inplace=True),
                                  conv_nd(dims, mid, feats, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate(local_mean(x, self.radius))


class RCAB(nn.Module):
    def __init__(self, dims: int, feats: int, reduction: int, radius: int) -> None:
        super().__init__()
        self.body = nn.Sequential(conv_nd(dims, feats, feats, 3), nn.ReLU(inplace=True),
                                  conv_nd(dims, feats, feats, 3),
                                  LocalChannelAttention(dims, feats, reduction, radius))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)


class ResidualGroup(nn.Module):
    def __init__(self, dims: int, feats: int, n_blocks: int, reduction: int, radius: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(RCAB(dims, feats, reduction, radius) for _ in range(n_blocks)),
                                  conv_nd(dims, feats, feats, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).add_(x)


class RCAN(SRModule):
    """Defaults are smaller than the paper's 10 groups x 20 blocks (16M parameters)."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_resgroups: int = 4, n_resblocks: int = 8,
                 n_feats: int = 64, reduction: int = 16, ca_radius: int = 3) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        self.head = conv_nd(d, self.in_channels, n_feats, 3)
        self.body = nn.Sequential(*(ResidualGroup(d, n_feats, n_resblocks, reduction, ca_radius)
                                    for _ in range(n_resgroups)), conv_nd(d, n_feats, n_feats, 3))
        self.upsample = Upsampler(d, n_feats, self.scale)
        self.tail = conv_nd(d, n_feats, self.out_channels, 3)
        group = [conv(1), conv(1), conv(ca_radius)] * n_resblocks + [conv(1)]
        ops = [conv(1)] + group * n_resgroups + [conv(1)] + self.upsample.radius_ops() + [conv(1)]
        self.receptive_radius = chain_radius(ops, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.upsample(self.body(f) + f))
