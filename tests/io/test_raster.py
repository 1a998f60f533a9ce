"""Raster IO: real and synthetic round trips through COG, windows, streaming writes, bad input."""
from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from rasterio.windows import Window
from rio_cogeo.cogeo import cog_validate

from domainsr.errors import DomainSRError, GeometryError, InputError, OutputError, UnsupportedFormatError
from domainsr.image import GeoGeometry, SpatialImage
from domainsr.io.raster import (
    RasterWindowReader,
    RasterWindowWriter,
    iter_windows,
    raster_info,
    read_raster,
    write_raster,
)

UTM = "EPSG:32618"


UTM_GRID = Affine(10, 0, 400000, 0, -10, 4500000)


def make_tif(path: Path, data: np.ndarray, *, transform=UTM_GRID, crs=UTM,
             nodata=None, descriptions=None, units=None, tags=None, mask=None, **extra) -> Path:
    profile = dict(driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                   dtype=data.dtype.name, transform=transform, nodata=nodata, **extra)
    if crs is not None:
        profile["crs"] = crs
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
        for i, d in enumerate(descriptions or [], start=1):
            dst.set_band_description(i, d)
        for i, u in enumerate(units or [], start=1):
            dst.set_band_unit(i, u)
        if tags:
            dst.update_tags(**tags)
        if mask is not None:
            dst.write_mask(mask.astype(np.uint8) * 255)
    return path


def assert_same_image(a: SpatialImage, b: SpatialImage) -> None:
    """Equal pixels where valid, equal metadata; invalid pixels hold nodata in every band of ``b``."""
    assert a.data.dtype == b.data.dtype
    if a.mask is None:
        np.testing.assert_array_equal(a.data, b.data)
    else:
        np.testing.assert_array_equal(a.data[:, a.mask], b.data[:, a.mask])
        if b.nodata is not None:
            np.testing.assert_array_equal(b.data[:, ~a.mask], np.full_like(b.data[:, ~a.mask], b.nodata))
    assert a.geometry.crs == b.geometry.crs
    assert a.geometry.shape == b.geometry.shape
    assert a.geometry.transform.almost_equals(b.geometry.transform, precision=1e-9)
    assert a.band_names == b.band_names
    assert a.units == b.units
    assert (a.nodata is None) == (b.nodata is None)
    if a.nodata is not None:
        assert a.nodata == b.nodata or (np.isnan(a.nodata) and np.isnan(b.nodata))
    assert (a.mask is None) == (b.mask is None)
    if a.mask is not None:
        np.testing.assert_array_equal(a.mask, b.mask)


def assert_cog(path: Path) -> None:
    valid, errors, _warnings = cog_validate(str(path), strict=False)
    assert valid, errors


