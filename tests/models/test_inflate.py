"""Inflating a 2D thick-slice net into 3D: the 3D net equals the 2D net on every plane."""
from __future__ import annotations

import pytest
import torch

from domainsr.errors import ModelError
from domainsr.models import build_model
from domainsr.models.inflate import inflate_state_dict, inserted_axis


def _randomised(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)  # the zero tail too: the residual must not vanish
    return net.eval()


@pytest.mark.parametrize("scale3", [(1, 1, 4), (1, 4, 1)])
def test_the_inflated_net_is_the_2d_net_on_every_plane(scale3):
    net2 = _randomised(build_model("rescnn", spatial_dims=2, in_channels=1, scale=(1, 4), n_blocks=2, n_feats=8))
    net3 = build_model("rescnn", spatial_dims=3, in_channels=1, scale=scale3, n_blocks=2, n_feats=8, base="cubic")
    axis = inserted_axis((1, 4), scale3)
    net3.load_state_dict(inflate_state_dict(net2.state_dict(), net3.state_dict(), axis))
    x = torch.randn(1, 1, 9, 6, 7) if scale3 == (1, 1, 4) else torch.randn(1, 1, 9, 7, 6)
    with torch.no_grad():
        got = net3.eval()(x)
        planes = [net2(x.select(2 + axis, i)) for i in range(x.shape[2 + axis])]
    want = torch.stack(planes, dim=2 + axis)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    assert want.abs().max() > 0.5  # the residual is not trivially zero


def test_scales_and_shapes_that_cannot_inflate_are_refused():
    with pytest.raises(ModelError, match="factor-1 axis"):
        inserted_axis((2, 2), (2, 2, 2))
    with pytest.raises(ModelError, match="2D scale to a 3D"):
        inserted_axis((1, 4), (1, 4))
    net2 = build_model("rescnn", spatial_dims=2, in_channels=1, scale=(1, 4), n_blocks=2, n_feats=8)
    net3 = build_model("rescnn", spatial_dims=3, in_channels=1, scale=(1, 1, 4), n_blocks=3, n_feats=8)
    with pytest.raises(ModelError, match="differ"):
        inflate_state_dict(net2.state_dict(), net3.state_dict(), 0)
    wide = build_model("rescnn", spatial_dims=3, in_channels=1, scale=(1, 1, 4), n_blocks=2, n_feats=16)
    with pytest.raises(ModelError, match="does not inflate"):
        inflate_state_dict(net2.state_dict(), wide.state_dict(), 0)
