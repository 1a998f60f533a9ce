"""``span``: a SPAN-style network (Swift Parameter-free Attention Network; Wan et al., NTIRE 2024
efficient-SR winner), written from the paper's idea in the house pattern of :mod:`rescnn`.

``y = interp(x) + shuffle(tail(fuse(cat[f0, b1, bn, pn])))`` with ``f0 = head(x)`` (a 3^d conv),
``b1 .. bn`` the outputs of ``n_blocks`` SPABs, ``pn`` the last block's pre-attention feature,
``fuse`` a 1^d conv and ``tail`` a 3^d conv to ``out * prod(scale)`` channels followed by a
per-axis pixel shuffle, added to a bicubic (2D) / trilinear (3D) upsampling of the input.

A SPAB (Swift Parameter-free Attention Block), as chosen here::

    h  = c3(silu(c2(silu(c1(x)))))       # three 3^d convs, SiLU between them
    p  = h + x                           # the residual from the block input (pre-attention)
    out = p * (sigmoid(h) - 0.5)         # parameter-free attention, the paper's form

The attention map comes from the conv branch alone, through the paper's symmetric activation
``sigmoid(.) - 0.5`` (odd, zero at zero), and gates the residual sum; it has no weights of its own.
The concat takes ``pn = p`` of the last block as its "pre-attention" feature (the official code
feeds a different intermediate; the paper's Conv3XC re-parameterisation and its extra conv on the
last block's output are left out: plain convs only).

Every op is a stride-1 conv or pointwise, with no pooling, normalisation or global attention, so
tiled inference equals whole-image inference exactly. The tail conv starts at zero, so an
untrained net *is* the interpolation baseline. Defaults (6 blocks, 32 features) give ~176k
parameters for 4 bands x2 in 2D. Weights and the conv branch run channels-last, like ``rescnn``.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelError
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.layers import (
    SRModule,
    branch_radius,
    chain_radius,
    conv,
    conv_nd,
    memory_format,
    pixel_shuffle_nd,
    up,
)


class SPAB(nn.Module):
    """Three 3^d convs with SiLU between, a residual from the input and parameter-free attention
    ``(h + x) * (sigmoid(h) - 0.5)``. Returns ``(out, pre_attention)``."""

    def __init__(self, dims: int, feats: int) -> None:
        super().__init__()
        self.c1 = conv_nd(dims, feats, feats, 3)
        self.c2 = conv_nd(dims, feats, feats, 3)
        self.c3 = conv_nd(dims, feats, feats, 3)
        self.act = nn.SiLU()
        self.radius = 3  # three radius-1 convs in a row

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.c3(self.act(self.c2(self.act(self.c1(x)))))
        pre = h + x
        att = torch.sigmoid(h) - 0.5  # not in place: sigmoid backward reads its output
        return pre * att, pre


class SPAN(SRModule):
    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_blocks: int = 6, n_feats: int = 32,
                 base: str | None = None, zero_init_tail: bool = True) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        if self.out_channels != self.in_channels:
            raise ModelError("span adds its residual to the interpolated input: out_channels must "
                             f"equal in_channels ({self.in_channels}), got {self.out_channels}")
        if int(n_blocks) < 1 or int(n_feats) < 1:
            raise ModelError(f"span needs n_blocks >= 1 and n_feats >= 1, got {n_blocks} and {n_feats}")
        d = self.spatial_dims
        self.base = interpolator(base or default_base(d), d, self.in_channels, self.scale)
        self.head = conv_nd(d, self.in_channels, n_feats, 3)
        self.blocks = nn.ModuleList(SPAB(d, n_feats) for _ in range(int(n_blocks)))
        self.fuse = conv_nd(d, 4 * n_feats, n_feats, 1)
        self.tail = conv_nd(d, n_feats, self.out_channels * math.prod(self.scale), 3)
        if zero_init_tail:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        # longest path: head, 3 convs per block, the 1x1 fuse (radius 0), the tail, the shuffle
        net = [conv(1)] + [conv(1)] * (3 * int(n_blocks)) + [conv(0), conv(1), up(self.scale)]
        self.receptive_radius = branch_radius(self.base.receptive_radius, chain_radius(net, d))
        self._format = memory_format(d)
        self.to(memory_format=self._format)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f0 = self.head(x.contiguous(memory_format=self._format))
        out, pre = self.blocks[0](f0)
        first = out
        for block in self.blocks[1:]:
            out, pre = block(out)
        fused = self.fuse(torch.cat([f0, first, out, pre], dim=1))
        r = pixel_shuffle_nd(self.tail(fused), self.scale)
        return r.add_(self.base(x))
