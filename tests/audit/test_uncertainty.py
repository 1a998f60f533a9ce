"""Test-time augmentation: exact inverses, zero spread for an equivariant model, spread where a
model is not."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from domainsr.audit import interpolation_enhancer
from domainsr.audit.uncertainty import augmentations, ensemble_uncertainty, tta_uncertainty
from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage

from .conftest import planted


@pytest.mark.parametrize("dims,mode,count", [(2, "dihedral", 8), (3, "flips", 8), (3, "dihedral", 48)])
def test_augmentations_invert_exactly(dims, mode, count):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2,) + (6,) * dims)
    augs = augmentations(dims, (2,) * dims, mode, max_count=100)
    assert len(augs) == count and augs[0].name == "identity"
    assert len({a.name for a in augs}) == count
    for a in augs:
        assert np.array_equal(a.inverse(a.forward(x)), x)
    assert len(augmentations(dims, (2,) * dims, mode, max_count=4)) == 4
    if dims == 3:  # axes with different scale factors are never swapped
        thick = augmentations(3, (1, 1, 4), "dihedral", 100)
        assert len(thick) == 16 and all(b.perm[2] == 2 for b in thick)


def _raster(shape=(24, 32)):
    rng = np.random.default_rng(1)
    geom = GeoGeometry("EPSG:32618", Affine(20.0, 0, 400000.0, 0, -20.0, 4100000.0), shape)
    return SpatialImage(rng.uniform(0, 1000, (2, *shape)).astype(np.float32), "optical", geom)


def test_an_equivariant_model_has_no_tta_spread():
    lr = _raster()
    cubic = interpolation_enhancer("cubic", 2, (2, 2))
    mean, std, names = tta_uncertainty(cubic, lr, (2, 2), "dihedral", 8)
    assert len(names) == 8 and std.shape == (2, 48, 64)
    assert float(std.max()) < 1e-3
    assert np.allclose(mean, cubic(lr).data, atol=1e-3)


def test_a_position_bound_paste_shows_up_in_the_tta_spread():
    lr = _raster()
    cubic = interpolation_enhancer("cubic", 2, (2, 2))
    model = planted(cubic, (slice(4, 10), slice(6, 12)), [500.0, 500.0])
    _, std, _ = tta_uncertainty(model, lr, (2, 2), "flips", 4)
    assert std[:, 4:10, 6:12].min() > 100.0
    assert std[:, 48 - 10:48 - 4, 64 - 12:64 - 6].min() > 100.0  # and at its mirror image
    assert float(np.median(std)) < 1e-3


def test_tta_on_a_volume_with_swapped_axes_and_ensembles():
    rng = np.random.default_rng(2)
    geom = MedicalGeometry(np.diag([1.0, 1.0, 2.0, 1.0]), (8, 8, 6))
    lr = SpatialImage(rng.normal(size=(1, 8, 8, 6)).astype(np.float32), "mri", geom)
    cubic = interpolation_enhancer("cubic", 1, (2, 2, 2))
    _, std, names = tta_uncertainty(cubic, lr, (2, 2, 2), "dihedral", 6)
    assert len(names) == 6 and float(std.max()) < 1e-3
    linear = interpolation_enhancer("linear", 1, (2, 2, 2))
    mean, spread = ensemble_uncertainty([cubic, linear], lr)
    assert mean.shape == (1, 16, 16, 12) and float(spread.max()) > 0.01
