"""FSRCNN (Dong et al. 2016): LR feature extraction, shrink, mapping, expand and a transposed conv.

The deconvolution uses kernel 9 and stride = the per-axis scale (``padding 4, output_padding s-1``
so the output is exactly ``in * s``); axes with factor 1 reduce to a plain 9-tap conv.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.models.layers import SRModule, chain_radius, conv, conv_nd, conv_transpose_nd, deconv


class FSRCNN(SRModule):
    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, d: int = 56, s: int = 12, m: int = 4) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        nd = self.spatial_dims
        layers: list[nn.Module] = [conv_nd(nd, self.in_channels, d, 5), nn.PReLU(d),
                                   conv_nd(nd, d, s, 1), nn.PReLU(s)]
        for _ in range(m):
            layers += [conv_nd(nd, s, s, 3), nn.PReLU(s)]
        layers += [conv_nd(nd, s, d, 1), nn.PReLU(d)]
        self.body = nn.Sequential(*layers)
        k, p = (9,) * nd, (4,) * nd
        self.deconv = conv_transpose_nd(nd, d, self.out_channels, k, self.scale, p,
                                        tuple(f - 1 for f in self.scale))
        ops = [conv(2), conv(0)] + [conv(1)] * m + [conv(0), deconv(self.scale, k, p)]
        self.receptive_radius = chain_radius(ops, nd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.body(x))
