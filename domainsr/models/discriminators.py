"""Discriminators for the GAN stage (kind ``"discriminator"``), 2D and 3D.

* :class:`VGGDiscriminator` (SRGAN): strided conv blocks 64 -> 512 features, global average
  pooling and two dense layers -> one logit per image ``(N, 1)``; any input size >= 16 px.
* :class:`UNetDiscriminatorSN` (Real-ESRGAN): a U-Net with spectral norm giving one logit per
  pixel ``(N, 1, *spatial)``; skips are resized to match, so any input size >= 8 px works.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from domainsr.models.layers import LINEAR_MODE, check_dims, conv_nd, resize_like

_BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


class _Discriminator(nn.Module):
    kind = "discriminator"

    def __init__(self, spatial_dims: int, in_channels: int) -> None:
        super().__init__()
        self.spatial_dims = check_dims(spatial_dims)
        self.in_channels = int(in_channels)


class VGGDiscriminator(_Discriminator):
    def __init__(self, spatial_dims: int, in_channels: int, n_feats: int = 64, n_stages: int = 4,
                 batch_norm: bool = True, use_spectral_norm: bool = False) -> None:
        super().__init__(spatial_dims, in_channels)
        d = self.spatial_dims
        sn = spectral_norm if use_spectral_norm else (lambda m: m)
        layers: list[nn.Module] = [sn(conv_nd(d, self.in_channels, n_feats, 3)), nn.LeakyReLU(0.2, True)]
        plan = [(n_feats, 2)] + [(n_feats * 2 ** i, s) for i in range(1, n_stages) for s in (1, 2)]
        cin = n_feats
        for cout, stride in plan:  # SRGAN: 64/s2, 128/s1, 128/s2, 256/s1, 256/s2, 512/s1, 512/s2
            layers.append(sn(conv_nd(d, cin, cout, 3, stride=stride, bias=not batch_norm)))
            if batch_norm:
                layers.append(_BN[d](cout))
            layers.append(nn.LeakyReLU(0.2, True))
            cin = cout
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(sn(nn.Linear(cin, 1024)), nn.LeakyReLU(0.2, True), sn(nn.Linear(1024, 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return self.classifier(f.mean(dim=tuple(range(2, f.ndim))))


class UNetDiscriminatorSN(_Discriminator):
    def __init__(self, spatial_dims: int, in_channels: int, n_feats: int = 64, skip_connection: bool = True) -> None:
        super().__init__(spatial_dims, in_channels)
        d, f = self.spatial_dims, n_feats
        self.skip_connection = skip_connection

        def c(cin: int, cout: int, k: int = 3, stride: int = 1) -> nn.Module:
            return spectral_norm(conv_nd(d, cin, cout, k, stride=stride, bias=False, padding=1))

        self.conv0 = conv_nd(d, self.in_channels, f, 3)
        self.conv1, self.conv2, self.conv3 = c(f, 2 * f, 4, 2), c(2 * f, 4 * f, 4, 2), c(4 * f, 8 * f, 4, 2)
        self.conv4, self.conv5, self.conv6 = c(8 * f, 4 * f), c(4 * f, 2 * f), c(2 * f, f)
        self.conv7, self.conv8 = c(f, f), c(f, f)
        self.conv9 = conv_nd(d, f, 1, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = lambda t: F.leaky_relu(t, 0.2, inplace=True)
        up = lambda t, like: resize_like(
            F.interpolate(t, scale_factor=2.0, mode=LINEAR_MODE[self.spatial_dims], align_corners=False), like)
        x0 = act(self.conv0(x))
        x1 = act(self.conv1(x0))
        x2 = act(self.conv2(x1))
        x3 = act(self.conv3(x2))
        x4 = act(self.conv4(up(x3, x2)))
        if self.skip_connection:
            x4 = x4 + x2
        x5 = act(self.conv5(up(x4, x1)))
        if self.skip_connection:
            x5 = x5 + x1
        x6 = act(self.conv6(up(x5, x0)))
        if self.skip_connection:
            x6 = x6 + x0
        out = act(self.conv7(x6))
        out = act(self.conv8(out))
        return self.conv9(out)