def test_real_sentinel2_band_cog_round_trip(sample_data, tmp_path):
    src = next(sample_data["sentinel2"].glob("*B02*"))
    img = read_raster(src)
    assert img.data.shape == (1, 1947, 1933) and img.data.dtype == np.uint16
    assert img.geometry.crs.to_epsg() == 32618 and img.geometry.res == (10.0, 10.0)
    assert img.mask is None and img.nodata is None and img.units == "DN"
    out = write_raster(img, tmp_path / "b02.tif")
    assert_cog(out)
    back = read_raster(out)
    assert_same_image(img, back)
    info = raster_info(out)
    assert info["overviews"] == [2, 4] and info["block_shapes"] == [[512, 512]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b02.tif"]


def test_point_convention_geotransform_survives(sample_data, tmp_path):
    # Landsat bands are PixelIsPoint: GDAL shifts the transform on read and must shift it back on write.
    img = read_raster(sample_data["landsat8"] / "l8_B8.tif")
    assert img.meta["raster"]["tags"]["AREA_OR_POINT"] == "Point"
    back = read_raster(write_raster(img, tmp_path / "pan.tif"))
    assert_same_image(img, back)
    assert back.meta["raster"]["tags"]["AREA_OR_POINT"] == "Point"


def _synthetic(dtype: str, nodata, rng: np.random.Generator, shape=(3, 70, 90)) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "f":
        data = rng.normal(100, 50, shape).astype(dt)
    else:
        info = np.iinfo(dt)
        lo, hi = max(info.min, -30000), min(info.max, 60000)
        data = rng.integers(lo, hi, shape, endpoint=True).astype(dt)
    if nodata is not None:
        if not np.isnan(nodata):
            data[data == dt.type(nodata)] = nodata - 1 if nodata > 0 else nodata + 1
        data[:, 10:20, 30:45] = nodata
        data[1, 50, 60] = nodata  # invalid in one band only -> the pixel is invalid (all bands on write)
    return data


@pytest.mark.parametrize("dtype,nodata", [
    ("uint8", 0), ("uint16", 65535), ("int16", -9999), ("uint32", None), ("int32", -1),
    ("float32", float("nan")), ("float64", -1e30),
])
def test_synthetic_round_trip(tmp_path, dtype, nodata):
    rng = np.random.default_rng(7)
    data = _synthetic(dtype, nodata, rng)
    src = make_tif(tmp_path / "src.tif", data, nodata=nodata, descriptions=["red", "green", "nir"],
                   units=["W/m2"] * 3, tags={"SENSOR": "synthetic", "AREA_OR_POINT": "Area"})
    img = read_raster(src)
    assert img.data.dtype == np.dtype(dtype) and img.band_names == ("red", "green", "nir")
    assert img.units == "W/m2" and img.meta["raster"]["tags"]["SENSOR"] == "synthetic"
    if nodata is None:
        assert img.mask is None
    else:
        expected = np.ones(data.shape[1:], bool)
        expected[10:20, 30:45] = False
        expected[50, 60] = False
        np.testing.assert_array_equal(img.mask, expected)
    out = write_raster(img, tmp_path / "out.tif")
    assert_cog(out)
    back = read_raster(out)
    assert_same_image(img, back)
    assert back.meta["raster"]["tags"]["SENSOR"] == "synthetic"


def test_internal_mask_and_nan_without_nodata(tmp_path):
    rng = np.random.default_rng(1)
    data = rng.normal(size=(2, 40, 50)).astype(np.float32)
    data[0, 3, 4] = np.nan
    data[1, 5, 6] = np.inf
    mask = np.ones((40, 50), bool)
    mask[20:, :10] = False
    img = read_raster(make_tif(tmp_path / "m.tif", data, mask=mask))
    expected = mask.copy()
    expected[3, 4] = expected[5, 6] = False
    np.testing.assert_array_equal(img.mask, expected)
    assert img.nodata is None
    back = read_raster(write_raster(img, tmp_path / "out.tif"))
    assert back.nodata is None  # the mask is stored as a mask band, no value is sacrificed
    np.testing.assert_array_equal(back.mask, expected)
    np.testing.assert_array_equal(back.data[:, expected], data[:, expected])


def test_rotated_geotransform_round_trip(tmp_path):
    transform = Affine(8.660254, -5.0, 500000.0, -5.0, -8.660254, 4600000.0)  # 30 degrees
    data = np.arange(2 * 60 * 80, dtype=np.uint16).reshape(2, 60, 80)
    img = read_raster(make_tif(tmp_path / "rot.tif", data, transform=transform))
    assert img.geometry.is_rotated
    assert img.geometry.transform.almost_equals(transform, precision=1e-9)
    out = write_raster(img, tmp_path / "out.tif")
    assert_cog(out)
    assert_same_image(img, read_raster(out))
    scaled = img.geometry.scaled((2, 2))
    assert np.allclose(scaled.bounds, img.geometry.bounds)


def test_window_and_band_selection(sample_data):
    src = next(sample_data["sentinel2"].glob("*B05*"))
    full = read_raster(src)
    win = read_raster(src, window=((100, 357), (40, 301)))
    np.testing.assert_array_equal(win.data, full.data[:, 100:357, 40:301])
    assert win.geometry.almost_equal(full.geometry.cropped((100, 40), (257, 261)))
    same = read_raster(src, window=Window(40, 100, 261, 257))
    np.testing.assert_array_equal(same.data, win.data)
    assert win.provenance["window"] == {"row_off": 100, "col_off": 40, "height": 257, "width": 261}
    with pytest.raises(InputError, match="outside"):
        read_raster(src, window=((900, 1000), (0, 10)))


def test_bands_by_index_and_name(tmp_path):
    data = np.stack([np.full((8, 9), v, np.int16) for v in (1, 2, 3)])
    src = make_tif(tmp_path / "b.tif", data, descriptions=["a", "b", "c"])
    img = read_raster(src, bands=["c", "a"])
    assert img.band_names == ("c", "a") and img.data[:, 0, 0].tolist() == [3, 1]
    assert read_raster(src, bands=[2]).data[0, 0, 0] == 2
    for bad in (["zz"], [0], [4]):
        with pytest.raises(InputError, match="b.tif"):
            read_raster(src, bands=bad)
    plain = make_tif(tmp_path / "plain.tif", data)
    assert read_raster(plain).band_names == ("B1", "B2", "B3")


def test_window_reader_reads_windows_as_read_raster_reads_the_whole(tmp_path):
    rng = np.random.default_rng(3)
    data = rng.integers(0, 500, (3, 70, 90)).astype(np.uint16)
    data[:, :5, :7] = 0
    path = make_tif(tmp_path / "w.tif", data, nodata=0, descriptions=["B02", "B03", "B04"], units=["DN"] * 3)
    whole = read_raster(path, bands=["B04", "B02"])
    with RasterWindowReader(path, bands=["B04", "B02"]) as src:
        assert (src.shape, src.channels, src.band_names, src.dtype, src.nodata) == ((70, 90), 2, ("B04", "B02"),
                                                                                    "uint16", 0)
        assert src.geometry.almost_equal(whole.geometry) and src.may_be_invalid
        meta = src.meta()
        assert meta["indexes"] == [3, 1] and meta["descriptions"] == ["B04", "B02"] and meta == whole.meta["raster"]
        for win in iter_windows(src.shape, (32, 40)):
            pixels, valid = src.read(win)
            rows, cols = win.toslices()
            np.testing.assert_array_equal(pixels, whole.data[:, rows, cols])
            np.testing.assert_array_equal(np.ones(pixels.shape[1:], bool) if valid is None else valid,
                                          whole.valid_mask()[rows, cols])
        part = src.image(((10, 20), (5, 25)))
        assert_same_image(part, read_raster(path, window=((10, 20), (5, 25)), bands=["B04", "B02"]))
        with pytest.raises(InputError, match="outside the 70x90 raster"):
            src.read(((60, 80), (0, 10)))
    with pytest.raises(InputError, match="no band named"):
        RasterWindowReader(path, bands=["B08"])


def test_window_reader_reports_header_problems_when_they_matter(tmp_path):
    path = make_tif(tmp_path / "nocrs.tif", np.ones((1, 8, 8), np.uint8), crs=None)
    with RasterWindowReader(path) as src:
        pixels, valid = src.read()  # pixels need no CRS
        assert pixels.shape == (1, 8, 8) and valid is None and not src.may_be_invalid
        with pytest.raises(GeometryError, match="no coordinate reference system"):
            _ = src.geometry
    with pytest.raises(InputError, match="file not found"):
        RasterWindowReader(tmp_path / "missing.tif")


def test_storage_conversion_rounds_clips_and_protects_nodata(tmp_path):
    geom = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 1000), (1, 8))
    vals = np.array([[[-3.7, 0.2, 0.5, 1.5, 2.5, 70000.4, 123.49, 9.0]]], np.float32)
    mask = np.array([[True] * 7 + [False]])
    img = SpatialImage(vals, "optical", geom, nodata=0, mask=mask, meta={"storage_dtype": "uint16"})
    back = read_raster(write_raster(img, tmp_path / "u16.tif"))
    assert back.data.dtype == np.uint16
    # valid pixels never take the nodata value 0; half-way values round to even; last pixel is nodata
    assert back.data[0, 0].tolist() == [1, 1, 1, 2, 2, 65535, 123, 0]
    np.testing.assert_array_equal(back.mask, mask)
    # nodata inside the range: invalid pixels get it, a valid pixel equal to it is moved off by one
    geom3 = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 1000), (1, 3))
    img16 = SpatialImage(np.array([[[5, -9999, 7]]], np.int16), "optical", geom3, nodata=-9999,
                         mask=np.array([[True, False, True]]))
    back16 = read_raster(write_raster(img16, tmp_path / "i16.tif"))
    assert back16.data[0, 0].tolist() == [5, -9999, 7] and back16.mask.tolist() == [[True, False, True]]
    img16.mask = None
    back16 = read_raster(write_raster(img16, tmp_path / "i16b.tif", dtype="int16"))
    assert back16.data[0, 0].tolist() == [5, -9998, 7] and back16.mask is None


