"""RRDBNet (Wang et al. 2018, the ESRGAN generator): residual-in-residual dense blocks, then
nearest-neighbour upsampling + conv per step (per-axis prime steps, so ``(1, 1, 4)`` works).

Defaults are small (6 blocks, 64 features, growth 32: the size of Real-ESRGAN's 6B model); the
paper's model is ``n_blocks=23``.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from domainsr.models.layers import SRModule, chain_radius, conv, conv_nd, up, upsample_stages


class ResidualDenseBlock(nn.Module):
    """Five densely connected 3^d convs (LeakyReLU 0.2), output scaled by 0.2 plus identity."""

    def __init__(self, dims: int, feats: int, growth: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(conv_nd(dims, feats + i * growth, growth if i < 4 else feats, 3)
                                   for i in range(5))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = [x]
        for conv_ in self.convs[:4]:
            feats.append(self.act(conv_(torch.cat(feats, 1))))
        return self.convs[4](torch.cat(feats, 1)).mul_(0.2).add_(x)


class RRDB(nn.Module):
    def __init__(self, dims: int, feats: int, growth: int) -> None:
        super().__init__()
        self.body = nn.Sequential(*(ResidualDenseBlock(dims, feats, growth) for _ in range(3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).mul_(0.2).add_(x)


class RRDBNet(SRModule):
    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_blocks: int = 6, n_feats: int = 64,
                 growth: int = 32) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        self.conv_first = conv_nd(d, self.in_channels, n_feats, 3)
        self.body = nn.Sequential(*(RRDB(d, n_feats, growth) for _ in range(n_blocks)))
        self.conv_body = conv_nd(d, n_feats, n_feats, 3)
        self.stages = upsample_stages(self.scale)
        self.up_convs = nn.ModuleList(conv_nd(d, n_feats, n_feats, 3) for _ in self.stages)
        self.conv_hr = conv_nd(d, n_feats, n_feats, 3)
        self.conv_last = conv_nd(d, n_feats, self.out_channels, 3)
        self.act = nn.LeakyReLU(0.2, inplace=True)
        ops = [conv(1)] + [conv(1)] * (15 * n_blocks) + [conv(1)]
        ops += [o for s in self.stages for o in (up(s), conv(1))] + [conv(1), conv(1)]
        self.receptive_radius = chain_radius(ops, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.conv_first(x)
        f = self.conv_body(self.body(f)) + f
        for step, conv_ in zip(self.stages, self.up_convs):
            f = self.act(conv_(F.interpolate(f, scale_factor=tuple(float(s) for s in step), mode="nearest")))
        return self.conv_last(self.act(self.conv_hr(f)))
