"""Band names: one spelling for the many that files and tools use, and band maps.

Sentinel-2 bands are ``B01`` ... ``B12`` and ``B8A``; Landsat 8 bands ``B1`` ... ``B11``. Exports
spell them ``B2``, ``b02``, ``B8a``, ``band_2`` or ``Band 2``. :func:`band_key` maps every such
spelling to one sensor-neutral key (``B2``, ``B8A``), so ``B02`` and ``B2`` are the same band and
``B8`` and ``B8A`` are not; names that are not band tokens (``red``, ``risk``) compare as they are,
ignoring case. Every band comparison (model cards, ``--bands``, band-set readers) goes through it.

A *band map* says what an undescribed file's bands are: ``1=B02,2=B03,3=B04,4=B08`` (1-based band
indexes; the CLI's ``--band-map`` and a task config's ``band_map``).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from domainsr.errors import ConfigError

S2_BANDS: tuple[str, ...] = ("B01", "B02", "B03", "B04", "B05", "B06", "B07", "B08", "B8A",
                             "B09", "B10", "B11", "B12")
L8_BANDS: tuple[str, ...] = ("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B9", "B10", "B11")

_TOKEN = re.compile(r"^(?:b|band)[\s_-]*0*(\d{1,2})(a?)$", re.IGNORECASE)


def band_key(name: str) -> str:
    """The sensor-neutral key of a band name: ``B02``, ``b2``, ``band_2``, ``Band 2`` -> ``B2``;
    ``B8A``/``b8a`` -> ``B8A``; anything else upper-cased."""
    text = str(name).strip()
    m = _TOKEN.match(text)
    if m is None:
        return text.upper()
    return f"B{int(m.group(1))}{m.group(2).upper()}"


def canonical_band(name: str, names: Sequence[str] = S2_BANDS) -> str:
    """``name`` spelt as in ``names`` (default the Sentinel-2 names: ``b2`` -> ``B02``), or as given
    when it is none of them."""
    by_key = {band_key(n): n for n in names}
    return by_key.get(band_key(name), name)


def same_bands(a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two band lists name the same bands in the same order (aliases allowed)."""
    return [band_key(x) for x in a] == [band_key(x) for x in b]


def match_bands(wanted: Sequence[str], available: Sequence[str]) -> tuple[list[str], list[str]]:
    """For each of ``wanted``, the spelling ``available`` uses, and the wanted names not there."""
    by_key = {band_key(n): n for n in available}
    found = [by_key[band_key(w)] for w in wanted if band_key(w) in by_key]
    missing = [w for w in wanted if band_key(w) not in by_key]
    return found, missing


def parse_band_map(value: str | Mapping[Any, Any] | Sequence[str] | None) -> dict[int, str] | None:
    """``"1=B02,2=B03"``, ``{1: "B02", 2: "B03"}`` or ``["B02", "B03"]`` (bands 1, 2, ...) as
    ``{1: "B02", 2: "B03"}``; ConfigError on a bad index, an empty name or a band named twice."""
    if value is None or value == "" or value == {}:
        return None
    if isinstance(value, str):
        pairs = [_pair(part) for part in value.split(",") if part.strip()]
    elif isinstance(value, Mapping):
        pairs = [(_index(k), str(v).strip()) for k, v in value.items()]
    elif isinstance(value, Sequence):
        pairs = [(i, str(v).strip()) for i, v in enumerate(value, start=1)]
    else:
        raise ConfigError(f"band map must be like 1=B02,2=B03 (got {value!r})")
    return _checked(pairs)


def _pair(part: str) -> tuple[int, str]:
    index, sep, name = part.partition("=")
    if not sep:
        raise ConfigError(f"band map entry {part.strip()!r} is not INDEX=NAME (e.g. 1=B02)")
    return _index(index), name.strip()


def _index(raw: Any) -> int:
    try:
        index = int(str(raw).strip())
    except ValueError:
        raise ConfigError(f"band map index {str(raw).strip()!r} is not a band number (1, 2, ...)") from None
    if index < 1:
        raise ConfigError(f"band map index {index} must be 1 or more (bands are numbered from 1)")
    return index


def _checked(pairs: list[tuple[int, str]]) -> dict[int, str]:
    out: dict[int, str] = {}
    keys: dict[str, int] = {}
    for index, name in pairs:
        if not name:
            raise ConfigError(f"band map gives band {index} an empty name")
        if index in out:
            raise ConfigError(f"band map names band {index} twice ({out[index]!r} and {name!r})")
        if band_key(name) in keys:
            raise ConfigError(f"band map gives the name {name!r} to bands {keys[band_key(name)]} and {index}")
        out[index] = name
        keys[band_key(name)] = index
    return dict(sorted(out.items()))


def format_band_map(band_map: Mapping[int, str]) -> str:
    """``{1: "B02", 2: "B03"}`` -> ``"1=B02,2=B03"``."""
    return ",".join(f"{i}={n}" for i, n in sorted(band_map.items()))


def described(img: Any) -> bool:
    """Whether a raster's file names its bands (band descriptions); ``False`` when the names are
    only positions (``B1``, ``B2``, ... given by the reader to an undescribed file)."""
    raster = (getattr(img, "meta", None) or {}).get("raster")
    if not isinstance(raster, dict) or "descriptions" not in raster:
        return True
    return any((d or "").strip() for d in raster["descriptions"])


def apply_band_map(img: Any, band_map: Mapping[int, str] | None) -> Any:
    """``img`` (a SpatialImage) with the bands ``band_map`` names renamed (1-based indexes of its
    bands); InputError naming the file when an index is past its last band or two bands would end
    up with one name."""
    if not band_map:
        return img
    from domainsr.errors import InputError

    source = img.source or None
    too_far = [i for i in band_map if i > img.channels]
    if too_far:
        raise InputError(f"band map names band {too_far[0]} but the file has {img.channels} band(s)", source)
    names = [band_map.get(i, n) for i, n in enumerate(img.band_names, start=1)]
    keys = [band_key(n) for n in names]
    twice = sorted({n for n, k in zip(names, keys) if keys.count(k) > 1})
    if twice:
        raise InputError(f"after the band map, bands {twice} share a name ({list(names)})", source)
    out = img.derive(img.data, band_names=tuple(names))  # meta is a deep copy
    if isinstance(out.meta.get("raster"), dict):
        out.meta["raster"]["descriptions"] = list(names)
    return out
