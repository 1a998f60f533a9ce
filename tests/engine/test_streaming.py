"""Streaming a GeoTIFF window by window equals the in-memory enhancement and writes a COG on the
scaled grid."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
import torch
from engine_testmodels import ConvSR, Counting
from rasterio.transform import from_origin

from domainsr.engine import PatchInferer, enhance_image, enhance_raster_file
from domainsr.errors import InputError, ModelCardMismatch
from domainsr.io.raster import read_raster, write_raster


class Scaled(torch.nn.Module):
    """DN in, DN out: a conv net on reflectance-like values (the normalisation wrapper's job)."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net
        for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
            setattr(self, k, getattr(net, k))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x / 1000.0) * 1000.0


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    """A 1500 x 1300 x 4 uint16 GeoTIFF with a nodata corner and a stray nodata pixel."""
    rng = np.random.default_rng(7)
    rows, cols = 1500, 1300
    data = (rng.random((4, rows, cols)) * 3000 + 50).astype(np.uint16)
    data[:, :400, :500] = 0
    data[1, 900, 700] = 0
    path = tmp_path_factory.mktemp("stream") / "scene.tif"
    with rasterio.open(path, "w", driver="GTiff", width=cols, height=rows, count=4, dtype="uint16",
                       crs="EPSG:32618", transform=from_origin(600000, 4200000, 10, 10), nodata=0,
                       tiled=True, blockxsize=256, blockysize=256, compress="deflate") as ds:
        ds.write(data)
        ds.descriptions = ("B02", "B03", "B04", "B08")
    return path


@pytest.mark.parametrize("overlap", [0, 8])
def test_streaming_equals_in_memory_and_keeps_geometry(scene, tmp_path, overlap):
    model = Counting(Scaled(ConvSR(2, channels=4, scale=(2, 2), depth=2, feats=4)))
    inferer = PatchInferer(model, tile=(200, 256), overlap=overlap)
    out = enhance_raster_file(scene, tmp_path / "sr.tif", inferer)
    streamed_tiles = model.tiles
    assert out == tmp_path / "sr.tif" and inferer.stats.skipped >= 1
    assert streamed_tiles == inferer.stats.computed < inferer.stats.tiles

    ref_path = write_raster(enhance_image(read_raster(scene), inferer), tmp_path / "mem.tif")
    with rasterio.open(scene) as lr, rasterio.open(out) as sr, rasterio.open(ref_path) as ref:
        a, b = sr.read(), ref.read()
        np.testing.assert_array_equal(a, b)
        assert sr.crs == lr.crs and sr.bounds == lr.bounds
        assert sr.transform.almost_equals(lr.transform @ lr.transform.scale(0.5, 0.5))
        assert (sr.height, sr.width) == (3000, 2600) and sr.dtypes[0] == "uint16" and sr.nodata == 0
        assert sr.descriptions == lr.descriptions
        assert sr.profile["tiled"] and sr.overviews(1)  # a COG with overviews
        assert "DOMAINSR_ENHANCE" in sr.tags()
        assert (a[:, :800, :1000] == 0).all()  # the nodata corner
        assert (a[:, 1800:1802, 1400:1402] == 0).all()  # the stray pixel, all bands (read_raster's rule)
        assert (a[:, 1000:, :] > 0).sum() == 4 * 2000 * 2600 - 16


def test_streaming_refuses_mismatched_inputs(scene, tmp_path):
    with pytest.raises(ModelCardMismatch, match="scene.tif.*3 channels"):
        enhance_raster_file(scene, tmp_path / "x.tif", PatchInferer(ConvSR(2, channels=3), tile=64))
    with pytest.raises(InputError, match="not found"):
        enhance_raster_file(tmp_path / "missing.tif", tmp_path / "x.tif", PatchInferer(ConvSR(2, channels=4)))
    assert not (tmp_path / "x.tif").exists()


def test_streaming_band_selection_and_dtype(tmp_path):
    path = tmp_path / "small.tif"
    with rasterio.open(path, "w", driver="GTiff", width=90, height=70, count=3, dtype="int16",
                       crs="EPSG:4326", transform=from_origin(10, 50, 0.01, 0.01)) as ds:
        ds.write(np.arange(3 * 70 * 90, dtype=np.int16).reshape(3, 70, 90) % 1000)
        ds.descriptions = ("red", "green", "nir")
    inferer = PatchInferer(ConvSR(2, channels=2, scale=(3, 3), depth=1, feats=2), tile=40)
    out = enhance_raster_file(path, tmp_path / "b.tif", inferer, bands=["nir", 1], dtype="float32")
    with rasterio.open(out) as sr:
        assert sr.count == 2 and sr.descriptions == ("nir", "red") and sr.dtypes[0] == "float32"
        assert sr.shape == (210, 270) and sr.nodata is None
        lr = read_raster(path, bands=[3, 1])
        np.testing.assert_allclose(sr.read(), inferer.run(lr.data), atol=1e-3)
