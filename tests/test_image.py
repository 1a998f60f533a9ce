"""SpatialImage and geometry: the grid math every output relies on."""
from __future__ import annotations

import numpy as np
import pytest
from affine import Affine

from domainsr.errors import GeometryError, InputError
from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage


def oblique_affine() -> np.ndarray:
    theta = np.deg2rad(17.0)
    rot = np.array([[np.cos(theta), -np.sin(theta), 0], [np.sin(theta), np.cos(theta), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([0.9, 1.1, 3.0])
    aff[:3, 3] = [-90.0, 120.0, -40.0]
    return aff


@pytest.mark.parametrize("factors", [(1, 1, 4), (2, 2, 2), (2, 3, 1)])
def test_medical_scaled_keeps_extent(factors):
    g = MedicalGeometry(oblique_affine(), (20, 16, 12))
    s = g.scaled(factors)
    assert s.shape == tuple(n * f for n, f in zip(g.shape, factors))
    np.testing.assert_allclose(s.spacing, np.array(g.spacing) / factors, rtol=1e-12)
    np.testing.assert_allclose(np.sort(s.extent(), axis=0), np.sort(g.extent(), axis=0), atol=1e-9)
    np.testing.assert_allclose(s.direction, g.direction, atol=1e-12)


def test_medical_scaled_pixel_centres():
    g = MedicalGeometry(np.diag([1.0, 1.0, 1.0, 1.0]), (4, 4, 4))
    s = g.scaled((1, 1, 4))
    # first new slice centre sits 3/8 mm before the first old centre; mean of 4 sub-slices = old centre
    assert s.index_to_world([0, 0, 0])[2] == pytest.approx(-0.375)
    assert np.mean([s.index_to_world([0, 0, k])[2] for k in range(4)]) == pytest.approx(0.0)


def test_geo_scaled_same_bounds():
    g = GeoGeometry("EPSG:32618", Affine(10, 0, 300000, 0, -10, 4100040), (1947, 1933))
    s = g.scaled((2, 2))
    assert s.res == (5.0, 5.0)
    assert s.shape == (3894, 3866)
    assert s.bounds == pytest.approx(g.bounds)
    # pixel centres of the 2x2 block average to the LR pixel centre
    xs, ys = s.index_to_world(np.array([0, 0, 1, 1]), np.array([0, 1, 0, 1]))
    x0, y0 = g.index_to_world(np.array([0]), np.array([0]))
    assert xs.mean() == pytest.approx(x0[0]) and ys.mean() == pytest.approx(y0[0])


def test_geo_rotated_kept():
    t = Affine(10, 2, 500000, 1.5, -10, 4000000)
    g = GeoGeometry("EPSG:32633", t, (100, 80))
    assert g.is_rotated
    s = g.scaled(2)
    assert s.transform.almost_equals(t @ Affine.scale(0.5, 0.5))


def test_bad_geometry_errors():
    with pytest.raises(GeometryError):
        GeoGeometry(None, Affine.identity(), (3, 3))
    with pytest.raises(GeometryError):
        MedicalGeometry(np.zeros((4, 4)), (3, 3, 3))
    with pytest.raises(GeometryError):
        MedicalGeometry(np.eye(4), (3, 3, 3)).scaled((1, 1, 0.3))
    g = MedicalGeometry(np.eye(4), (3, 3, 3))
    with pytest.raises(GeometryError):
        SpatialImage(np.zeros((1, 3, 3, 4)), "mri", g)
    with pytest.raises(GeometryError):
        SpatialImage(np.zeros((1, 3, 3, 3)), "xray", g)


def test_derive_keeps_metadata_and_records_history():
    g = MedicalGeometry(np.eye(4), (3, 3, 3))
    img = SpatialImage(np.zeros((1, 3, 3, 3), np.float32), "ct", g, units="HU",
                       provenance={"source": "a.nii"}, meta={"storage_dtype": "int16"})
    out = img.derive(np.ones((1, 3, 3, 6), np.float32), geometry=g.scaled((1, 1, 2)), mask=None,
                     step={"op": "enhance", "model": "m"})
    assert out.units == "HU" and out.meta["storage_dtype"] == "int16"
    assert out.provenance["history"][-1]["op"] == "enhance"
    assert img.provenance["history"] == []


def _four_bands() -> SpatialImage:
    g = GeoGeometry("EPSG:32618", Affine(10, 0, 400000, 0, -10, 4500000), (4, 5))
    data = np.stack([np.full((4, 5), v, np.uint16) for v in (2, 3, 4, 8)])
    mask = np.ones((4, 5), bool)
    mask[0, 0] = False
    raster = {"descriptions": ["B02", "B03", "B04", "B08"], "scales": [1.0, 2.0, 3.0, 4.0], "tags": {"a": "1"},
              "indexes": [1, 2, 3, 4]}
    return SpatialImage(data, "optical", g, band_names=("B02", "B03", "B04", "B08"), units="DN", nodata=0,
                        mask=mask, provenance={"source": "s2.tif", "format": "raster"},
                        meta={"raster": raster, "storage_dtype": "uint16"})


def test_select_takes_bands_by_any_spelling_and_keeps_the_rest():
    img = _four_bands()
    out = img.select(["b8", "B2"])
    assert out.band_names == ("B08", "B02") and out.data[:, 1, 1].tolist() == [8, 2]
    assert out.geometry is img.geometry and out.nodata == 0 and out.units == "DN"
    np.testing.assert_array_equal(out.mask, img.mask)
    assert out.provenance["source"] == "s2.tif" and out.provenance is not img.provenance
    assert out.meta["raster"]["descriptions"] == ["B08", "B02"] and out.meta["raster"]["scales"] == [4.0, 1.0]
    assert out.meta["raster"]["indexes"] == [4, 1] and out.meta["raster"]["tags"] == {"a": "1"}
    assert img.meta["raster"]["scales"] == [1.0, 2.0, 3.0, 4.0]  # the source is untouched


def test_select_of_every_band_shares_the_pixels_and_a_missing_band_names_the_source():
    img = _four_bands()
    same = img.select(["B2", "B3", "B4", "B8"])
    assert same.data is img.data and same is not img
    with pytest.raises(InputError, match=r"bands \['B05'\] are not in the image's bands") as err:
        img.select(["B02", "B05"])
    assert err.value.path is not None and "s2.tif" in str(err.value.path)