@pytest.mark.parametrize("dtype", ["int8", "complex64"])
def test_unsupported_dtype(tmp_path, dtype):
    src = make_tif(tmp_path / f"{dtype}.tif", np.zeros((1, 4, 4), dtype))
    with pytest.raises(UnsupportedFormatError, match=f"{dtype}.tif.*{dtype}"):
        read_raster(src)


def test_jp2_is_read_like_any_gdal_raster(tmp_path):
    data = np.random.default_rng(3).integers(0, 4000, (1, 64, 48), dtype=np.uint16)
    tif = make_tif(tmp_path / "a.tif", data)
    rasterio.shutil.copy(tif, tmp_path / "a.jp2", driver="JP2OpenJPEG", REVERSIBLE="YES", QUALITY="100")
    img = read_raster(tmp_path / "a.jp2")
    assert img.meta["raster"]["driver"] == "JP2OpenJPEG"
    assert_same_image(read_raster(tif), img)


def test_bad_inputs_name_the_file(tmp_path, sample_data):
    good = write_raster(read_raster(sample_data["landsat8"] / "l8_B2.tif"), tmp_path / "good.tif")
    raw = good.read_bytes()
    cases = {
        "truncated_half.tif": raw[: len(raw) // 2],
        "truncated_header.tif": raw[:100],
        "text.tif": b"this is not a raster\n",
    }
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(InputError) as err:
            read_raster(tmp_path / name)
        assert name in str(err.value) and err.value.path == str(tmp_path / name)
    nocrs = make_tif(tmp_path / "nocrs.tif", np.zeros((1, 5, 5), np.uint8), crs=None)
    with pytest.raises(GeometryError, match="nocrs.tif: .*no coordinate reference system"):
        read_raster(nocrs)
    with pytest.raises(InputError, match="missing.tif: file not found"):
        read_raster(tmp_path / "missing.tif")
    with pytest.raises(InputError, match="folder"):
        read_raster(tmp_path)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_failed_writes_leave_nothing(tmp_path):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    geom = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 1000), (64, 64))
    with pytest.raises(RuntimeError, match="boom"), RasterWindowWriter(out_dir / "a.tif", geom, 1, "uint16") as w:
        w.write(np.ones((1, 32, 32), np.uint16), 0, 0)
        raise RuntimeError("boom")
    assert _files(out_dir) == []
    nan_data = np.full((1, 64, 64), np.nan, np.float32)
    img = SpatialImage(nan_data, "optical", geom, meta={"storage_dtype": "uint16"})
    with pytest.raises(OutputError, match="b.tif: .*invalid pixels"):
        write_raster(img, out_dir / "b.tif")
    with pytest.raises(OutputError, match="c.jp2"):
        write_raster(img, out_dir / "c.jp2")
    with pytest.raises(OutputError, match="outside"), RasterWindowWriter(out_dir / "d.tif", geom, 1, "uint16") as w:
        w.write(np.ones((1, 32, 32), np.uint16), 40, 40)
    assert _files(out_dir) == []
    # an existing output is left untouched by a failed rewrite
    ok = write_raster(SpatialImage(np.ones((1, 64, 64), np.uint16), "optical", geom), out_dir / "e.tif")
    before = ok.read_bytes()
    with pytest.raises(RuntimeError), RasterWindowWriter(ok, geom, 1, "uint16"):
        raise RuntimeError("boom")
    assert ok.read_bytes() == before and _files(out_dir) == ["e.tif"]


