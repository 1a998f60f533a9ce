"""StacStore against a loopback HTTP server (Range requests, basic auth) serving a static catalog
of COGs cut from the real Sentinel-2 sample: select, read over HTTP, enhance, write COG + item into
an output catalog that validates; no duplicates, retries, no partial outputs, no secrets in logs."""
from __future__ import annotations

import base64
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pystac
import pytest
import rasterio
from store_fixtures import S2_ACQUIRED, S2_BANDS, S2_CROPS, stac_url
from store_servers import RangeServer, closed_port

from domainsr.engine import PatchInferer, enhance_image
from domainsr.errors import ConfigError, GeometryError, OutputError, StoreError
from domainsr.io.raster import read_raster, to_storage
from domainsr.models import build_model
from domainsr.stores import stac as stac_module
from domainsr.stores.stac import OfflineValidator, StacStore, datetime_interval

BANDS = ",".join(S2_BANDS)


def enhance(img, scale: int = 2):
    model = build_model("cubic", spatial_dims=2, in_channels=img.channels, scale=scale)
    return enhance_image(img, PatchInferer(model, device="cpu", threads=1))


@pytest.fixture()
def offline_validation():
    """pystac's validate()/validate_all() with the bundled core schemas (no network here)."""
    saved = pystac.validation.RegisteredValidator._validator
    pystac.validation.set_validator(OfflineValidator())
    yield
    pystac.validation.RegisteredValidator._validator = saved


@pytest.fixture()
def extras(tmp_path) -> dict[str, Path]:
    html = tmp_path / "report.html"
    html.write_text("<!doctype html><title>audit</title><p>hallucination regions: 0</p>")
    js = tmp_path / "report.json"
    js.write_text(json.dumps({"regions": [], "psnr_vs_baseline": 0.0}))
    regions = tmp_path / "regions.geojson"
    regions.write_text(json.dumps({"type": "FeatureCollection", "features": []}))
    return {"audit_report": html, "audit_json": js, "regions.geojson": regions}


def source_window(sample_data, band: str, item_id: str, size: int = 256) -> np.ndarray:
    r0, c0 = S2_CROPS[item_id]
    folder = Path(sample_data["sentinel2"])
    return read_raster(folder / f"s2_{band}.jp2", window=((r0, r0 + size), (c0, c0 + size))).data[0]


def tif_gets(server: RangeServer, name: str) -> list[tuple]:
    return [e for e in server.log if e[0] == "GET" and e[1].endswith(name)]


