"""Band names: the alias rule (B2 = b02 = B02, B8A != B8), band maps and their errors, and the
alias rule where bands are compared: model cards, --bands, band sets, rasters without descriptions."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.bands import apply_band_map, band_key, canonical_band, described, parse_band_map, same_bands
from domainsr.errors import ConfigError, InputError, ModelCardMismatch
from domainsr.image import GeoGeometry, SpatialImage


@pytest.mark.parametrize("spelling", ["B02", "B2", "b02", "b2", "band_2", "Band 2", "BAND-02", " B02 "])
def test_spellings_of_one_band_share_a_key(spelling):
    assert band_key(spelling) == "B2" and canonical_band(spelling) == "B02"


def test_b8a_is_not_b8_and_other_names_compare_ignoring_case():
    assert band_key("B8a") == band_key("B8A") == "B8A" != band_key("B08")
    assert band_key("red") == band_key("RED") == "RED" and canonical_band("red") == "red"
    assert canonical_band("B04", ("B1", "B2", "B3", "B4")) == "B4"  # Landsat 8 spelling
    assert same_bands(["B2", "B3", "B4", "B8"], ["B02", "B03", "B04", "B08"])
    assert not same_bands(["B2", "B3", "B4", "B8A"], ["B02", "B03", "B04", "B08"])


def test_band_maps_parse_from_text_mappings_and_lists():
    want = {1: "B02", 2: "B03", 3: "B04", 4: "B08"}
    assert parse_band_map("1=B02,2=B03,3=B04,4=B08") == want
    assert parse_band_map(" 4=B08, 1=B02 ,2=B03,3=B04 ") == want  # any order, spaces
    assert parse_band_map({"1": "B02", 2: "B03", 3: "B04", 4: "B08"}) == want
    assert parse_band_map(["B02", "B03", "B04", "B08"]) == want
    assert parse_band_map(None) is None and parse_band_map("") is None


@pytest.mark.parametrize("text, message", [
    ("1B02", "not INDEX=NAME"), ("x=B02", "not a band number"), ("0=B02", "1 or more"),
    ("1=B02,1=B03", "band 1 twice"), ("1=B02,2=B2", "bands 1 and 2"), ("1=", "empty name"),
])
def test_bad_band_maps_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_band_map(text)


def _raster(names, descriptions=None, units="DN") -> SpatialImage:
    data = np.full((len(names), 16, 16), 1500, np.uint16)
    img = SpatialImage(data, "optical", GeoGeometry("EPSG:32618", (10, 0, 0, 0, -10, 0), (16, 16)),
                       tuple(names), units=units, meta={"raster": {"descriptions": descriptions}})
    img.provenance["source"] = "/data/stack.tif"
    return img


def test_a_band_map_names_an_undescribed_file():
    plain = _raster(["B1", "B2", "B3", "B4"], [None] * 4)
    assert not described(plain)
    named = apply_band_map(plain, parse_band_map("1=B02,2=B03,3=B04,4=B08"))
    assert named.band_names == ("B02", "B03", "B04", "B08") and described(named)
    assert named.meta["raster"]["descriptions"] == ["B02", "B03", "B04", "B08"]
    assert plain.band_names == ("B1", "B2", "B3", "B4")  # the original is not changed
    with pytest.raises(InputError, match="band 5 but the file has 4") as err:
        apply_band_map(plain, {5: "B8A"})
    assert "/data/stack.tif" in str(err.value)
    with pytest.raises(InputError, match="share a name"):
        apply_band_map(plain, {1: "B2"})  # band 2 is already B2


def _card():
    from domainsr.models.checkpoints import ModelCard

    return ModelCard.model_validate({
        "name": "s2", "architecture": {"name": "cubic"}, "domain": "optical", "spatial_dims": 2, "scale": (2, 2),
        "in_channels": 4, "out_channels": 4, "bands": ["B02", "B03", "B04", "B08"], "units": "DN",
        "input_range": (0.0, 10000.0), "normalization": {"kind": "fixed", "offset": [0.0] * 4, "scale": [1.0] * 4},
        "receptive_radius": (2, 2)})


def test_the_card_check_accepts_aliases_and_asks_for_a_band_map():
    from domainsr.models.checkpoints import check_input

    card = _card()
    check_input(card, _raster(["B2", "B3", "B4", "B8"], ["B2", "B3", "B4", "B8"]))  # as exported by common tools
    check_input(card, _raster(["b02", "b03", "b04", "b08"], ["b02", "b03", "b04", "b08"]))
    with pytest.raises(ModelCardMismatch, match="differ"):
        check_input(card, _raster(["B2", "B3", "B4", "B8A"], ["B2", "B3", "B4", "B8A"]))
    with pytest.raises(ModelCardMismatch, match=r"does not name its bands.*--band-map 1=B02,2=B03,3=B04,4=B08"):
        check_input(card, _raster(["B1", "B2", "B3", "B4"], [None] * 4))
    check_input(card, apply_band_map(_raster(["B1", "B2", "B3", "B4"], [None] * 4),
                                     parse_band_map("1=B2,2=B3,3=B4,4=B8")))


def test_band_selection_takes_any_spelling(sample_data):
    from domainsr.app.inputs import select_input
    from domainsr.io import read_image
    from domainsr.io.sentinel2 import read_sentinel2

    s2 = read_image(sample_data["sentinel2"])
    assert select_input(s2, ["B2", "b3", "B04", "band_8"]).band_names == ("B02", "B03", "B04", "B08")
    assert read_sentinel2(sample_data["sentinel2"], bands=["B2", "B8a"]).band_names == ("B02", "B8A")
    stack = _raster(["B2", "B3", "B4", "B8"], ["B2", "B3", "B4", "B8"])
    assert select_input(stack, ["B08", "B02"]).band_names == ("B8", "B2")
    with pytest.raises(InputError, match="B05"):
        select_input(stack, ["B05"])


def test_read_item_applies_the_config_band_map_to_undescribed_rasters_only(sample_data, tmp_path):
    import rasterio

    from domainsr.app.inputs import read_item
    from domainsr.config import EnhanceConfig
    from domainsr.stores.local import LocalStore

    write_plain_geotiff(sample_data, tmp_path / "in" / "plain.tif")
    with rasterio.open(tmp_path / "in" / "plain.tif") as ds:
        assert ds.descriptions == (None,) * 4
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    cfg = EnhanceConfig.model_validate({"name": "t", "model": {"name": "cubic", "scale": 2},
                                        "band_map": "1=B02,2=B03,3=B04,4=B08"})
    assert read_item(store, item, cfg).band_names == ("B02", "B03", "B04", "B08")
    cfg = cfg.model_copy(update={"band_map": None})
    assert read_item(store, item, cfg).band_names == ("B1", "B2", "B3", "B4")


def write_plain_geotiff(sample_data, path):
    """A window of the real Sentinel-2 B02, B03, B04, B08 as a GeoTIFF without band descriptions
    (as many tools export a stack)."""
    import rasterio
    from affine import Affine
    from rasterio.windows import Window

    from domainsr.io.sentinel2 import find_sentinel2_bands

    files = find_sentinel2_bands(sample_data["sentinel2"])
    bands = []
    for b in ("B02", "B03", "B04", "B08"):
        with rasterio.open(files[b]) as src:
            win = Window(700, 600, 80, 96)
            bands.append(src.read(1, window=win))
            profile = {"driver": "GTiff", "width": 80, "height": 96, "count": 4, "dtype": src.dtypes[0],
                       "crs": src.crs, "transform": src.transform @ Affine.translation(700, 600)}
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(np.stack(bands))
    return path
