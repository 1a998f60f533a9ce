"""VDSR (Kim et al. 2016): a deep plain conv net learning the residual over the interpolated input."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelError
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.layers import SRModule, chain_radius, conv, conv_nd


class VDSR(SRModule):
    """``u = interp(x); y = u + net(u)`` with ``depth`` 3^d convs (ReLU between) at HR resolution."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, depth: int = 20, n_feats: int = 64,
                 base: str | None = None) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        if self.out_channels != self.in_channels:
            raise ModelError(f"VDSR is residual: out_channels ({self.out_channels}) must equal "
                             f"in_channels ({self.in_channels})")
        if depth < 2:
            raise ModelError(f"VDSR depth must be >= 2, got {depth}")
        d = self.spatial_dims
        self.base = interpolator(base or default_base(d), d, self.in_channels, self.scale)
        layers: list[nn.Module] = [conv_nd(d, self.in_channels, n_feats, 3), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [conv_nd(d, n_feats, n_feats, 3), nn.ReLU(inplace=True)]
        layers.append(conv_nd(d, n_feats, self.out_channels, 3))
        self.net = nn.Sequential(*layers)
        self.receptive_radius = chain_radius([self.base.radius_op] + [conv(1)] * depth, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.base(x)
        return self.net(u).add_(u)
