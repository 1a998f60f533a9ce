"""EDSR and MDSR (Lim et al. 2017): residual blocks without normalisation, sub-pixel upsampling.

Intensity normalisation (EDSR's mean shift) is not inside the network: wrap with
:class:`domainsr.models.normalized.Normalized` or let the model card do it.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelError
from domainsr.models.layers import ResBlock, SRModule, Upsampler, as_scale, chain_radius, conv, conv_nd


class EDSR(SRModule):
    """head conv - ``n_resblocks`` blocks - conv (+ head skip) - upsampler - tail conv.

    Defaults are EDSR-baseline (16 blocks, 64 features, ``res_scale=1``); the paper's large model
    is ``n_resblocks=32, n_feats=256, res_scale=0.1``.
    """

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, n_resblocks: int = 16, n_feats: int = 64,
                 res_scale: float = 1.0) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        self.head = conv_nd(d, self.in_channels, n_feats, 3)
        self.body = nn.Sequential(*(ResBlock(d, n_feats, 3, res_scale) for _ in range(n_resblocks)),
                                  conv_nd(d, n_feats, n_feats, 3))
        self.upsample = Upsampler(d, n_feats, self.scale)
        self.tail = conv_nd(d, n_feats, self.out_channels, 3)
        ops = [conv(1)] * (2 + 2 * n_resblocks) + self.upsample.radius_ops() + [conv(1)]
        self.receptive_radius = chain_radius(ops, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.upsample(self.body(f) + f))


def _key(s: Sequence[int]) -> str:
    return "x" + "_".join(str(v) for v in s)


class MDSR(SRModule):
    """One shared body with a scale-specific pre-processing module (two 5^d residual blocks) and
    upsampler per scale in ``scales``. ``scale`` picks the active head (used by ``forward(x)``);
    ``forward(x, scale=s)`` or :meth:`set_scale` selects another one."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, scales: Sequence[int | Sequence[int]] = (2, 3, 4),
                 n_resblocks: int = 16, n_feats: int = 64) -> None:
        super().__init__(spatial_dims, in_channels, out_channels, scale)
        d = self.spatial_dims
        self.scales = [as_scale(s, d) for s in scales]
        if len({_key(s) for s in self.scales}) != len(self.scales):
            raise ModelError(f"MDSR scales {list(scales)} repeat a scale")
        self.n_resblocks = n_resblocks
        self.head = conv_nd(d, self.in_channels, n_feats, 3)
        self.pre = nn.ModuleDict({_key(s): nn.Sequential(ResBlock(d, n_feats, 5), ResBlock(d, n_feats, 5))
                                  for s in self.scales})
        self.body = nn.Sequential(*(ResBlock(d, n_feats) for _ in range(n_resblocks)),
                                  conv_nd(d, n_feats, n_feats, 3))
        self.upsample = nn.ModuleDict({_key(s): Upsampler(d, n_feats, s) for s in self.scales})
        self.tail = conv_nd(d, n_feats, self.out_channels, 3)
        self.set_scale(self.scale)

    def set_scale(self, scale: int | Sequence[int]) -> None:
        """Make the head for ``scale`` the active one (updates ``scale`` and ``receptive_radius``)."""
        s = as_scale(scale, self.spatial_dims)
        if s not in self.scales:
            raise ModelError(f"MDSR has heads for {self.scales}, not {s}")
        self.scale = s
        ops = ([conv(1)] + [conv(2)] * 4 + [conv(1)] * (2 * self.n_resblocks + 1)
               + self.upsample[_key(s)].radius_ops() + [conv(1)])
        self.receptive_radius = chain_radius(ops, self.spatial_dims)

    def forward(self, x: torch.Tensor, scale: int | Sequence[int] | None = None) -> torch.Tensor:
        key = _key(self.scale if scale is None else as_scale(scale, self.spatial_dims))
        if key not in self.pre:
            raise ModelError(f"MDSR has heads for {self.scales}, not {scale}")
        f = self.pre[key](self.head(x))
        return self.tail(self.upsample[key](self.body(f) + f))
