"""Inputs: what of an item is enhanced. The bands asked for (by name, any spelling), else the
bands a checkpoint's card names, else a single image as it is or a band set's finest group; a
config's ``band_map`` names the bands of a raster that does not describe them.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from domainsr.bands import apply_band_map, described, match_bands
from domainsr.config import EnhanceConfig
from domainsr.errors import InputError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.stores.base import Item, Store


def select_input(img: SpatialImage | MultiResolutionImage, bands: Sequence[str] | None) -> SpatialImage:
    """The bands to enhance: ``bands`` by name (band sets: from one resolution group), else a
    single image as it is, or a band set's finest-resolution group."""
    if isinstance(img, MultiResolutionImage):
        if bands:
            try:
                return img.select(list(bands))
            except KeyError as exc:
                raise InputError(f"band {exc.args[0]!r} is not in the band set {list(img.band_names)}",
                                 img.provenance.get("source")) from None
        return min(img.groups.values(), key=lambda g: max(g.geometry.spacing))
    if not bands or list(bands) == list(img.band_names):
        return img
    return img.select(bands)  # any spelling: B2 is B02


def read_item(store: Store, item: Item, config: EnhanceConfig) -> SpatialImage | MultiResolutionImage:
    """``store.read(item)``, with the config's ``band_map`` naming the bands of a single-file raster
    that does not describe them (files that name their bands, band sets named by their files and
    medical images keep their names)."""
    raw = store.read(item)
    if config.band_map and isinstance(raw, SpatialImage) and raw.domain == "optical" and not described(raw):
        return apply_band_map(raw, config.band_map)
    return raw


def input_for(img: SpatialImage | MultiResolutionImage, bands: Sequence[str] | None,
              ident: dict[str, Any]) -> SpatialImage:
    """The bands asked for, else the bands a checkpoint's card names when the input has them (when
    it has not, the card check that follows says what the model expects)."""
    if bands or ident["kind"] != "checkpoint":
        return select_input(img, bands)
    from domainsr.models.checkpoints import read_card

    try:
        return select_input(img, read_card(ident["path"]).bands or None)
    except InputError:
        return select_input(img, None)


def mapped_band_names(header: dict[str, Any], band_map: dict[int, str] | None, path: str) -> list[str]:
    """A raster's band names (its header's), with ``band_map`` applied when it has no band
    descriptions (as :func:`read_item`)."""
    names = list(header["band_names"])
    if not band_map or any((d or "").strip() for d in header.get("descriptions") or []):
        return names
    too_far = [i for i in (band_map or {}) if i > len(names)]
    if too_far:
        raise InputError(f"band map names band {too_far[0]} but the file has {len(names)} band(s)", path)
    return [(band_map or {}).get(i, n) for i, n in enumerate(names, start=1)]


def raster_bands(header: dict[str, Any], cfg: EnhanceConfig, model: dict[str, Any], path: str) -> list[int] | None:
    """The 1-based bands of a streamed raster to enhance: the config's ``bands``, else a
    checkpoint card's bands when the file has them all (names after the band map, any spelling),
    else all (``None``)."""
    names = mapped_band_names(header, cfg.band_map, path)
    wanted = list(cfg.bands) if cfg.bands else None
    if wanted is None and model["kind"] == "checkpoint":
        from domainsr.models.checkpoints import read_card

        card_bands = read_card(model["path"]).bands
        wanted = card_bands if card_bands and not match_bands(card_bands, names)[1] else None
    if wanted is None:
        return None
    found, missing = match_bands(wanted, names)
    if missing:
        raise InputError(f"bands {missing} are not in the image's bands {names}", path)
    return [names.index(b) + 1 for b in found]
