"""A STAC catalog as a store: items in, COG + a new STAC item in an output catalog out.

URL grammar (options as query parameters or keyword arguments / a config block; keywords win)::

    stac+file:///ABS/PATH/catalog.json         a static catalog on disk
    stac+https://HOST[:PORT]/PATH/catalog.json  a static catalog over HTTPS (TLS verified)
    stac+https://HOST[:PORT]/API_ROOT           a STAC API (item search is used when the root
                                                advertises it in conformsTo)
    stac+http://...                             the same over plain HTTP

    options: output=PATH (the output catalog.json or its folder; default for stac+file: a
             "domainsr-output" folder next to the input catalog; required otherwise; an ``output``
             keyword, e.g. ``--out``, that names another catalog is a ConfigError, not an
             override), assets=B02,B03 (asset keys to
             read, default: every data asset), auth=none|basic|bearer, username=, password=,
             token=, verify=true|false|CA.pem, timeout=30, retries=3, backoff=0.5

``password``/``token`` are ``env:NAME`` or ``prefect:NAME`` references (defaults:
``DOMAINSR_STAC_USERNAME`` / ``_PASSWORD`` / ``_TOKEN``). Catalog JSON is read with
pystac-client (``requests``, auth per request); COG assets are read by rasterio/GDAL with
``/vsicurl/`` range requests, the Authorization header handed over in a private header file (GDAL
config options are logged by rasterio at DEBUG level, a file name is harmless).

``list_items`` keys: ``bbox`` ``[west, south, east, north]`` (WGS84), ``datetime`` (``"start/end"``,
either end ``..``, one instant, or a pair), ``collections``, ``ids``, ``limit``, ``assets``, and
``clip`` (read only the window of each item that covers ``bbox``: range requests fetch only those
tiles).

Writing: into ``<output dir>/<out id>/`` go the COG (``<out id>.tif``), the extras (audit report
...) and the item JSON (projection + processing extensions, ``derived_from`` link to the source
item, the audit report as a ``metadata`` asset), all in a temporary folder renamed into place when
complete; the output ``catalog.json`` gains its item link last (atomically, under a file lock).
The output id is derived from the source id and the run key, so a re-run finds it and writes
nothing. Items are validated before they are written: the core STAC schema with the schemas
pystac ships, extension fields structurally (:class:`OfflineValidator`; extension JSON schemas
cannot be fetched offline).

Size: static catalogs and STAC APIs, reading items and writing the output catalog, and the
offline item validation are one contract: output ids and links are checked against the catalog.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import json
import logging
import math
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from pystac.validation.stac_validator import JsonSchemaSTACValidator

from domainsr import __version__
from domainsr.errors import (
    ConfigError,
    GeometryError,
    InputError,
    OutputError,
    PermanentStoreError,
    StoreError,
    UnsupportedFormatError,
)
from domainsr.image import GeoGeometry, SpatialImage, now_iso
from domainsr.io.atomic import atomic_path
from domainsr.io.formats import FORMATS, OUTPUTS
from domainsr.io.raster import SUPPORTED_DTYPES, write_raster
from domainsr.retry import RetryPolicy, TransientError, http_status, is_transient
from domainsr.stores import url_option
from domainsr.stores.base import Item, Store, WriteResult
from domainsr.stores.http import (
    HttpAuth,
    call_with_retries,
    extra_file_name,
    http_session,
    redact_url,
    same_origin,
    split_store_url,
    tls_verify,
)

log = logging.getLogger("domainsr.stores.stac")

_OPTS = {"output", "assets", "auth", "username", "password", "token", "verify", "timeout", "retries", "backoff"}
_QUERY_KEYS = {"bbox", "datetime", "collections", "ids", "limit", "assets", "clip"}
COG_MEDIA_TYPE = OUTPUTS["cog"].media_type
_RASTER_TYPES = FORMATS["raster"].media_types
PROCESSING_SCHEMA = "https://stac-extensions.github.io/processing/v1.2.0/schema.json"
EO_SCHEMA = "https://stac-extensions.github.io/eo/v2.0.0/schema.json"  # bands[] with eo: fields (STAC 1.1)
EO_COMMON_NAMES = frozenset({
    "pan", "coastal", "blue", "green", "green05", "yellow", "red", "rededge", "rededge071", "rededge075",
    "rededge078", "nir", "nir08", "nir09", "cirrus", "swir16", "swir22", "lwir", "lwir11", "lwir12"})
_BAND_KEYS = ("description", "unit", "eo:common_name", "eo:center_wavelength", "eo:full_width_half_max")
_MEDIA_BY_SUFFIX = {".html": "text/html", ".json": "application/json", ".png": "image/png",
                    OUTPUTS["cog"].suffix: COG_MEDIA_TYPE, ".pdf": "application/pdf", ".txt": "text/plain",
                    ".geojson": "application/geo+json"}  # the audit's regions (domainsr.audit.exports)
# GDAL reading COGs over HTTP: no directory listing of the server, only .tif/.tiff files probed,
# no retries of its own (ours apply), and nothing kept in /vsicurl/'s cache once a file is closed:
# GDAL would otherwise remember a failed attempt ("does not exist") and fail every retry with it.
_GDAL_HTTP_ENV = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
                  "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ",".join(
                      [*OUTPUTS["cog"].suffixes, *(s.upper() for s in OUTPUTS["cog"].suffixes)]),
                  "GDAL_HTTP_MAX_RETRY": "0", "CPL_VSIL_CURL_NON_CACHED": "/vsicurl/"}
_catalog_lock = threading.Lock()


def _safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "item"


def _parse_instant(text: str, end: bool) -> _dt.datetime | None:
    text = text.strip()
    if text in ("", ".."):
        return None
    from pystac.utils import str_to_datetime

    value = str_to_datetime(text)
    if value.tzinfo is None:
        value = value.replace(tzinfo=_dt.timezone.utc)
    if end and re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):  # a whole day is inclusive
        value += _dt.timedelta(days=1) - _dt.timedelta(microseconds=1)
    return value


def datetime_interval(value: Any) -> tuple[_dt.datetime | None, _dt.datetime | None]:
    """``"start/end"`` (``..`` open), one instant or a ``(start, end)`` pair -> aware datetimes."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ConfigError(f"datetime range {value!r} must have two ends")
        ends = [v.isoformat() if isinstance(v, (_dt.date, _dt.datetime)) else ("" if v is None else str(v))
                for v in value]
        return _parse_instant(ends[0], False), _parse_instant(ends[1], True)
    text = value.isoformat() if isinstance(value, (_dt.date, _dt.datetime)) else str(value)
    try:
        if "/" in text:
            lo, hi = text.split("/", 1)
            return _parse_instant(lo, False), _parse_instant(hi, True)
        return _parse_instant(text, False), _parse_instant(text, True)
    except ValueError as exc:
        raise ConfigError(f"datetime {text!r} is not ISO 8601 ({exc})") from None


