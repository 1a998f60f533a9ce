"""``Normalized``: per-channel intensity normalisation *outside* the network (DESIGN.md).

``y = net((x - offset) / scale) * scale_out + offset_out``. The numbers come from the model card;
they are non-persistent buffers, so the wrapped network's ``state_dict`` stays the bare network's
(under the ``net.`` prefix).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelError


class Normalized(nn.Module):
    """Wrap an SR network with ``offset``/``scale`` per input channel. When the net changes the
    channel count, give ``out_offset``/``out_scale`` (one per output channel)."""

    def __init__(self, module: nn.Module, offset: Sequence[float], scale: Sequence[float],
                 out_offset: Sequence[float] | None = None, out_scale: Sequence[float] | None = None) -> None:
        super().__init__()
        self.net = module
        cin = int(module.in_channels)
        cout = int(getattr(module, "out_channels", cin))
        for name, v in (("offset", offset), ("scale", scale)):
            if len(v) != cin:
                raise ModelError(f"{name} has {len(v)} values for {cin} channels")
        if (out_offset is None) != (out_scale is None):
            raise ModelError("give both out_offset and out_scale, or neither")
        if out_offset is None:
            if cout != cin:
                raise ModelError(f"the network maps {cin} to {cout} channels: give out_offset/out_scale")
            out_offset, out_scale = offset, scale
        for name, v in (("out_offset", out_offset), ("out_scale", out_scale)):
            if len(v) != cout:
                raise ModelError(f"{name} has {len(v)} values for {cout} output channels")
        if any(float(s) == 0.0 for s in (*scale, *out_scale)):
            raise ModelError("normalisation scale must be non-zero")
        shape = (1, -1) + (1,) * int(module.spatial_dims)
        for name, v in (("norm_offset", offset), ("norm_scale", scale),
                        ("out_offset", out_offset), ("out_scale", out_scale)):
            self.register_buffer(name, torch.tensor([float(a) for a in v], dtype=torch.float32).view(shape),
                                 persistent=False)

    # the SR attributes of the wrapped network
    scale = property(lambda self: self.net.scale)
    spatial_dims = property(lambda self: self.net.spatial_dims)
    in_channels = property(lambda self: self.net.in_channels)
    out_channels = property(lambda self: self.net.out_channels)
    receptive_radius = property(lambda self: self.net.receptive_radius)
    kind = property(lambda self: getattr(self.net, "kind", "sr"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.net((x - self.norm_offset.to(x.dtype)) / self.norm_scale.to(x.dtype))
        return y * self.out_scale.to(y.dtype) + self.out_offset.to(y.dtype)

    def describe(self) -> dict[str, list[float]]:
        """The normalisation as plain lists (for the model card)."""
        return {k: getattr(self, k).flatten().tolist()
                for k in ("norm_offset", "norm_scale", "out_offset", "out_scale")}