def test_round_trip_over_http_writes_valid_cog_and_item_once(stac_server, stac_catalog, sample_data, tmp_path,
                                                             extras, offline_validation):
    out = tmp_path / "out"
    store = StacStore.from_url(stac_url(stac_server, out, assets=BANDS), retries=2, backoff=0.05)
    items = store.list_items({"collections": "s2-l1c-crops"})
    assert sorted(i.meta["stac_id"] for i in items) == sorted(S2_CROPS)
    item = next(i for i in items if i.meta["stac_id"] == "s2-crop-a")

    img = store.read(item)
    assert img.data.shape == (4, 256, 256) and img.band_names == tuple(S2_BANDS)
    assert img.data.dtype == np.uint16 and img.geometry.res == (10.0, 10.0)
    for i, band in enumerate(S2_BANDS):  # the pixels are the sample's, exactly
        np.testing.assert_array_equal(img.data[i], source_window(sample_data, band, "s2-crop-a"))
    gets = tif_gets(stac_server, "/s2-crop-a/B02.tif")
    assert gets and all(rng and rng.startswith("bytes=") for _, _, rng, _ in gets)  # range requests only

    enhanced = enhance(img)
    result = store.write(item, enhanced, "run-stac-0001", extras=extras)

    # The output catalog validates (core schemas + extension fields) and holds the one item.
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    assert catalog.validate_all() == 1
    (new,) = list(catalog.get_items())
    new.validate()
    assert Path(result.uri).is_file() and result.extras["item"] == str(Path(new.get_self_href()))

    # The COG is valid and holds the enhanced values, stored as the source's uint16.
    from rio_cogeo.cogeo import cog_validate

    valid, errors, _ = cog_validate(result.uri)
    assert valid, errors
    with rasterio.open(result.uri) as cog:
        assert cog.dtypes == ("uint16",) * 4 and cog.descriptions == tuple(S2_BANDS)
        np.testing.assert_array_equal(cog.read(), to_storage(enhanced.data, "uint16", None, None))

    # Geometry: the source grid scaled by 2 over the same extent, same CRS, time and footprint.
    source = pystac.Item.from_dict(json.loads(Path(stac_catalog.parent / "s2-l1c-crops/s2-crop-a/s2-crop-a.json")
                                              .read_text()))
    sp, np_ = source.properties, new.properties
    assert np_["proj:code"] == sp["proj:code"] == "EPSG:32618"
    assert np_["proj:shape"] == [2 * v for v in sp["proj:shape"]]
    st, nt = sp["proj:transform"], np_["proj:transform"]
    assert nt == pytest.approx([st[0] / 2, st[1], st[2], st[3], st[4] / 2, st[5]])
    assert np_["proj:bbox"] == pytest.approx(sp["proj:bbox"])
    assert new.bbox == pytest.approx(source.bbox, abs=1e-9)
    assert new.datetime == S2_ACQUIRED
    assert np_["domainsr:scale"] == [2, 2] and np_["processing:software"]["domainsr"]
    (derived_from,) = new.get_links("derived_from")
    assert derived_from.href == item.uri and item.uri.startswith(stac_server.url)
    for key in ("audit_report", "audit_json"):
        asset = new.assets[key]
        assert asset.roles == ["metadata"] and Path(asset.get_absolute_href()).read_bytes() == extras[key].read_bytes()
    assert new.assets["regions.geojson"].media_type == "application/geo+json"  # QGIS opens it from the item
    assert [b["eo:common_name"] for b in new.assets["data"].extra_fields["bands"]] == list(S2_BANDS.values())

    # Re-running writes nothing new.
    assert store.existing(item, "run-stac-0001") == result
    assert store.write(item, enhanced, "run-stac-0001", extras=extras) == result
    catalog_links = json.loads((out / "catalog.json").read_text())["links"]
    assert sum(link["rel"] == "item" for link in catalog_links) == 1
    assert sorted(p.name for p in out.iterdir()) == [".catalog.lock", "catalog.json", Path(result.uri).parent.name]


def test_selection_by_bbox_datetime_ids_and_clipped_reads(stac_server, tmp_path):
    store = StacStore.from_url(stac_url(stac_server, tmp_path / "out", assets=BANDS))
    everything = {i.meta["stac_id"]: i for i in store.list_items()}
    assert sorted(everything) == sorted(S2_CROPS)
    b_box = everything["s2-crop-b"].meta["bbox"]
    inner = [b_box[0] + 0.002, b_box[1] + 0.002, b_box[2] - 0.002, b_box[3] - 0.002]

    def ids(**q):
        return sorted(i.meta["stac_id"] for i in store.list_items(q))

    assert ids(bbox=inner) == ["s2-crop-b"]
    assert ids(datetime="2018-06-01") == sorted(S2_CROPS)
    assert ids(datetime="2018-06-02/..") == []
    assert ids(datetime=("2018-05-01", "2018-06-01")) == sorted(S2_CROPS)
    assert ids(ids=["s2-crop-a"], collections=["s2-l1c-crops"]) == ["s2-crop-a"]
    assert ids(collections="other") == []

    full = store.read(everything["s2-crop-b"])
    (clipped_item,) = store.list_items({"bbox": inner, "clip": True})
    clipped = store.read(clipped_item)
    r0, c0 = clipped.provenance["window"]["row_off"], clipped.provenance["window"]["col_off"]
    h, w = clipped.spatial_shape
    assert 0 < h < 256 and 0 < w < 256
    np.testing.assert_array_equal(clipped.data, full.data[:, r0:r0 + h, c0:c0 + w])
    assert clipped.geometry.almost_equal(full.geometry.cropped((r0, c0), (h, w)))
    with pytest.raises(ConfigError, match="unknown STAC query key"):
        store.list_items({"box": inner})