# ------------------------------------------------------------------------------------ validation

class OfflineValidator(JsonSchemaSTACValidator):
    """A pystac validator that needs no network: the core STAC schemas pystac ships (item,
    catalog, collection, GeoJSON) are checked with jsonschema; the fields of the extensions
    DomainSR writes (projection, processing, eo) are checked structurally (their JSON schemas
    cannot be fetched offline); any other extension is an error. Use directly, or install with
    ``pystac.validation.set_validator(OfflineValidator())`` before ``validate_all()``."""

    def validate_extension(self, stac_dict: dict[str, Any], stac_object_type: Any, stac_version: str,
                           extension_id: str, href: str | None = None) -> str:
        _check_extension(stac_dict, extension_id, href)
        return extension_id

    def _get_schema(self, schema_uri: str) -> dict[str, Any]:
        if schema_uri not in self.schema_cache:
            raise PermanentStoreError(f"STAC schema {schema_uri} is not available offline")
        return super()._get_schema(schema_uri)


def _number_list(value: Any, sizes: Sequence[int]) -> bool:
    return (isinstance(value, list) and len(value) in sizes
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))


def _check_extension(d: Mapping[str, Any], uri: str, href: str | None) -> None:
    from pystac import STACValidationError

    where = href or d.get("id", "?")
    scopes = [d.get("properties", d)] + [a for a in (d.get("assets") or {}).values()]
    problems: list[str] = []
    if "/projection/" in uri:
        for s in scopes:
            if "proj:code" in s and not (s["proj:code"] is None or isinstance(s["proj:code"], str)):
                problems.append("proj:code must be a string")
            if "proj:shape" in s and not (_number_list(s["proj:shape"], (2,))
                                           and all(isinstance(v, int) and v > 0 for v in s["proj:shape"])):
                problems.append("proj:shape must be two positive integers")
            if "proj:transform" in s and not _number_list(s["proj:transform"], (6, 9)):
                problems.append("proj:transform must be 6 or 9 numbers")
            if "proj:bbox" in s and not _number_list(s["proj:bbox"], (4, 6)):
                problems.append("proj:bbox must be 4 or 6 numbers")
        if not any(k.startswith("proj:") for s in scopes for k in s):
            problems.append("declares the projection extension but has no proj: field")
    elif "/processing/" in uri:
        for s in scopes:
            sw = s.get("processing:software")
            if sw is not None and not (isinstance(sw, dict) and all(isinstance(v, str) for v in sw.values())):
                problems.append("processing:software must map names to version strings")
            for key in ("processing:lineage", "processing:level", "processing:facility"):
                if key in s and not isinstance(s[key], str):
                    problems.append(f"{key} must be a string")
            if "processing:datetime" in s:
                try:
                    _parse_instant(str(s["processing:datetime"]), False)
                except ValueError:
                    problems.append("processing:datetime is not a date-time")
        if not any(k.startswith("processing:") for s in scopes for k in s):
            problems.append("declares the processing extension but has no processing: field")
    elif "/eo/" in uri:
        bands = [b for s in scopes for b in (s.get("bands") or s.get("eo:bands") or []) if isinstance(b, dict)]
        for b in bands:
            if "eo:common_name" in b and b["eo:common_name"] not in EO_COMMON_NAMES:
                problems.append(f"eo:common_name {b['eo:common_name']!r} is not an EO common name")
            for key in ("eo:center_wavelength", "eo:full_width_half_max", "eo:solar_illumination"):
                if key in b and not isinstance(b[key], (int, float)):
                    problems.append(f"{key} must be a number")
        if not any(k.startswith("eo:") for b in bands for k in b) and not any(
                k.startswith("eo:") for s in scopes for k in s):
            problems.append("declares the eo extension but has no eo: field")
    else:
        problems.append(f"extension {uri} cannot be validated offline")
    if problems:
        raise STACValidationError(f"{where}: " + "; ".join(sorted(set(problems))))


