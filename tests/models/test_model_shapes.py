"""Every registered model builds for each declared spatial_dims and maps shapes as declared."""
from __future__ import annotations

import math

import pytest
import torch
from model_zoo_cases import TINY

from domainsr.models import build_model, list_models

SCALES = {2: [(2, 2), (3, 3), (1, 4), (2, 1)], 3: [(2, 2, 2), (1, 1, 4), (1, 2, 3)]}
CASES = [(s.name, d, sc) for s in list_models("sr") for d in s.spatial_dims for sc in SCALES[d]
         if s.name != "mdsr"]


@pytest.mark.parametrize("name,dims,scale", CASES, ids=lambda v: str(v))
def test_output_shape_is_input_times_scale(name, dims, scale):
    torch.manual_seed(0)
    net = build_model(name, spatial_dims=dims, in_channels=2, scale=scale, **TINY.get(name, {})).eval()
    size = (11, 9) if dims == 2 else (5, 6, 7)
    x = torch.rand(2, 2, *size)
    with torch.no_grad():
        y = net(x)
    assert tuple(y.shape) == (2, 2) + tuple(s * f for s, f in zip(size, scale))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert net.scale == scale and net.spatial_dims == dims
    assert net.in_channels == 2 and net.out_channels == 2
    assert len(net.receptive_radius) == dims and all(isinstance(r, int) and r >= 0 for r in net.receptive_radius)


@pytest.mark.parametrize("name", ["espcn", "fsrcnn", "edsr", "rcan", "srresnet", "rrdbnet", "srcnn"])
def test_out_channels_can_differ(name):
    net = build_model(name, spatial_dims=2, in_channels=4, out_channels=1, scale=(1, 2), **TINY.get(name, {}))
    assert net(torch.rand(1, 4, 6, 6)).shape == (1, 1, 6, 12) and net.out_channels == 1


@pytest.mark.parametrize("dims", [2, 3])
def test_an_int_scale_is_isotropic(dims):
    net = build_model("rescnn", spatial_dims=dims, in_channels=1, scale=2, **TINY["rescnn"])
    assert net.scale == (2,) * dims


@pytest.mark.parametrize("dims", [2, 3])
def test_mdsr_heads_switch_scale(dims):
    net = build_model("mdsr", spatial_dims=dims, in_channels=1, scale=2, **TINY["mdsr"]).eval()
    x = torch.rand(1, 1, *(5,) * dims)
    with torch.no_grad():
        assert net(x).shape[2:] == (10,) * dims
        assert net(x, scale=3).shape[2:] == (15,) * dims
        net.set_scale(4)
        assert net.scale == (4,) * dims and net(x).shape[2:] == (20,) * dims
    # the heads are separate parameters, the body is shared
    names = {n.split(".")[1] for n, _ in net.named_parameters() if n.startswith(("pre.", "upsample."))}
    assert names == {"x2_2", "x3_3", "x4_4"} if dims == 2 else {"x2_2_2", "x3_3_3", "x4_4_4"}


@pytest.mark.parametrize("dims", [2, 3])
def test_discriminators(dims):
    size = (32, 24) if dims == 2 else (16, 16, 12)
    x = torch.rand(2, 3, *size)
    vgg = build_model("vgg_discriminator", spatial_dims=dims, in_channels=3, **TINY["vgg_discriminator"])
    assert vgg(x).shape == (2, 1) and vgg.kind == "discriminator"
    unet = build_model("unet_discriminator", spatial_dims=dims, in_channels=3, **TINY["unet_discriminator"])
    y = unet(x)
    assert y.shape == (2, 1, *size)  # one logit per pixel
    # spectral norm: the U-Net's strided convs have a largest singular value of ~1
    w = unet.conv1.weight.detach().flatten(1)
    assert torch.linalg.matrix_norm(w, ord=2) == pytest.approx(1.0, abs=0.1)
    odd = torch.rand(1, 3, *(s - 3 for s in size))  # sizes that are not multiples of 8 work too
    assert unet(odd).shape[2:] == odd.shape[2:]


def test_rescnn_matches_the_anchor_size_and_starts_as_the_baseline():
    net = build_model("rescnn", spatial_dims=2, in_channels=4, scale=2)
    n = sum(p.numel() for p in net.parameters())
    assert 140_000 < n < 160_000  # "8 residual blocks, 32 channels, ~150k parameters"
    x = torch.rand(1, 4, 12, 10)
    base = build_model("cubic", spatial_dims=2, in_channels=4, scale=2)
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=1e-6)  # zero-initialised tail
    assert math.prod(net.scale) == 4