def test_windowed_read_fetches_only_part_of_a_large_cog(sample_data, tmp_path):
    """A whole 10 m band (1947 x 1933) as a COG behind the server: a small clipped read fetches a
    small part of the file through range requests."""
    from store_fixtures import single_item_catalog

    from domainsr.io.raster import write_raster

    band = read_raster(Path(sample_data["sentinel2"]) / "s2_B04.jp2")
    cog = write_raster(band, tmp_path / "cat" / "scene" / "B04.tif")
    single_item_catalog(tmp_path / "cat", "scene", {"B04": cog}, band.geometry)
    with RangeServer(tmp_path / "cat") as server:
        store = StacStore.from_url(f"stac+http://127.0.0.1:{server.server_address[1]}/catalog.json",
                                   output=str(tmp_path / "out"))
        west, south = store.list_items()[0].meta["bbox"][:2]
        corner = [west + 0.05, south + 0.05, west + 0.054, south + 0.054]
        img = store.read(store.list_items({"bbox": corner, "clip": True})[0])
        ranges = [e[2] for e in server.log if e[0] == "GET" and e[1].endswith("B04.tif")]
    assert 30 < img.spatial_shape[0] < 60 and 30 < img.spatial_shape[1] < 60
    r0, c0 = img.provenance["window"]["row_off"], img.provenance["window"]["col_off"]
    np.testing.assert_array_equal(img.data, band.data[:, r0:r0 + img.spatial_shape[0], c0:c0 + img.spatial_shape[1]])
    assert ranges and all(r and r.startswith("bytes=") for r in ranges)
    fetched = sum(int(r.split("=")[1].split("-")[1]) - int(r.split("=")[1].split("-")[0]) + 1 for r in ranges)
    assert fetched < cog.stat().st_size / 10, (fetched, cog.stat().st_size)


def test_assets_on_different_grids_are_refused(stac_server, tmp_path):
    store = StacStore.from_url(stac_url(stac_server, tmp_path / "out", assets="B02,B05"))
    item = store.list_items({"ids": "s2-crop-a"})[0]
    with pytest.raises(GeometryError, match="different grids"):
        store.read(item)
    with pytest.raises(Exception, match="no asset"):
        StacStore.from_url(stac_url(stac_server, tmp_path / "out", assets="B99")).list_items({"ids": "s2-crop-a"})


def test_down_server_retries_then_fails_clearly(stac_server, tmp_path, caplog, monkeypatch, tally):
    tally("faults injected")
    caplog.set_level(logging.WARNING, logger="domainsr")
    port = closed_port()
    monkeypatch.setenv("TEST_STAC_PASSWORD", "pw-not-in-messages")
    url = f"stac+http://127.0.0.1:{port}/catalog.json?output={tmp_path / 'o'}&username=reader&password=env:TEST_STAC_PASSWORD"
    with pytest.raises(StoreError) as err:
        StacStore.from_url(url, retries=3, backoff=0.05).list_items()
    msg = str(err.value)
    assert "catalog open failed after 3 tries: connection refused" in msg and f"127.0.0.1:{port}" in msg
    assert "pw-not-in-messages" not in msg
    assert sum("retry" in r.getMessage() for r in caplog.records) == 2
    assert not (tmp_path / "o").exists()


def test_transient_errors_are_retried_and_persistent_ones_write_nothing(stac_server, tmp_path, caplog, tally):
    tally("faults injected", 3)  # two 503s on the catalog, one on a COG, then a persistent outage
    caplog.set_level(logging.WARNING, logger="domainsr")
    out = tmp_path / "out"
    store = StacStore.from_url(stac_url(stac_server, out, assets=BANDS), retries=3, backoff=0.05)
    stac_server.failures.set(count=2, methods=("GET",))
    items = store.list_items()
    assert len(items) == 2
    assert sum("retry" in r.getMessage() and "HTTP 503" in r.getMessage() for r in caplog.records) == 2
    stac_server.failures.set(count=1, methods=("GET",))  # one failed COG request, then fine
    assert store.read(items[1]).data.shape == (4, 256, 256)
    assert sum("read of asset" in r.getMessage() and "retry 1 of 2" in r.getMessage() for r in caplog.records) == 1

    stac_server.failures.set(count=10_000, methods=("GET", "HEAD"))
    with pytest.raises(StoreError, match=r"read of asset 'B02' .* failed after 3 tries: HTTP 503"):
        store.read(items[0])
    assert not out.exists()


