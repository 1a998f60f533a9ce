"""SRCNN (Dong et al. 2014): three convs (9-1-5, 64/32 features) on the interpolated input."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelError
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.layers import SRModule, chain_radius, conv, conv_nd


class SRCNN(SRModule):
    """``y = net(interp(x))``; all convs run at the output (HR) resolution with 'same' padding."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, features: Sequence[int] = (64, 32),
                 kernels: Sequence[int] = (9, 1, 5), base: str | None = None) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        if len(kernels) != len(features) + 1 or any(k % 2 == 0 for k in kernels):
            raise ModelError(f"SRCNN needs len(features)+1 odd kernels, got features={features} "
                             f"kernels={kernels}")
        d = self.spatial_dims
        self.base = interpolator(base or default_base(d), d, self.in_channels, self.scale)
        chans = [self.in_channels, *features, self.out_channels]
        layers: list[nn.Module] = []
        for i, k in enumerate(kernels):
            layers.append(conv_nd(d, chans[i], chans[i + 1], k))
            if i < len(kernels) - 1:
                layers.append(nn.ReLU(inplace=True))
        self.net = nn.Sequential(*layers)
        ops = [self.base.radius_op] + [conv(k // 2) for k in kernels]
        self.receptive_radius = chain_radius(ops, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.base(x))