_validator: OfflineValidator | None = None


def validate_output(stac_dict: dict[str, Any], href: str) -> None:
    """Validate a STAC object DomainSR is about to write; an invalid one is an OutputError."""
    from pystac import STACValidationError
    from pystac.serialization import identify_stac_object

    global _validator
    if _validator is None:
        _validator = OfflineValidator()
    info = identify_stac_object(stac_dict)
    try:
        _validator.validate(stac_dict, info.object_type, str(info.version_range.latest_valid_version()),
                            list(stac_dict.get("stac_extensions") or []), href)
    except STACValidationError as exc:
        raise OutputError(f"STAC output does not validate: {str(exc)[:500]}", href) from exc


# ------------------------------------------------------------------------------------- reading

def _is_remote(href: str) -> bool:
    return href.startswith(("http://", "https://"))


class StacStore(Store):
    """A STAC catalog or API as a store (see the module docstring for the URL grammar)."""

    def __init__(self, url: str, root: str, output: str | os.PathLike[str], *, auth: HttpAuth | None = None,
                 verify: bool | str = True, timeout: float = 30.0, retry: RetryPolicy | None = None,
                 assets: Sequence[str] | None = None) -> None:
        self.url = redact_url(url)
        self.root = root
        self.output = Path(output)
        if self.output.suffix.lower() != ".json":
            self.output = self.output / "catalog.json"
        self.auth = auth or HttpAuth()
        self.verify = verify
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self.assets = list(assets) if assets else None
        self._client: Any = None

    def __repr__(self) -> str:
        return f"StacStore({self.url!r}, output={str(self.output)!r})"

    @classmethod
    def from_url(cls, url: str, **opts: Any) -> StacStore:
        scheme = url.split("://", 1)[0].lower() if "://" in url else ""
        if scheme not in ("stac+file", "stac+http", "stac+https"):
            raise ConfigError("a STAC URL starts with stac+file://, stac+http:// or stac+https://", redact_url(url))
        _same_output(url_option(url, "output"), "?output= in the store URL", opts.get("output"),
                     "the output option", url)
        clean, o = split_store_url(url, _OPTS, opts)
        parts = urlsplit(clean)
        if scheme == "stac+file":
            if parts.netloc not in ("", "localhost"):
                raise ConfigError("a stac+file URL is stac+file:///ABSOLUTE/PATH/catalog.json", redact_url(url))
            root = parts.path
            if not Path(root).is_file():
                raise InputError("STAC catalog file not found", root)
            default_out = Path(root).resolve().parent / "domainsr-output" / "catalog.json"
        else:
            root = clean.split("+", 1)[1]
            default_out = None
        output = o.get("output") or default_out
        if output is None:
            raise ConfigError("a remote STAC store needs output=PATH (the local output catalog)", redact_url(url))
        output = str(catalog_path(output))
        assets = o.get("assets")
        if isinstance(assets, str):
            assets = [a for a in assets.split(",") if a]
        return cls(url, root, output, auth=HttpAuth.from_options(o, "DOMAINSR_STAC"),
                   verify=tls_verify(o.get("verify")), timeout=float(o.get("timeout", 30)),
                   retry=RetryPolicy.from_options(o), assets=assets)

    # ------------------------------------------------------------------------------ internals
    def _call(self, what: str, fn: Any) -> Any:
        return call_with_retries(fn, what=what, url=self.url, policy=self.retry)

    def _open_client(self) -> Any:
        if self._client is None:
            from pystac_client import Client
            from pystac_client.stac_api_io import StacApiIO

            io = StacApiIO(max_retries=None, timeout=self.timeout)
            io.session = http_session(self.auth, self.verify, self.root)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "no conformance classes": a static catalog is fine
                self._client = self._call("catalog open", lambda: Client.open(self.root, stac_io=io))
        return self._client

    def _search(self, query: Mapping[str, Any]) -> list[Any]:
        client = self._open_client()
        bbox = query.get("bbox")
        interval = datetime_interval(query["datetime"]) if query.get("datetime") else None
        collections = query.get("collections")
        collections = [collections] if isinstance(collections, str) else collections
        ids = query.get("ids")
        ids = [ids] if isinstance(ids, str) else ids
        limit = int(query["limit"]) if query.get("limit") else None
        if client.conforms_to("ITEM_SEARCH"):
            dt = None
            if interval:
                dt = "/".join(v.isoformat() if v else ".." for v in interval)
            methods = {link.extra_fields.get("method", "GET") for link in client.links if link.rel == "search"}
            search = client.search(bbox=bbox, datetime=dt, collections=collections, ids=ids, max_items=limit,
                                   method="POST" if "POST" in methods else "GET")
            return list(search.items())
        out = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "falling back to pystac" for static catalogs
            for it in client.get_items(recursive=True):
                if collections and it.collection_id not in collections:
                    continue
                if ids and it.id not in ids:
                    continue
                if bbox and not _bbox_overlaps(it.bbox, bbox):
                    continue
                if interval and not _time_overlaps(it, interval):
                    continue
                out.append(it)
                if limit and len(out) >= limit:
                    break
        return out

    def _item(self, it: Any, keys: Sequence[str] | None, clip_bbox: Sequence[float] | None) -> Item:
        data_assets = {k: a for k, a in it.assets.items()
                       if (a.roles is None or "data" in a.roles)
                       and (a.media_type is None or a.media_type.startswith(_RASTER_TYPES))}
        if keys:
            missing = [k for k in keys if k not in it.assets]
            if missing:
                raise InputError(f"item has no asset(s) {missing}; assets: {sorted(it.assets)}", it.id)
            chosen = {k: it.assets[k] for k in keys}
        else:
            chosen = data_assets
        if not chosen:
            raise InputError("item has no raster data asset", it.id)
        when = it.datetime or it.common_metadata.start_datetime
        meta: dict[str, Any] = {
            "stac_id": it.id, "collection": it.collection_id, "item_href": it.get_self_href(),
            "datetime": when.isoformat() if when else None,
            "start_datetime": _iso(it.common_metadata.start_datetime),
            "end_datetime": _iso(it.common_metadata.end_datetime),
            "bbox": list(it.bbox) if it.bbox else None,
            "assets": {k: a.get_absolute_href() for k, a in chosen.items()},
            "bands": {k: _band_info(a) for k, a in chosen.items()},
        }
        if clip_bbox is not None:
            meta["clip_bbox"] = [float(v) for v in clip_bbox]
        ident = _safe_id(f"{it.collection_id}.{it.id}" if it.collection_id else it.id)
        return Item(id=ident, uri=str(it.get_self_href()), kind="stac", meta=meta)

    def _gdal_env(self, header_file: str | None) -> dict[str, Any]:
        env = dict(_GDAL_HTTP_ENV, GDAL_HTTP_TIMEOUT=str(int(max(1, self.timeout))))
        if header_file:
            env["GDAL_HTTP_HEADER_FILE"] = header_file
        if self.verify is False:
            env["GDAL_HTTP_UNSAFESSL"] = "YES"
        elif isinstance(self.verify, str):  # GDAL >= 3.7 reads GDAL_CURL_CA_BUNDLE first
            env["GDAL_CURL_CA_BUNDLE"] = env["CURL_CA_BUNDLE"] = self.verify
        return env

    @contextlib.contextmanager
    def _header_file(self, href: str) -> Iterator[str | None]:
        """GDAL's header file with the Authorization header, for assets on the catalog's origin
        only (assets elsewhere, e.g. a cloud bucket, never receive the catalog's credentials)."""
        value = self.auth.header() if _is_remote(href) and same_origin(href, self.root) else None
        if value is None:
            yield None
            return
        fd, name = tempfile.mkstemp(prefix="domainsr-gdal-", suffix=".txt")  # 0600
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(f"Authorization: {value}\n")
            yield name
        finally:
            os.unlink(name)

    def _read_asset(self, key: str, href: str, clip_bbox: Sequence[float] | None) -> dict[str, Any]:
        """One asset (or its window over ``clip_bbox``) through GDAL.

        GDAL reports an HTTP failure in the middle of a COG (a 503 answering a range request) as
        "not recognized as a supported file format" or a failed block read, with no status. Such
        an ambiguous failure of a remote asset counts as transient (retried, bounded); a 4xx, a
        missing file or a certificate problem does not.
        """
        from rasterio.errors import RasterioError

        try:
            return self._read_asset_gdal(key, href, clip_bbox)
        except RasterioError as exc:
            text = str(exc)
            if not _is_remote(href):
                if not Path(href).exists():
                    raise InputError(f"asset {key!r} not found", href) from exc
                raise InputError(f"asset {key!r} is not a raster GDAL can read ({text})", href) from exc
            permanent = (http_status(exc) is not None or "does not exist" in text
                         or "certificate" in text.lower())
            if is_transient(exc) or permanent:
                raise
            raise TransientError(f"GDAL could not read asset {key!r} over HTTP ({text})") from exc

    def _read_asset_gdal(self, key: str, href: str, clip_bbox: Sequence[float] | None) -> dict[str, Any]:
        import rasterio
        from rasterio.warp import transform_bounds
        from rasterio.windows import Window, from_bounds

        with self._header_file(href) as hf, rasterio.Env(**self._gdal_env(hf)), rasterio.open(href) as src:
            if src.crs is None:
                raise GeometryError(f"asset {key!r} has no CRS", href)
            dtypes = set(src.dtypes)
            if len(dtypes) != 1 or next(iter(dtypes)) not in SUPPORTED_DTYPES:
                raise UnsupportedFormatError(f"asset {key!r} has data type(s) {sorted(dtypes)}", href)
            full = GeoGeometry(src.crs, src.transform, (src.height, src.width))
            win = None
            if clip_bbox is not None:
                bounds = transform_bounds("EPSG:4326", src.crs, *clip_bbox, densify_pts=21)
                w = from_bounds(*bounds, transform=src.transform)
                c0, r0 = max(0, math.floor(w.col_off + 1e-6)), max(0, math.floor(w.row_off + 1e-6))
                c1 = min(src.width, math.ceil(w.col_off + w.width - 1e-6))
                r1 = min(src.height, math.ceil(w.row_off + w.height - 1e-6))
                if c1 <= c0 or r1 <= r0:
                    raise InputError(f"asset {key!r} does not cover the bbox {list(clip_bbox)}", href)
                win = Window(c0, r0, c1 - c0, r1 - r0)
            data = src.read(window=win)
            masks = src.read_masks(window=win)
            geometry = full if win is None else full.cropped((int(win.row_off), int(win.col_off)),
                                                             (int(win.height), int(win.width)))
            return {"data": data, "valid": np.all(masks > 0, axis=0), "geometry": geometry,
                    "nodata": src.nodata, "dtype": src.dtypes[0], "units": list(src.units),
                    "scales": list(src.scales), "offsets": list(src.offsets),
                    "names": [key] if src.count == 1 else [f"{key}_{i}" for i in range(1, src.count + 1)],
                    "window": None if win is None else [int(win.row_off), int(win.col_off),
                                                        int(win.height), int(win.width)]}

    # -------------------------------------------------------------------------------- Store API
    def list_items(self, query: dict[str, Any] | None = None) -> list[Item]:
        query = dict(query or {})
        unknown = sorted(set(query) - _QUERY_KEYS)
        if unknown:
            raise ConfigError(f"unknown STAC query key(s) {unknown}; keys are {sorted(_QUERY_KEYS)}", self.url)
        bbox = query.get("bbox")
        if bbox is not None and (len(bbox) != 4 or not bbox[0] < bbox[2] or not bbox[1] < bbox[3]):
            raise ConfigError(f"bbox {bbox} must be [west, south, east, north] with west < east, south < north")
        keys = query.get("assets") or self.assets
        keys = [keys] if isinstance(keys, str) else keys
        clip = bool(query.get("clip")) and bbox is not None
        found = self._call("item search", lambda: self._search(query))
        return [self._item(it, keys, bbox if clip else None) for it in found]

    def read(self, item: Item) -> SpatialImage:
        assets: dict[str, str] = item.meta.get("assets") or {}
        if not assets:
            raise ConfigError("item has no assets to read (not listed by a StacStore)", item.id)
        clip = item.meta.get("clip_bbox")
        parts = []
        for key, href in assets.items():
            parts.append(self._call(f"read of asset {key!r} of {item.id}",
                                    lambda k=key, h=href: self._read_asset(k, h, clip)))
        first = parts[0]
        for key, p in zip(assets, parts):
            if not p["geometry"].almost_equal(first["geometry"]):
                grids = {k: f"{q['geometry'].shape} at {q['geometry'].res[0]:g}"
                         for k, q in zip(assets, parts)}
                raise GeometryError(f"assets are on different grids {grids}; pick assets of one "
                                    "resolution with the 'assets' option", item.id)
            if p["dtype"] != first["dtype"]:
                raise UnsupportedFormatError(f"assets mix data types ({p['dtype']} vs {first['dtype']})", item.id)
        data = np.concatenate([p["data"] for p in parts], axis=0)
        valid = np.logical_and.reduce([p["valid"] for p in parts])
        nodatas = {p["nodata"] for p in parts}
        names = [n for p in parts for n in p["names"]]
        units = [u or "" for p in parts for u in p["units"]]
        distinct_units = sorted({u for u in units if u})
        provenance = {"source": item.uri, "store": self.url, "item_id": item.id, "format": "stac",
                      "assets": dict(assets)}
        if first["window"] is not None:
            provenance["window"] = dict(zip(("row_off", "col_off", "height", "width"), first["window"]))
        return SpatialImage(
            data=data, domain="optical", geometry=first["geometry"], band_names=tuple(names),
            units=distinct_units[0] if len(distinct_units) == 1 else ("DN" if not distinct_units else ",".join(distinct_units)),
            nodata=nodatas.pop() if len(nodatas) == 1 else None,
            mask=None if valid.all() else valid, provenance=provenance,
            meta={"storage_dtype": first["dtype"],
                  "raster": {"dtype": first["dtype"], "units": units, "descriptions": names,
                             "scales": [s for p in parts for s in p["scales"]],
                             "offsets": [o for p in parts for o in p["offsets"]]},
                  "stac": {k: item.meta.get(k) for k in ("stac_id", "collection", "item_href", "datetime",
                                                         "start_datetime", "end_datetime", "bands")}})

    # ------------------------------------------------------------------------------- writing
    def _out_id(self, item: Item, run_key: str) -> str:
        return _safe_id(f"{item.meta.get('stac_id') or item.id}_sr_{run_key[:16]}")

    def _paths(self, item: Item, run_key: str) -> tuple[str, Path, Path, Path]:
        out_id = self._out_id(item, run_key)
        folder = self.output.parent / out_id
        return out_id, folder, folder / f"{out_id}{OUTPUTS['cog'].suffix}", folder / f"{out_id}.json"

    def existing(self, item: Item, run_key: str) -> WriteResult | None:
        out_id, folder, cog, item_json = self._paths(item, run_key)
        if not (item_json.is_file() and cog.is_file()):
            return None
        self._link_item(out_id, item_json)  # completes a run that stopped before the catalog update
        extras = {"item": str(item_json)}
        try:
            assets = json.loads(item_json.read_text()).get("assets", {})
        except (OSError, ValueError) as exc:
            raise StoreError(f"output item {out_id} is unreadable ({exc})", str(item_json)) from None
        for key, asset in assets.items():
            if key != "data":
                extras[key] = str((folder / asset["href"]).resolve())
        return WriteResult(uri=str(cog), extras=extras)

    def write(self, item: Item, image: SpatialImage, run_key: str,
              extras: dict[str, Path] | None = None) -> WriteResult:
        done = self.existing(item, run_key)
        if done is not None:
            log.info("%s: output of run %s already in %s; not written again", item.id, run_key[:12], self.output)
            return done
        if not isinstance(image.geometry, GeoGeometry):
            raise PermanentStoreError("only map rasters (GeoGeometry) can be written to a STAC catalog", item.id)
        out_id, folder, cog, item_json = self._paths(item, run_key)
        extras = dict(extras or {})
        for name, path in extras.items():
            if not Path(path).is_file():
                raise InputError(f"extra {name!r} is not a file", path)
        with atomic_path(folder, is_dir=True) as tmp:
            write_raster(image, tmp / cog.name)
            extra_names = {}
            for name, path in extras.items():
                target = extra_file_name(name, path)
                shutil.copy2(path, tmp / target)
                extra_names[name] = target
            stac_item = self._stac_item(item, image, run_key, out_id, cog.name, extra_names)
            validate_output(stac_item, str(item_json))
            (tmp / item_json.name).write_text(json.dumps(stac_item, indent=2))
        self._link_item(out_id, item_json)
        result = self.existing(item, run_key)
        if result is None:  # pragma: no cover - the folder was just renamed into place
            raise StoreError(f"output {out_id} vanished after writing", str(folder))
        log.info("%s: enhanced item %s written", item.id, out_id)
        return result

    def _stac_item(self, item: Item, image: SpatialImage, run_key: str, out_id: str, cog_name: str,
                   extra_names: Mapping[str, str]) -> dict[str, Any]:
        import pystac
        from pystac.extensions.projection import ProjectionExtension
        from rasterio.warp import transform_bounds, transform_geom

        g: GeoGeometry = image.geometry  # type: ignore[assignment]
        west, south, east, north = g.bounds
        ring = [(west, south), (east, south), (east, north), (west, north), (west, south)]
        footprint = transform_geom(g.crs, "EPSG:4326", {"type": "Polygon", "coordinates": [ring]})
        bbox = list(transform_bounds(g.crs, "EPSG:4326", west, south, east, north, densify_pts=21))
        meta = item.meta
        when = _parse_instant(meta["datetime"], False) if meta.get("datetime") else None
        props: dict[str, Any] = {}
        if when is None:
            props["start_datetime"] = meta.get("start_datetime")
            props["end_datetime"] = meta.get("end_datetime")
        steps = [s for s in image.provenance.get("history", []) if isinstance(s, dict)]
        enhance = next((s for s in reversed(steps) if s.get("model")), {})
        model = image.provenance.get("model")  # the flow's model identity, when there is one
        model = model if isinstance(model, dict) else {}
        model_name = model.get("name") or enhance.get("model") or "?"
        scale = enhance.get("scale") or model.get("scale")
        factors = [scale] if isinstance(scale, int) else list(scale or [])
        label = "?" if not factors else f"{factors[0]}" if len(set(factors)) == 1 else "x".join(map(str, factors))
        lineage = (f"Super-resolution (x{label}) of STAC item {meta.get('stac_id')} by DomainSR model "
                   f"{model_name}; derived image, not observed at this resolution")
        props.update({
            "processing:lineage": lineage,
            "processing:software": {"domainsr": __version__},
            "processing:datetime": now_iso(),
            "domainsr:run_key": run_key,
            "domainsr:model": model_name,
            "domainsr:model_sha256": model.get("sha256") or enhance.get("model_checksum"),
            "domainsr:scale": factors or None,
        })
        props = {k: v for k, v in props.items() if v is not None}
        stac_item = pystac.Item(out_id, footprint, bbox, when, props)
        stac_item.stac_extensions.append(PROCESSING_SCHEMA)
        epsg = g.crs.to_epsg()
        proj = ProjectionExtension.ext(stac_item, add_if_missing=True)
        proj.apply(code=f"EPSG:{epsg}" if epsg else None, wkt2=None if epsg else g.crs.to_wkt(),
                   shape=[int(v) for v in g.shape], transform=[float(v) for v in list(g.transform)[:6]],
                   bbox=[float(v) for v in g.bounds])
        source_bands = meta.get("bands") or {}
        bands = [{"name": name, **(source_bands.get(name) or {})} for name in image.band_names]
        if any(k.startswith("eo:") for b in bands for k in b):
            stac_item.stac_extensions.append(EO_SCHEMA)
        stac_item.add_asset("data", pystac.Asset(f"./{cog_name}", title=f"{out_id} (enhanced)",
                                                 media_type=COG_MEDIA_TYPE, roles=["data"],
                                                 extra_fields={"bands": bands}))
        for name, target in extra_names.items():
            stac_item.add_asset(name, pystac.Asset(
                f"./{target}", title=f"DomainSR {name}", roles=["metadata"],
                media_type=_MEDIA_BY_SUFFIX.get(Path(target).suffix.lower(), "application/octet-stream")))
        if meta.get("item_href"):
            stac_item.add_link(pystac.Link("derived_from", str(meta["item_href"]),
                                           media_type="application/geo+json", title=str(meta.get("stac_id"))))
        stac_item.add_link(pystac.Link("root", "../catalog.json", media_type="application/json"))
        stac_item.add_link(pystac.Link("parent", "../catalog.json", media_type="application/json"))
        return stac_item.to_dict(include_self_link=False, transform_hrefs=False)

    def _link_item(self, out_id: str, item_json: Path) -> None:
        """Add ``item_json`` to the output catalog (created if missing) atomically, once."""
        href = f"./{out_id}/{item_json.name}"
        self.output.parent.mkdir(parents=True, exist_ok=True)
        with _catalog_lock, open(self.output.parent / ".catalog.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.output.exists():
                    catalog = json.loads(self.output.read_text())
                else:
                    import pystac

                    catalog = pystac.Catalog("domainsr-output", "DomainSR enhanced outputs").to_dict(
                        include_self_link=False, transform_hrefs=False)
                    catalog["links"] = [{"rel": "root", "href": "./catalog.json", "type": "application/json"}]
                if any(link.get("rel") == "item" and link.get("href") == href for link in catalog["links"]):
                    return
                catalog["links"].append({"rel": "item", "href": href, "type": "application/geo+json",
                                         "title": out_id})
                validate_output(catalog, str(self.output))
                with atomic_path(self.output) as tmp:
                    tmp.write_text(json.dumps(catalog, indent=2))
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------- helpers

def _iso(value: _dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _band_info(asset: Any) -> dict[str, Any]:
    """What the output keeps of a one-band asset's band object (STAC 1.1 ``bands`` or eo 1.x
    ``eo:bands``, whose ``common_name``/``center_wavelength`` become ``eo:`` fields)."""
    bands = asset.extra_fields.get("bands") or asset.extra_fields.get("eo:bands") or []
    if len(bands) != 1 or not isinstance(bands[0], dict):
        return {}
    band = dict(bands[0])
    for old in ("common_name", "center_wavelength", "full_width_half_max"):
        if old in band:
            band.setdefault(f"eo:{old}", band.pop(old))
    return {k: band[k] for k in _BAND_KEYS if isinstance(band.get(k), (str, int, float))}


def _bbox_overlaps(a: Sequence[float] | None, b: Sequence[float]) -> bool:
    if not a:
        return False
    return not (a[2] < b[0] or a[0] > b[2] or a[3] < b[1] or a[1] > b[3])


def _time_overlaps(it: Any, interval: tuple[_dt.datetime | None, _dt.datetime | None]) -> bool:
    lo, hi = interval
    start = it.datetime or it.common_metadata.start_datetime
    end = it.datetime or it.common_metadata.end_datetime or start
    if start is None:
        return False
    return (hi is None or start <= hi) and (lo is None or end >= lo)


def catalog_path(output: str | os.PathLike[str]) -> Path:
    """An output option (``catalog.json``, its folder, or a ``stac+file://`` URL of either) as
    the output catalog's path."""
    text = str(output)
    if text.startswith("stac+file://"):
        text = urlsplit(text).path
    path = Path(os.path.expanduser(text))
    return path if path.suffix.lower() == ".json" else path / "catalog.json"


def _same_output(a: Any, a_label: str, b: Any, b_label: str, url: str) -> None:
    """Two places naming the output catalog must name the same one (a folder = its catalog.json)."""
    if a is None or b is None or str(a) == "" or str(b) == "":
        return
    if catalog_path(a).resolve() != catalog_path(b).resolve():
        raise ConfigError(f"two different output catalogs: {a} ({a_label}) and {b} ({b_label}); "
                          "give the output once, or the same path in both", redact_url(url))


def from_url(url: str, *, output: str | os.PathLike[str] | None = None, **options: Any) -> StacStore:
    """``open_store`` entry point: ``output`` (``--out``, ``store.output``) is the output catalog
    (its folder or catalog.json); it must agree with the URL's ``?output=`` when both are given."""
    if output is not None:
        _same_output(output, "--out / store.output", options.get("output"), "the output option", url)
        _same_output(url_option(url, "output"), "?output= in the store URL", output, "--out / store.output", url)
        options["output"] = str(output)
    return StacStore.from_url(url, **options)
