"""span (SPAN-style parameter-free attention): shapes, the interpolation start, the exact receptive
radius, tiling, the registry, a short training run and the default size."""
from __future__ import annotations

import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from model_zoo_cases import jitter

from domainsr.errors import ModelError
from domainsr.models import build_model, get_spec
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.layers import SRModule
from domainsr.models.radius import gradient_extent
from domainsr.models.span import SPAN

SMALL = {"n_blocks": 2, "n_feats": 8}


@pytest.mark.parametrize("dims,channels,scale,size", [
    (2, 4, 2, (11, 9)), (2, 4, (1, 4), (7, 6)), (3, 1, (2, 2, 2), (5, 6, 4))])
def test_output_shape(dims, channels, scale, size):
    torch.manual_seed(0)
    net = SPAN(dims, channels, scale, **SMALL, zero_init_tail=False).eval()
    x = torch.rand(2, channels, *size)
    with torch.no_grad():
        y = net(x)
    f = net.scale
    assert isinstance(net, SRModule) and len(f) == dims
    assert tuple(y.shape) == (2, channels) + tuple(s * k for s, k in zip(size, f))
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


@pytest.mark.parametrize("dims,scale", [(2, (2, 2)), (2, (1, 4)), (3, (2, 2, 2))])
def test_untrained_net_is_the_interpolation_baseline(dims, scale):
    torch.manual_seed(0)
    net = SPAN(dims, 2, scale, **SMALL).eval()  # zero-initialised tail
    base = interpolator(default_base(dims), dims, 2, scale)
    x = torch.rand(1, 2, *((9, 8) if dims == 2 else (5, 4, 6)))
    with torch.no_grad():
        torch.testing.assert_close(net(x), base(x), rtol=0, atol=1e-6)
        jitter(net)  # and a trained one is not
        assert (net(x) - base(x)).abs().max() > 1e-3


def _parents_of_changed(net: SPAN, size, at):
    """Per axis, the LR parents (floor(n / scale)) of the output pixels that change when the
    input pixel ``at`` of a 1-channel input is perturbed."""
    x = torch.rand(1, 1, *size, dtype=torch.float64)
    x2 = x.clone()
    x2[(0, 0, *at)] += 1.0
    with torch.no_grad():
        changed = (net(x2) != net(x))[0, 0].nonzero()
    return [changed[:, a] // f for a, f in enumerate(net.scale)]


@pytest.mark.parametrize("dims,scale,n_blocks", [(2, (2, 2), 2), (2, (1, 3), 1), (3, (1, 1, 2), 1)])
def test_receptive_radius_is_exact_for_an_impulse(dims, scale, n_blocks):
    torch.manual_seed(4)
    net = jitter(SPAN(dims, 1, scale, n_blocks=n_blocks, n_feats=4, zero_init_tail=False).double()).eval()
    r = net.receptive_radius
    assert r == (3 * n_blocks + 2,) * dims  # head + 3 convs per block + tail (the 1x1 fuse adds 0)
    size = [2 * v + 7 for v in r]
    c = [s // 2 for s in size]
    parents = _parents_of_changed(net, size, c)
    for a in range(dims):  # inside the radius, and reaching its edge on both sides
        assert parents[a].min().item() == c[a] - r[a], a
        assert parents[a].max().item() == c[a] + r[a], a
    # the gradient probe the registry's radius tests use agrees
    ext, touches = gradient_extent(net, 1, scale, size)
    assert ext == r and not touches


def test_tiled_inference_equals_whole_image():
    torch.manual_seed(5)
    net = jitter(SPAN(2, 2, (2, 2), **SMALL, zero_init_tail=False).double()).eval()
    r = net.receptive_radius[0]
    x = torch.rand(1, 2, 40, 36, dtype=torch.float64)
    with torch.no_grad():
        whole = net(x)
        # a 4x4 LR tile at (18, 16) with `r` pixels of context on every side
        tile = net(x[:, :, 18 - r:22 + r, 16 - r:20 + r])
    inner = tile[:, :, 2 * r:2 * r + 8, 2 * r:2 * r + 8]
    torch.testing.assert_close(inner, whole[:, :, 36:44, 32:40], rtol=0, atol=1e-12)


def test_registry_builds_it_by_name_with_the_factory_defaults():
    net = build_model("span", spatial_dims=2, in_channels=4, scale=(2, 2))
    assert isinstance(net, SPAN) and net.scale == (2, 2) and net.in_channels == net.out_channels == 4
    assert len(net.blocks) == 6 and net.head.out_channels == 32
    spec = get_spec("span")
    assert spec.spatial_dims == (2, 3) and spec.kind == "sr"
    sig = inspect.signature(SPAN)
    assert {k: sig.parameters[k].default for k in spec.defaults} == dict(spec.defaults)
    assert build_model("span", spatial_dims=3, in_channels=1, scale=2, **SMALL).scale == (2, 2, 2)
    with pytest.raises(ModelError, match="span.*out_channels"):
        build_model("span", spatial_dims=2, in_channels=3, scale=2, out_channels=1)
    with pytest.raises(ModelError, match="span.*n_blocks"):
        build_model("span", spatial_dims=2, in_channels=1, scale=2, n_blocks=0)


def test_weights_are_channels_last():
    net = SPAN(2, 2, 2, **SMALL)
    assert net.head.weight.is_contiguous(memory_format=torch.channels_last)
    net3 = SPAN(3, 1, 2, **SMALL)
    assert net3.blocks[0].c1.weight.is_contiguous(memory_format=torch.channels_last_3d)


def test_a_short_training_lowers_the_l1_loss():
    torch.manual_seed(6)
    net = SPAN(2, 1, 2, **SMALL)
    hr = F.interpolate(torch.randn(4, 1, 6, 6), size=(32, 32), mode="bicubic", align_corners=False)
    lr = F.avg_pool2d(hr, 2)  # a smooth target the cubic base only approximates
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = F.l1_loss(net(lr), hr)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert math.isfinite(losses[-1]) and losses[-1] < 0.7 * losses[0]


def test_default_size():
    net = build_model("span", spatial_dims=2, in_channels=4, scale=2)
    n = sum(p.numel() for p in net.parameters())
    # head 1,184 + 6 SPABs x 27,744 + 1x1 fuse 4,128 + tail 4,624 = 176,400
    assert 165_000 < n < 185_000
