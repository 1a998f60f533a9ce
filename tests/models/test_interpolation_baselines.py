"""Interpolation baselines: exactness properties and alignment with ``geometry.scaled``."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from domainsr.image import MedicalGeometry
from domainsr.models import build_model
from domainsr.models.baselines import Interpolate, polyphase_weights

METHODS = ["nearest", "linear", "cubic", "lanczos"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dims,scale", [(2, (2, 2)), (2, (1, 3)), (3, (2, 2, 2)), (3, (1, 1, 4))])
def test_constant_stays_constant(method, dims, scale):
    net = build_model(method, spatial_dims=dims, in_channels=2, scale=scale)
    x = torch.full((1, 2) + (6,) * dims, 0.37)
    y = net(x)
    assert y.shape[2:] == tuple(6 * f for f in scale)
    assert (y - 0.37).abs().max() < 1e-6
    assert dict(net.state_dict()) == {}  # no parameters, no buffers saved


@pytest.mark.parametrize("method,kw,tol", [("linear", {}, 2e-4), ("cubic", {}, 2e-4),
                                           ("lanczos", {}, 0.025), ("cubic", {"a": -0.75}, 0.05)])
@pytest.mark.parametrize("dims,scale", [(2, (2, 3)), (3, (2, 1, 4))])
def test_ramp_matches_the_scaled_geometry(method, kw, tol, dims, scale):
    # a ramp equal to the voxel index along every axis: the interpolated value must be the
    # input coordinate of the output voxel centre, as MedicalGeometry.scaled defines it
    size = (12,) * dims
    grids = np.meshgrid(*(np.arange(s, dtype=np.float64) for s in size), indexing="ij")
    x = torch.from_numpy(np.stack(grids)).float()[None]  # one channel per axis
    net = build_model(method, spatial_dims=dims, in_channels=dims, scale=scale, **kw)
    y = net(x)[0].numpy()
    aff = np.eye(4)
    geo = MedicalGeometry(aff, size + (1,) * (3 - dims)).scaled(tuple(scale) + (1,) * (3 - dims))
    out_idx = np.meshgrid(*(np.arange(s * f) for s, f in zip(size, scale)), indexing="ij")
    pts = np.stack([o.ravel() for o in out_idx] + [np.zeros(o.size) for o in out_idx[:3 - dims]], -1)
    want = geo.index_to_world(pts)[:, :dims].T.reshape((dims,) + y.shape[1:])
    # interior: 3 LR pixels away from the replicated border
    inner = (slice(None),) + tuple(slice(3 * f, -3 * f) if f > 1 else slice(None) for f in scale)
    # exact for linear and Keys cubic (a=-0.5); Lanczos-3 and torch's a=-0.75 are not linear-exact
    err = np.abs(y[inner] - want[inner]).max()
    assert err < tol
    if tol > 1e-3:
        assert err > 1e-3  # the known phase error is really there (the test can tell them apart)


@pytest.mark.parametrize("method,tol", [("cubic", 1e-3), ("lanczos", 1e-2), ("linear", 1.5e-2)])
@pytest.mark.parametrize("dims", [2, 3])
def test_smooth_function_is_reproduced(method, tol, dims):
    f = 2
    n = 16
    def field(coords):  # a smooth test function of continuous coordinates (in LR pixels)
        return sum(np.sin(0.35 * c + k) for k, c in enumerate(coords))
    lr = np.meshgrid(*(np.arange(n, dtype=np.float64) for _ in range(dims)), indexing="ij")
    hr_c = (np.arange(n * f) + 0.5) / f - 0.5
    hr = np.meshgrid(*(hr_c for _ in range(dims)), indexing="ij")
    net = build_model(method, spatial_dims=dims, in_channels=1, scale=f)
    y = net(torch.from_numpy(field(lr)).float()[None, None])[0, 0].numpy()
    err = np.abs(y - field(hr))[(slice(8, -8),) * dims]
    assert err.max() < tol * dims  # the field is a sum of `dims` unit sines


def test_polyphase_bicubic_equals_torch_bicubic():
    x = torch.rand(2, 3, 9, 13)
    for scale in [(2, 2), (3, 2), (1, 4)]:
        fast = Interpolate(2, 3, scale, method="cubic", a=-0.75)  # F.interpolate path
        poly = Interpolate(2, 3, scale, method="cubic", a=-0.75 + 1e-12)  # forces the polyphase path
        assert fast._torch_path and not poly._torch_path
        ref = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False)
        torch.testing.assert_close(fast(x), ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(poly(x), ref, rtol=0, atol=1e-5)


def test_nearest_and_weights():
    x = torch.arange(6.0).reshape(1, 1, 2, 3)
    y = build_model("nearest", spatial_dims=2, in_channels=1, scale=(2, 1))(x)
    assert y[0, 0].tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    for method in ("linear", "cubic", "lanczos"):
        w = polyphase_weights(method, 3)
        np.testing.assert_allclose(w.sum(1), 1.0)
        np.testing.assert_allclose(w[1], w[1][::-1])  # the middle phase of an odd factor is symmetric
        np.testing.assert_allclose(w[0], w[2][::-1])  # outer phases mirror each other


def test_reflect_boundary_differs_only_at_the_border():
    x = torch.rand(1, 1, 10, 10)
    a = build_model("cubic", spatial_dims=2, in_channels=1, scale=2)(x)
    b = build_model("cubic", spatial_dims=2, in_channels=1, scale=2, boundary="reflect")(x)
    torch.testing.assert_close(a[..., 4:-4, 4:-4], b[..., 4:-4, 4:-4], rtol=0, atol=1e-6)
    assert (a - b).abs().max() > 1e-3
