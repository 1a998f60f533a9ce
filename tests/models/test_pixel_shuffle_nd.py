"""The per-axis N-D pixel shuffle and the upsampler stages."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from domainsr.errors import ModelError
from domainsr.models.layers import as_scale, pixel_shuffle_nd, upsample_stages


def test_matches_torch_pixel_shuffle_in_2d():
    x = torch.randn(2, 3 * 9, 4, 5)
    torch.testing.assert_close(pixel_shuffle_nd(x, (3, 3)), F.pixel_shuffle(x, 3), rtol=0, atol=0)


@pytest.mark.parametrize("scale", [(1, 1, 4), (2, 2, 2), (1, 2, 3), (1, 4), (2, 1)])
def test_anisotropic_block_layout(scale):
    d = len(scale)
    n_sub = 1
    for s in scale:
        n_sub *= s
    sp = (3,) * d
    x = torch.arange(2 * n_sub * 27 if d == 3 else 2 * n_sub * 9, dtype=torch.float32).reshape(1, 2 * n_sub, *sp)
    y = pixel_shuffle_nd(x, scale)
    assert y.shape == (1, 2) + tuple(3 * s for s in scale)
    # output voxel (p * s + o) of channel c comes from input channel c*n + ravel(o), voxel p
    for c in range(2):
        for pos in [(0,) * d, (2,) * d, tuple(range(d))]:
            for off in [(0,) * d, tuple(s - 1 for s in scale)]:
                sub = 0
                for o, s in zip(off, scale):
                    sub = sub * s + o
                out = tuple(p * s + o for p, s, o in zip(pos, scale, off))
                assert y[(0, c) + out] == x[(0, c * n_sub + sub) + pos]


def test_errors_and_stages():
    with pytest.raises(ModelError):
        pixel_shuffle_nd(torch.zeros(1, 3, 4, 4), (2, 2))
    with pytest.raises(ModelError):
        as_scale((2, 0), 2)
    with pytest.raises(ModelError):
        as_scale((2, 2), 3)
    assert upsample_stages((4, 4)) == [(2, 2), (2, 2)]
    assert upsample_stages((1, 1, 4)) == [(1, 1, 2), (1, 1, 2)]
    assert upsample_stages((2, 3)) == [(2, 3)]
    assert upsample_stages((8, 2)) == [(2, 2), (2, 1), (2, 1)]
    assert upsample_stages((1, 1)) == []