def test_failed_cog_conversion_leaves_nothing(tmp_path, monkeypatch):
    def broken_copy(*args, **kwargs):
        raise rasterio.errors.RasterioIOError("disk full")

    monkeypatch.setattr(rasterio.shutil, "copy", broken_copy)
    img = SpatialImage(np.ones((1, 64, 64), np.uint16), "optical",
                       GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 1000), (64, 64)))
    with pytest.raises(OutputError, match="x.tif: cannot write raster .*disk full"):
        write_raster(img, tmp_path / "x.tif")
    assert _files(tmp_path) == []


def test_float_narrowing_clips_instead_of_overflowing(tmp_path):
    geom = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 1000), (1, 3))
    img = SpatialImage(np.array([[[1e39, -1e39, 0.25]]]), "optical", geom)
    back = read_raster(write_raster(img, tmp_path / "f.tif", dtype="float32"))
    big = np.finfo(np.float32).max
    assert back.data.dtype == np.float32 and back.data[0, 0].tolist() == [big, -big, 0.25]


def test_window_writer_equals_whole_write(sample_data, tmp_path):
    img = read_raster(next(sample_data["sentinel2"].glob("*B8A*")))  # 973 x 967
    mask = np.ones(img.spatial_shape, bool)
    mask[:100, :50] = False
    img = img.derive(img.data, mask=mask, nodata=0)
    whole = write_raster(img, tmp_path / "whole.tif")
    windows = list(iter_windows(img.spatial_shape, (300, 410)))
    assert len(windows) == 4 * 3
    np.random.default_rng(0).shuffle(windows)
    with RasterWindowWriter(tmp_path / "windows.tif", img.geometry, 1, "uint16", nodata=0,
                            band_names=img.band_names, units=img.units,
                            raster_meta=img.meta["raster"]) as w:
        for win in windows:
            rs, cs = win.toslices()
            w.write(img.data[:, rs, cs].astype(np.float32), win.row_off, win.col_off, mask=mask[rs, cs])
    assert_cog(tmp_path / "windows.tif")
    a, b = read_raster(whole), read_raster(tmp_path / "windows.tif")
    assert_same_image(a, b)
    np.testing.assert_array_equal(a.mask, mask)


