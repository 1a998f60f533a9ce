"""Band-set readers on the real Sentinel-2 / Landsat 8 samples and on small synthetic sets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from domainsr.errors import GeometryError, InputError
from domainsr.io.raster import read_raster, write_raster
from domainsr.io.sentinel2 import find_sentinel2_bands, read_landsat8, read_sentinel2

S2_10M = ("B02", "B03", "B04", "B08")
S2_20M = ("B05", "B06", "B07", "B8A", "B11", "B12")
S2_60M = ("B01", "B09", "B10")


@pytest.fixture(scope="module")
def s2(sample_data):
    return read_sentinel2(sample_data["sentinel2"])


def test_real_sentinel2_groups(s2, sample_data):
    assert list(s2.groups) == ["10m", "20m", "60m"]
    expected = {"10m": (S2_10M, (1947, 1933), 10.0), "20m": (S2_20M, (973, 967), 20.0),
                "60m": (S2_60M, (324, 322), 60.0)}
    for name, (bands, shape, res) in expected.items():
        img = s2.groups[name]
        assert img.band_names == bands
        assert img.data.shape == (len(bands), *shape) and img.data.dtype == np.uint16
        assert img.geometry.res == (res, res) and img.geometry.crs.to_epsg() == 32618
        assert img.units == "DN" and img.nodata == 0 and img.domain == "optical"
        assert img.meta["raster"]["descriptions"] == list(bands)
    # every band's pixels are the file's pixels
    b8a = read_raster(next(sample_data["sentinel2"].glob("*B8A*")))
    np.testing.assert_array_equal(s2.groups["20m"].data[3], b8a.data[0])
    assert s2.select(["B04", "B03", "B02"]).band_names == ("B04", "B03", "B02")


def test_zero_is_nodata(s2):
    g60 = s2.groups["60m"]
    zeros = (g60.data == 0).any(axis=0)
    assert zeros.sum() == 89  # B10 (cirrus) has 89 zero pixels in this sample: no data per the L1C spec
    np.testing.assert_array_equal(g60.mask, ~zeros)
    assert s2.groups["10m"].mask is None and s2.groups["20m"].mask is None


def test_scaled_geometry_keeps_bounds(s2):
    g = s2.groups["10m"].geometry
    up = g.scaled((2, 2))
    assert up.res == (5.0, 5.0) and up.shape == (3894, 3866)
    assert np.allclose(up.bounds, g.bounds, atol=1e-6)
    assert up.crs == g.crs


def test_sample_bounds_offsets_are_recorded(s2):
    # The sample's grids are not nested: 10 m starts 10 m east/north of 20 m, 60 m ends 20 m higher.
    offsets = s2.provenance["bounds_offsets_m"]
    assert offsets["10m"] == [0, 0, 0, 0]
    assert offsets["20m"] == [-10.0, 10.0, 0.0, 0.0]
    assert offsets["60m"] == [-10.0, 50.0, -20.0, 20.0]
    assert s2.groups["20m"].geometry.bounds != s2.groups["10m"].geometry.bounds


def test_align_crops_to_nested_grids(sample_data, s2):
    al = read_sentinel2(sample_data["sentinel2"], align=True)
    shapes = {g: img.spatial_shape for g, img in al.groups.items()}
    assert shapes == {"10m": (1938, 1926), "20m": (969, 963), "60m": (323, 321)}
    fine = al.groups["10m"].geometry
    for name, factor in (("20m", 2), ("60m", 6)):
        geom = al.groups[name].geometry
        assert geom.bounds == fine.bounds
        assert geom.scaled((factor, factor)).almost_equal(fine)
    # cropping reads the same pixels as the unaligned read
    w = al.groups["20m"].provenance["window"]
    full = s2.groups["20m"].data
    np.testing.assert_array_equal(
        al.groups["20m"].data,
        full[:, w["row_off"]:w["row_off"] + w["height"], w["col_off"]:w["col_off"] + w["width"]])


def test_band_subset_and_group_round_trip(sample_data, tmp_path):
    mr = read_sentinel2(sample_data["sentinel2"], bands=["B8A", "B05", "B01"])
    assert list(mr.groups) == ["20m", "60m"]
    assert mr.groups["20m"].band_names == ("B05", "B8A")
    out = write_raster(mr.groups["60m"], tmp_path / "g60.tif")
    back = read_raster(out)
    assert back.band_names == ("B01",) and back.nodata == 0
    np.testing.assert_array_equal(back.data, mr.groups["60m"].data)
    with pytest.raises(InputError, match="B13|not found"):
        read_sentinel2(sample_data["sentinel2"], bands=["B02", "B13"])


def _link_set(src: Path, dst: Path, rename) -> Path:
    dst.mkdir()
    for f in src.iterdir():
        (dst / rename(f.name)).symlink_to(f)
    return dst


def test_safe_style_and_plain_names(sample_data, tmp_path):
    src = sample_data["sentinel2"]
    safe = _link_set(src, tmp_path / "safe", lambda n: f"T18SUJ_20170520T154811_{n[3:-4]}.jp2")
    plain = _link_set(src, tmp_path / "plain", lambda n: n[3:])
    for folder in (safe, plain):
        found = find_sentinel2_bands(folder)
        assert sorted(found) == sorted(S2_10M + S2_20M + S2_60M)
    mr = read_sentinel2(safe, bands=["B02", "B11"])
    assert {g: i.band_names for g, i in mr.groups.items()} == {"10m": ("B02",), "20m": ("B11",)}


def write_band(folder: Path, name: str, res: float, shape, origin=(300000.0, 5000000.0),
               crs="EPSG:32633", value=100) -> Path:
    folder.mkdir(exist_ok=True)
    data = np.full((1, *shape), value, np.uint16)
    path = folder / name
    with rasterio.open(path, "w", driver="GTiff", width=shape[1], height=shape[0], count=1,
                       dtype="uint16", crs=crs, transform=Affine(res, 0, origin[0], 0, -res, origin[1])) as d:
        d.write(data)
    return path


def test_group_comes_from_pixel_size_not_name(tmp_path):
    # a product resampled to 10 m: B05 and B8A at 10 m join the 10 m group in canonical order
    for band in ("B8A", "B02", "B05"):
        write_band(tmp_path, f"x_{band}.tif", 10, (12, 12))
    mr = read_sentinel2(tmp_path)
    assert list(mr.groups) == ["10m"] and mr.groups["10m"].band_names == ("B02", "B05", "B8A")


def test_mismatched_grids_are_refused(tmp_path):
    a = tmp_path / "a"
    write_band(a, "B02.tif", 10, (12, 12))
    write_band(a, "B03.tif", 10, (12, 12), origin=(300010.0, 5000000.0))
    with pytest.raises(GeometryError, match="B02 and B03 .*different grids"):
        read_sentinel2(a)
    b = tmp_path / "b"
    write_band(b, "B02.tif", 10, (12, 12))
    write_band(b, "B05.tif", 20, (6, 6), crs="EPSG:32634")
    with pytest.raises(GeometryError, match="different CRSs"):
        read_sentinel2(b)
    c = tmp_path / "c"
    write_band(c, "B02.tif", 10, (12, 12))
    write_band(c, "B05.tif", 20, (6, 6), origin=(300040.0, 5000000.0))
    with pytest.raises(GeometryError, match="cover different areas"):
        read_sentinel2(c)
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="empty: no band files"):
        read_sentinel2(tmp_path / "empty")
    with pytest.raises(InputError, match="B02 is in several files: .*a/B02.tif"):
        read_sentinel2(tmp_path)
    d = tmp_path / "d"
    write_band(d, "B02.tif", 10, (12, 12))
    write_band(d, "B05.tif", 20, (6, 6), origin=(300005.0, 5000000.0))
    read_sentinel2(d)  # within one pixel of the coarsest group: accepted as is
    with pytest.raises(GeometryError, match="not nested"):
        read_sentinel2(d, align=True)


def test_real_landsat8(sample_data):
    l8 = read_landsat8(sample_data["landsat8"])
    assert list(l8.groups) == ["15m", "30m"]
    ms = l8.groups["30m"]
    assert ms.band_names == ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11")
    assert ms.data.shape == (10, 603, 627) and ms.geometry.crs.to_epsg() == 32616
    assert l8.groups["15m"].band_names == ("B8",) and l8.groups["15m"].spatial_shape == (1207, 1254)
    assert ms.units == "DN" and ms.nodata == 0
    qa = read_landsat8(sample_data["landsat8"], bands=["B8", "BQA"])
    assert list(qa.groups) == ["15m", "qa"] and qa.groups["qa"].band_names == ("BQA",)