def test_failed_write_leaves_nothing_and_a_stop_before_the_catalog_update_heals(stac_server, tmp_path, extras,
                                                                             monkeypatch, offline_validation, tally):
    out = tmp_path / "out"
    store = StacStore.from_url(stac_url(stac_server, out, assets="B04,B08"))
    item = store.list_items({"ids": "s2-crop-b"})[0]
    enhanced = enhance(store.read(item))
    real_write_raster = stac_module.write_raster

    def crash_after_cog(img, path, **kw):
        real_write_raster(img, path, **kw)
        raise OutputError("disk full (simulated)", path)

    monkeypatch.setattr(stac_module, "write_raster", crash_after_cog)
    with pytest.raises(OutputError, match="simulated"):
        store.write(item, enhanced, "run-crash", extras=extras)
    assert not out.exists() or [p.name for p in out.iterdir() if not p.name.startswith(".")] == []
    monkeypatch.setattr(stac_module, "write_raster", real_write_raster)

    def stop_before_catalog(self, out_id, item_json):
        raise KeyboardInterrupt  # the process dies between the item folder and the catalog update

    monkeypatch.setattr(StacStore, "_link_item", stop_before_catalog)
    with pytest.raises(KeyboardInterrupt):
        store.write(item, enhanced, "run-crash", extras=extras)
    monkeypatch.undo()
    assert not (out / "catalog.json").exists()
    result = store.existing(item, "run-crash")  # the complete output is found and linked now
    assert result is not None
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    assert catalog.validate_all() == 1 and len(list(catalog.get_items())) == 1
    assert store.write(item, enhanced, "run-crash") == result
    tally("faults injected", 2)
    tally("items checked after faults")


def test_authentication_failure_is_not_retried(stac_server, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="domainsr")
    monkeypatch.setenv("TEST_STAC_PASSWORD", "wrong")
    with pytest.raises(StoreError, match="catalog open failed: HTTP 401"):
        StacStore.from_url(stac_url(stac_server, tmp_path / "out"), retries=3, backoff=0.05).list_items()
    assert not [r for r in caplog.records if "retry" in r.getMessage()]


def test_no_credentials_in_debug_logs(stac_server, tmp_path, caplog):
    for name in ("", "domainsr", "rasterio", "pystac", "pystac_client", "requests", "urllib3"):
        caplog.set_level(logging.DEBUG, logger=name)
    store = StacStore.from_url(stac_url(stac_server, tmp_path / "out", assets="B03"))
    item = store.list_items({"ids": "s2-crop-a"})[0]
    store.write(item, enhance(store.read(item)), "run-logs")
    text = "\n".join(f"{r.name}: {r.getMessage()}" for r in caplog.records)
    assert "rasterio" in text and "urllib3" in text  # the libraries did log at DEBUG
    basic = base64.b64encode(f"reader:{stac_server.password}".encode()).decode()
    for secret in (stac_server.password, basic, "Authorization"):
        assert secret not in text, f"{secret!r} appeared in the logs"
    assert [e for e in stac_server.log if e[3] is None] == []  # yet every request was authenticated
    assert stac_server.password not in repr(store)


def test_static_catalog_on_disk(stac_catalog, tmp_path, offline_validation):
    root = tmp_path / "catalog"
    shutil.copytree(stac_catalog.parent, root)
    store = StacStore.from_url(f"stac+file://{root / 'catalog.json'}?assets=B02,B03")
    item = store.list_items({"ids": "s2-crop-b"})[0]
    assert Path(item.meta["assets"]["B02"]).is_file()
    result = store.write(item, enhance(store.read(item)), "run-local")
    assert Path(result.uri).parent.parent == root / "domainsr-output"
    assert pystac.Catalog.from_file(str(root / "domainsr-output" / "catalog.json")).validate_all() == 1
    with pytest.raises(ConfigError, match="needs output"):
        StacStore.from_url("stac+https://example.org/catalog.json")