def test_window_writer_mask_band_marks_unwritten_windows_invalid(tmp_path):
    geom = GeoGeometry(UTM, Affine(20, 0, 0, 0, -20, 0), (100, 100))
    with RasterWindowWriter(tmp_path / "m.tif", geom, 2, "float32", masked=True, blocksize=32) as w:
        w.write(np.ones((2, 50, 100), np.float32), 0, 0)
    back = read_raster(tmp_path / "m.tif")
    assert back.nodata is None and back.mask[:50].all() and not back.mask[50:].any()


def test_window_writer_memory_is_bounded(tmp_path):
    # 3000 x 3000 uint16 = 18 MB; written in 256 x 256 windows the Python-side peak stays tiny.
    geom = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 0), (3000, 3000))
    tile = np.arange(256 * 256, dtype=np.uint16).reshape(1, 256, 256)
    tracemalloc.start()
    with RasterWindowWriter(tmp_path / "big.tif", geom, 1, "uint16", overviews=False) as w:
        for win in iter_windows(geom.shape, 256):
            w.write(tile[:, : win.height, : win.width], win.row_off, win.col_off)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 3_000_000, peak
    info = raster_info(tmp_path / "big.tif")
    assert info["shape"] == [1, 3000, 3000] and info["overviews"] == []
    assert read_raster(tmp_path / "big.tif", window=((2900, 3000), (0, 100))).data[0, 0, 0] == tile[0, 2900 % 256, 0]


def test_plain_geotiff_with_overviews(tmp_path):
    geom = GeoGeometry(UTM, Affine(10, 0, 0, 0, -10, 0), (1200, 1000))
    data = np.random.default_rng(5).random((1, 1200, 1000), dtype=np.float32)
    img = SpatialImage(data, "optical", geom, units="reflectance")
    out = write_raster(img, tmp_path / "plain.tif", cog=False, compress="lzw")
    info = raster_info(out)
    assert info["overviews"] == [2, 4] and info["units"] == ["reflectance"]
    assert_same_image(img, read_raster(out))


def test_iter_windows_cover_exactly():
    seen = np.zeros((70, 45), int)
    for win in iter_windows((70, 45), 16):
        rs, cs = win.toslices()
        seen[rs, cs] += 1
    assert (seen == 1).all()


def test_errors_are_domainsr_errors():
    assert issubclass(UnsupportedFormatError, DomainSRError) and issubclass(GeometryError, DomainSRError)
