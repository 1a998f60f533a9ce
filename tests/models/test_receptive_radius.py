"""``receptive_radius`` (an analytic count) against gradient and impulse probes."""
from __future__ import annotations

import pytest
import torch
from model_zoo_cases import TINY, jitter

from domainsr.models import build_model
from domainsr.models.layers import chain_radius, conv, deconv, interp, up
from domainsr.models.radius import gradient_extent, measure_receptive_radius


def grad_extent(net, scale, radius):
    """Largest |offset| per axis of the input pixels with a non-zero gradient of the output block
    of the centre LR pixel (all output phases at once): the probe that measures third-party
    networks (domainsr.models.radius)."""
    size = [2 * r + 7 for r in radius]
    ext, touches = gradient_extent(net, net.in_channels, scale, size)
    assert not touches
    return ext


CASES = [("cubic", 2, (2, 2)), ("lanczos", 3, (1, 1, 3)), ("linear", 3, (2, 2, 2)), ("nearest", 2, (3, 1)),
         ("rescnn", 2, (2, 2)), ("rescnn", 3, (1, 1, 4)), ("espcn", 2, (1, 3)), ("fsrcnn", 2, (1, 3)),
         ("srcnn", 2, (2, 2)), ("vdsr", 2, (1, 3)), ("edsr", 2, (4, 4)), ("rcan", 2, (2, 2)),
         ("srresnet", 2, (1, 2)), ("rrdbnet", 2, (1, 3)), ("repsr", 3, (2, 2, 2)), ("mdsr", 2, (3, 3))]


@pytest.mark.parametrize("name,dims,scale", CASES, ids=lambda v: str(v))
def test_radius_is_exact_for_a_gradient_probe(name, dims, scale):
    torch.manual_seed(1)
    net = build_model(name, spatial_dims=dims, in_channels=2, scale=scale, **TINY.get(name, {}))
    net = jitter(net.double())
    assert grad_extent(net, scale, net.receptive_radius) == net.receptive_radius


@pytest.mark.parametrize("name,dims,scale", [("rescnn", 2, (2, 2)), ("repsr", 2, (1, 2)), ("edsr", 3, (1, 1, 2))])
def test_output_ignores_changes_just_outside_the_radius(name, dims, scale):
    torch.manual_seed(2)
    net = jitter(build_model(name, spatial_dims=dims, in_channels=1, scale=scale, **TINY[name])).eval()
    r = net.receptive_radius
    size = [2 * v + 5 for v in r]
    c = [s // 2 for s in size]
    x = torch.rand(1, 1, *size)
    centre_out = tuple(slice(ci * f, ci * f + f) for ci, f in zip(c, scale))
    with torch.no_grad():
        y0 = net(x)[(0, 0) + centre_out]
        for a in range(dims):
            for sign in (-1, 1):
                inside, outside = list(c), list(c)
                inside[a] += sign * r[a]
                outside[a] += sign * (r[a] + 1)
                x_out = x.clone()
                x_out[(0, 0) + tuple(outside)] += 10.0
                assert torch.equal(net(x_out)[(0, 0) + centre_out], y0)
                x_in = x.clone()
                x_in[(0, 0) + tuple(inside)] += 10.0
                assert not torch.equal(net(x_in)[(0, 0) + centre_out], y0)


def test_chain_radius_rules():
    assert chain_radius([conv(1)] * 3, 2) == (3, 3)
    assert chain_radius([up(2), conv(1)], 1) == (1,)  # a HR conv of radius 1 reaches one LR pixel
    assert chain_radius([up(2), conv(2)], 1) == (1,)
    assert chain_radius([up(2), conv(3)], 1) == (2,)
    assert chain_radius([interp(2, 2)], 1) == (2,)  # cubic x2: taps m-2..m+1 or m-1..m+2
    assert chain_radius([interp(3, 2)], 1) == (2,)
    assert chain_radius([interp((1, 3), 2)], 2) == (0, 2)
    assert chain_radius([deconv(1, 9, 4)], 1) == (4,)  # a stride-1 deconv is a conv


@pytest.mark.parametrize("name,dims,scale", [("rescnn", 2, (2, 2)), ("espcn", 2, (1, 3)), ("edsr", 3, (1, 1, 2))])
def test_measured_radius_of_a_registry_net_equals_its_count(name, dims, scale):
    """What a third-party network gets (measure_receptive_radius: random weights, growing probes)
    agrees with the analytic count of the registry's own networks."""
    torch.manual_seed(3)
    net = build_model(name, spatial_dims=dims, in_channels=1, scale=scale, **TINY.get(name, {}))
    assert measure_receptive_radius(net, in_channels=1, scale=scale, start=8) == tuple(net.receptive_radius)