def test_tls_is_verified_for_catalog_and_cogs(stac_catalog, tmp_path, pki):
    with RangeServer(stac_catalog.parent, tls=pki) as server:
        url = f"stac+https://127.0.0.1:{server.server_address[1]}/catalog.json?output={tmp_path / 'o'}"
        with pytest.raises(StoreError, match="catalog open failed: TLS certificate verification failed"):
            StacStore.from_url(url).list_items()
        item = StacStore.from_url(url, verify=str(pki["ca"]), assets="B08").list_items({"ids": "s2-crop-a"})[0]
        with pytest.raises(StoreError, match="read of asset 'B08' .* failed: TLS certificate verification failed"):
            StacStore.from_url(url, assets="B08").read(item)  # GDAL verifies the COG server too
        store = StacStore.from_url(url, verify=str(pki["ca"]), assets="B08")
        img = store.read(store.list_items({"ids": "s2-crop-a"})[0])  # and accepts our CA
        assert img.data.shape == (1, 256, 256)


def test_stac_api_search_is_delegated_to_the_api(stac_server, stac_catalog, tmp_path):
    """A STAC API root (conformsTo item-search) is searched with pystac-client: bbox, datetime,
    collections and ids go to the API's /search; assets are read from where the items point."""
    from store_servers import StacApiServer

    items = []
    for path in sorted(stac_catalog.parent.glob("s2-l1c-crops/*/*.json")):
        item = json.loads(path.read_text())
        item["collection"] = "s2-l1c-crops"
        for asset in item["assets"].values():
            asset["href"] = f"{stac_server.url}/{path.parent.relative_to(stac_catalog.parent)}/{asset['href'][2:]}"
        item["links"] = [{"rel": "self", "href": f"{stac_server.url}/{path.relative_to(stac_catalog.parent)}"}]
        items.append(item)
    with StacApiServer(items) as api:
        store = StacStore.from_url(f"stac+http://127.0.0.1:{api.server_address[1]}/", output=str(tmp_path / "o"),
                                   assets="B04,B08", username="reader", password="env:TEST_STAC_PASSWORD")
        found = store.list_items({"bbox": [-76, 37, -75, 38], "datetime": "2018-06-01",
                                  "collections": ["s2-l1c-crops"], "ids": ["s2-crop-b"], "limit": 5})
        (search,) = api.searches
        assert search["bbox"] == [-76, 37, -75, 38] and search["collections"] == ["s2-l1c-crops"]
        assert search["ids"] == ["s2-crop-b"] and search["datetime"].startswith("2018-06-01T00:00:00")
        assert [i.meta["stac_id"] for i in found] == ["s2-crop-b"]
        with pytest.raises(StoreError, match="HTTP 401"):  # the API's credentials stay on the API's host
            store.read(found[0])
        anonymous = StacStore.from_url(f"stac+http://127.0.0.1:{api.server_address[1]}/",
                                       output=str(tmp_path / "o"), assets="B04,B08")
        assert stac_server.log[-1][3] is None
        stac_server.credentials = None  # an asset host that needs no credentials
        img = anonymous.read(anonymous.list_items({"ids": ["s2-crop-b"]})[0])
        assert img.data.shape == (2, 256, 256)


def test_datetime_interval_parsing():
    lo, hi = datetime_interval("2018-06-01")
    assert (lo.isoformat(), hi.isoformat()) == ("2018-06-01T00:00:00+00:00", "2018-06-01T23:59:59.999999+00:00")
    assert datetime_interval("../2018-01-01T10:00:00Z")[0] is None
    with pytest.raises(ConfigError):
        datetime_interval("yesterday")


