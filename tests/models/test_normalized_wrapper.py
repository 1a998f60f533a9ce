"""``Normalized``: normalisation outside the network, attributes passed through."""
from __future__ import annotations

import pytest
import torch

from domainsr.errors import ModelError
from domainsr.models import Normalized, build_model


def test_round_trip_and_formula():
    torch.manual_seed(0)
    net = build_model("espcn", spatial_dims=2, in_channels=2, scale=(1, 2), features=(4, 4))
    off, sc = [100.0, -5.0], [50.0, 2.0]
    wrapped = Normalized(net, off, sc)
    x = torch.rand(1, 2, 5, 6) * 100
    o = torch.tensor(off).view(1, 2, 1, 1)
    s = torch.tensor(sc).view(1, 2, 1, 1)
    torch.testing.assert_close(wrapped(x), net((x - o) / s) * s + o)
    for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
        assert getattr(wrapped, k) == getattr(net, k)
    # a linear baseline commutes with the affine normalisation: the round trip is the identity map
    base = build_model("linear", spatial_dims=2, in_channels=2, scale=2)
    torch.testing.assert_close(Normalized(base, off, sc)(x), base(x), rtol=1e-5, atol=1e-3)
    assert wrapped.describe()["norm_offset"] == off
    assert set(wrapped.state_dict()) == {f"net.{k}" for k in net.state_dict()}  # buffers not saved


def test_channel_mismatch_is_refused():
    net = build_model("espcn", spatial_dims=2, in_channels=3, out_channels=1, scale=2, features=(4, 4))
    with pytest.raises(ModelError, match="3 channels"):
        Normalized(net, [0.0], [1.0])
    with pytest.raises(ModelError, match="out_offset"):
        Normalized(net, [0.0] * 3, [1.0] * 3)
    with pytest.raises(ModelError, match="non-zero"):
        Normalized(net, [0.0] * 3, [1.0, 0.0, 1.0], out_offset=[0.0], out_scale=[1.0])
    ok = Normalized(net, [0.0] * 3, [2.0] * 3, out_offset=[1.0], out_scale=[3.0])
    assert ok(torch.rand(1, 3, 4, 4)).shape == (1, 1, 8, 8)
