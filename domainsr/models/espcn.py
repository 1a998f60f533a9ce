"""ESPCN (Shi et al. 2016): convs at LR resolution and one sub-pixel (pixel shuffle) output layer."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from domainsr.models.layers import SRModule, activation, chain_radius, conv, conv_nd, pixel_shuffle_nd, up


class ESPCN(SRModule):
    """conv5 (64) - tanh - conv3 (32) - tanh - conv3 (out * prod(scale)) - shuffle."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, features: Sequence[int] = (64, 32),
                 act: str = "tanh") -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        f1, f2 = features
        self.net = nn.Sequential(
            conv_nd(d, self.in_channels, f1, 5), activation(act, f1),
            conv_nd(d, f1, f2, 3), activation(act, f2),
            conv_nd(d, f2, self.out_channels * math.prod(self.scale), 3),
        )
        self.receptive_radius = chain_radius([conv(2), conv(1), conv(1), up(self.scale)], d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pixel_shuffle_nd(self.net(x), self.scale)
