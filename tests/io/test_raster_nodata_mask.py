"""The valid mask of an integer raster whose only mask is its nodata value is computed from the
pixels read (``RasterWindowReader._nodata_values``): it must equal GDAL's own masks."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from rasterio.windows import Window

from domainsr.io.raster_read import RasterWindowReader


def _write(path, data, nodata, **extra):
    c, h, w = data.shape
    with rasterio.open(path, "w", driver="GTiff", width=w, height=h, count=c, dtype=data.dtype.name,
                       crs="EPSG:32618", transform=from_origin(0, 0, 10, 10), nodata=nodata, tiled=True,
                       blockxsize=16, blockysize=16, compress="deflate", **extra) as dst:
        dst.write(data)


@pytest.mark.parametrize("dtype,nodata", [("uint16", 0), ("int16", -9999), ("uint8", 255)])
def test_nodata_mask_from_pixels_equals_gdal(tmp_path, dtype, nodata):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype)
    data = rng.integers(max(info.min, -20000), min(info.max, 20000), (3, 40, 56)).astype(dtype)
    data[0, 3:9, 5:20] = nodata
    data[2, 30, :] = nodata
    path = tmp_path / "nd.tif"
    _write(path, data, nodata)
    with RasterWindowReader(path) as src:
        assert src._nodata_values == [nodata] * 3
        for box in (((0, 40), (0, 56)), ((2, 31), (4, 33))):
            got, valid = src.read(box)
            gdal = np.all(src._ds.read_masks(window=Window.from_slices(*box)) > 0, axis=0)
            assert valid is not None and np.array_equal(valid, gdal)
            assert np.array_equal(got, data[:, box[0][0]:box[0][1], box[1][0]:box[1][1]])
        _, valid = src.read(((10, 20), (30, 40)))  # no nodata pixel inside
        assert valid is None


def test_float_and_unrepresentable_nodata_use_gdal_masks(tmp_path):
    data = np.ones((1, 20, 20), np.float32)
    data[0, 2, 3] = -1.0
    _write(tmp_path / "f.tif", data, -1.0)
    with RasterWindowReader(tmp_path / "f.tif") as src:
        assert src._nodata_values is None
        _, valid = src.read()
        assert valid is not None and not valid[2, 3] and valid.sum() == 399