@pytest.mark.slow
def test_enhance_flow_against_stac(stac_server, tmp_path, offline_validation, prefect_home):
    """The real flow on the loopback STAC catalog, twice: outputs validate, nothing is duplicated."""
    import yaml

    flows = pytest.importorskip("flows.enhance", reason="flows/enhance.py is not importable")
    out = tmp_path / "out"
    config = tmp_path / "s2_stac.yaml"
    config.write_text(yaml.safe_dump({
        "name": "s2-stac-x2", "domain": "optical", "model": {"name": "cubic", "scale": 2},
        "tiling": {"device": "cpu", "threads": 1},
        "store": {"input": stac_url(stac_server, out, assets=BANDS), "output": str(out),
                  "query": {"collections": ["s2-l1c-crops"]}}}))
    first = flows.enhance_flow(config=str(config))
    assert (first["enhanced"], first["failed"]) == (2, 0), first
    catalog = pystac.Catalog.from_file(str(out / "catalog.json"))
    assert catalog.validate_all() == 2
    for item in catalog.get_items():
        assert item.properties["proj:shape"] == [512, 512]
        assert {"audit.html", "audit.json"} <= set(item.assets)
    second = flows.enhance_flow(config=str(config))
    assert (second["enhanced"], second["skipped"]) == (0, 2)
    assert len(list(pystac.Catalog.from_file(str(out / "catalog.json")).get_items())) == 2


# ------------------------------------------------------------------------ output= and --out

def test_output_option_of_a_file_url_is_honoured(stac_catalog, tmp_path, offline_validation):
    """``?output=`` is where outputs go (it used to be replaced by a keyword default); a served
    catalog is readable by others under the usual umask."""
    import os

    from domainsr.stores import open_store

    wanted = tmp_path / "served" / "catalog.json"
    url = f"stac+file://{stac_catalog}?output={wanted}&assets=B02,B03"
    assert open_store(url).output == wanted
    assert open_store(url, default_output=str(tmp_path / "out")).output == wanted  # a default yields
    assert open_store(url, output=str(wanted.parent)).output == wanted  # the same catalog given twice
    assert open_store(f"stac+file://{stac_catalog}", default_output=str(tmp_path / "out")).output == \
        tmp_path / "out" / "catalog.json"
    store = open_store(url)
    item = store.list_items({"ids": "s2-crop-b"})[0]
    old = os.umask(0o022)
    try:
        result = store.write(item, enhance(store.read(item)), "run-output")
    finally:
        os.umask(old)
    assert Path(result.uri).parent.parent == wanted.parent
    assert pystac.Catalog.from_file(str(wanted)).validate_all() == 1
    assert not (stac_catalog.parent / "domainsr-output").exists()
    assert Path(result.uri).parent.stat().st_mode & 0o777 == 0o755
    assert Path(result.uri).stat().st_mode & 0o777 == 0o644 and wanted.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("how", ["open_store", "from_url", "config"])
def test_output_option_contradicting_out_is_refused(stac_catalog, tmp_path, how):
    from domainsr.config import StoreConfig
    from domainsr.stores import open_store

    url_out, out = tmp_path / "a" / "catalog.json", tmp_path / "b"
    url = f"stac+file://{stac_catalog}?output={url_out}"
    with pytest.raises(ConfigError) as err:
        if how == "open_store":
            open_store(url, output=str(out))
        elif how == "from_url":
            StacStore.from_url(url, output=str(out))
        else:
            open_store(StoreConfig(input=url, output=str(out)))
    text = str(err.value)
    assert str(url_out) in text and str(out) in text and "?output=" in text
    assert not url_out.parent.exists() and not out.exists()


def test_output_option_reaches_the_enhance_run(stac_catalog, tmp_path, monkeypatch):
    """Through the CLI's run builder: ``?output=`` with no ``--out`` is where outputs go (the task
    config's default output folder used to win), and ``--out`` elsewhere is refused."""
    from flows.enhance import build_run

    monkeypatch.chdir(tmp_path)
    wanted = tmp_path / "served" / "catalog.json"
    url = f"stac+file://{stac_catalog}?output={wanted}"
    _, store = build_run(inputs=[url], model="cubic", scale="2")
    assert store.output == wanted
    with pytest.raises(ConfigError, match=r"\?output="):
        build_run(inputs=[url], model="cubic", scale="2", out=str(tmp_path / "elsewhere"))
