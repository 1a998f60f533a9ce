"""Small test networks with a known receptive radius, for the engine tests (not a test module)."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


def pixel_shuffle(y: torch.Tensor, channels: int, scale: tuple[int, ...]) -> torch.Tensor:
    """(B, C * prod(scale), *sp) -> (B, C, *sp * scale) for any number of spatial axes."""
    b, _, *sp = y.shape
    nd = len(sp)
    y = y.reshape(b, channels, *scale, *sp)
    order = [0, 1] + [i for a in range(nd) for i in (2 + nd + a, 2 + a)]
    return y.permute(order).reshape(b, channels, *(n * f for n, f in zip(sp, scale)))


class ConvSR(nn.Module):
    """``depth`` 3-wide convs (zero or replicate padding) then a sub-pixel shuffle, plus a nearest
    upsampled skip: receptive radius = depth + 1 LR pixels (scale 1 axes included)."""

    def __init__(self, spatial_dims: int = 2, channels: int = 3, scale: tuple[int, ...] = (2, 2),
                 feats: int = 8, depth: int = 3, padding_mode: str = "zeros", seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, channels, channels
        self.scale = tuple(scale)
        layers: list[nn.Module] = [conv(channels, feats, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
        for _ in range(depth - 1):
            layers += [conv(feats, feats, 3, padding=1, padding_mode=padding_mode), nn.ReLU()]
        layers.append(conv(feats, channels * math.prod(scale), 3, padding=1, padding_mode=padding_mode))
        self.body = nn.Sequential(*layers)
        self.receptive_radius = (depth + 1,) * spatial_dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = x
        for a, f in enumerate(self.scale):
            skip = skip.repeat_interleave(f, dim=2 + a)
        return skip + pixel_shuffle(self.body(x), x.shape[1], self.scale)


class Counting(nn.Module):
    """Wraps a model and counts forward calls and tiles seen (not the engine's 16 px / 8 px probe
    of activation sizes)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
            if hasattr(model, k):
                setattr(self, k, getattr(model, k))
        self.calls = 0
        self.tiles = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if max(x.shape[2:]) > 16:
            self.calls += 1
            self.tiles += x.shape[0]
        return self.model(x)


class NearestUp(nn.Module):
    """Nearest upsampling with no declared receptive radius (the engine must blend)."""

    def __init__(self, scale: tuple[int, ...]) -> None:
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for a, f in enumerate(self.scale):
            x = x.repeat_interleave(f, dim=2 + a)
        return x


def whole(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """One whole-image forward pass (the reference)."""
    with torch.inference_mode():
        return model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None])[0].numpy()
