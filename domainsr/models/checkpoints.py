"""Checkpoints: a ``state_dict`` (``<name>.pt``) beside its model card (``<name>.json``).

The card (schema: :mod:`domainsr.models.card`, re-exported here) drives inference (DESIGN.md):
the input checks and the intensity normalisation below. Loading verifies the card's sha256 of
the weights and reads them with ``torch.load(weights_only=True)`` (no pickled code runs), then
builds the network from the registry. Where checkpoints are found by name:
:mod:`domainsr.models.names` (``SHIPPED_DIR``, ``user_checkpoint_dirs``: patch them there).
"""
from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from domainsr.bands import described, same_bands
from domainsr.errors import ModelCardMismatch, ModelError
from domainsr.image import SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.models.card import (  # noqa: F401 - re-exported: the card schema's home before the split
    Architecture,
    FileRecord,
    FixedNormalization,
    ModelCard,
    Normalization,
    PercentileNormalization,
    RegionMetrics,
    TrainingData,
    TrainingSettings,
)
from domainsr.models.names import checkpoint_roots
from domainsr.models.normalized import Normalized

_MAX_STAT_SAMPLES = 2_000_000  # per channel, for percentiles over very large images


# ---------------------------------------------------------------------------------------------
# normalisation at inference


@dataclass(frozen=True)
class InputNormalization:
    """Per-channel affine map into the network's space: ``(x - offset) / scale``."""

    offset: np.ndarray
    scale: np.ndarray


def _valid_values(img: SpatialImage, channel: int) -> np.ndarray:
    """Finite, valid (unmasked, not nodata) values of one channel, subsampled on huge images."""
    x = img.data[channel]
    ok = img.valid_mask()
    if img.nodata is not None and not np.isnan(img.nodata):
        ok = ok & (x != img.nodata)
    v = x[ok]
    if v.dtype.kind == "f":
        v = v[np.isfinite(v)]
    if v.size > _MAX_STAT_SAMPLES:
        v = v[:: int(np.ceil(v.size / _MAX_STAT_SAMPLES))]
    return v.astype(np.float64, copy=False)


def otsu_threshold(v: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of the values ``v``: the cut maximising the between-class variance of a
    ``bins``-bin histogram over their range (the middle of an empty gap that all maximise it).
    Scale-equivariant: ``otsu(a * v) == a * otsu(v)``."""
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return lo
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    w0 = np.cumsum(counts, dtype=np.float64)
    s0 = np.cumsum(counts * centres, dtype=np.float64)
    w1, s1 = w0[-1] - w0, s0[-1] - s0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = w0 * w1 * (s0 / w0 - s1 / w1) ** 2
    between = np.nan_to_num(between[:-1], nan=-1.0)
    best = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # a gap between the modes: its middle
    return float(0.5 * (edges[1 + best[0]] + edges[1 + best[-1]]))


def foreground_values(v: np.ndarray) -> np.ndarray:
    """The values above their Otsu threshold (all of them when none are)."""
    fg = v[v > otsu_threshold(v)]
    return fg if fg.size else v


def percentile_normalization(img: SpatialImage, low: float, high: float,
                             voxels: str = "valid") -> InputNormalization:
    """Percentiles of each channel's valid voxels (``voxels="foreground"``: of its foreground,
    :func:`foreground_values`); the same function serves training and inference. Percentiles
    scale with the image, so the normalised input, and the output in the image's units, do too."""
    if voxels not in ("valid", "foreground"):
        raise ModelError(f"percentile normalisation over {voxels!r} voxels; expected valid or foreground")
    offs, scales = [], []
    for c in range(img.channels):
        v = _valid_values(img, c)
        if v.size == 0:
            raise ModelCardMismatch(f"channel {img.band_names[c]!r} has no valid values to normalise",
                                    img.source or None)
        if voxels == "foreground":
            v = foreground_values(v)
        lo, hi = np.percentile(v, [low, high])
        offs.append(lo)
        scales.append(max(hi - lo, 1e-6 * max(abs(hi), 1.0)))
    return InputNormalization(np.asarray(offs, np.float32), np.asarray(scales, np.float32))


def input_normalization(card: ModelCard, img: SpatialImage | None = None) -> InputNormalization:
    """The card's normalisation; percentile kinds are computed from ``img``'s valid voxels."""
    norm = card.normalization
    if isinstance(norm, FixedNormalization):
        return InputNormalization(np.asarray(norm.offset, np.float32), np.asarray(norm.scale, np.float32))
    if img is None:
        raise ModelError(f"model {card.name!r} normalises per image; an image is needed")
    return percentile_normalization(img, norm.low, norm.high, norm.voxels)


# ---------------------------------------------------------------------------------------------
# input checks against the card

_UNIT_ALIASES = {
    "dn": "DN", "digital number": "DN", "digital numbers": "DN",
    "hu": "HU", "hounsfield": "HU", "hounsfield units": "HU",
    "a.u.": "a.u.", "au": "a.u.", "arbitrary": "a.u.", "arbitrary units": "a.u.",
    "reflectance": "reflectance", "toa reflectance": "reflectance", "sr": "reflectance",
}


def canonical_units(units: str) -> str:
    u = units.strip()
    return _UNIT_ALIASES.get(u.lower(), u)


def _generic_names(names: Sequence[str]) -> bool:
    return all(n == f"band{i + 1}" for i, n in enumerate(names))


def scale_free(card: ModelCard) -> bool:
    """Whether the card's inputs have no absolute scale: arbitrary units (MR intensity) normalised
    per image, so any positive multiple of an image is the same image to the model."""
    return canonical_units(card.units) == "a.u." and isinstance(card.normalization, PercentileNormalization)


def check_input(card: ModelCard, img: SpatialImage) -> InputNormalization:
    """Refuse an input the model was not made for, else return the normalisation to apply.

    Checks domain, dimensionality, band count and names, units (HU vs a.u., reflectance vs DN,
    also from the values when units are unknown) and that the values are not wildly outside the
    card's expected range, where the units are physical (HU, DN, reflectance): a scale-free card
    (:func:`scale_free`) takes any scale. Raises :class:`ModelCardMismatch` naming the file and
    the problem.
    """
    src = img.source or None
    who = f"model {card.name!r}"

    def refuse(msg: str) -> ModelCardMismatch:
        return ModelCardMismatch(f"{msg} ({who} expects: {_expects(card)})", src)

    if img.domain != card.domain:
        raise refuse(f"input is a {img.domain} image but {who} is for {card.domain}")
    want_dims = 3 if card.application != "direct" else card.spatial_dims
    if img.spatial_dims != want_dims:
        raise refuse(f"input has {img.spatial_dims} spatial axes, {who} works on {want_dims}D images")
    if img.channels != card.in_channels:
        raise refuse(f"input has {img.channels} bands {list(img.band_names)}, "
                     f"{who} needs {card.in_channels}")
    if card.bands and not _generic_names(img.band_names):
        if not described(img):
            hint = ",".join(f"{i}={b}" for i, b in enumerate(card.bands, start=1))
            raise refuse(f"the file does not name its bands ({list(img.band_names)} are positions); "
                         f"say what they are, e.g. --band-map {hint} (task config: band_map)")
        if not same_bands(img.band_names, card.bands):
            raise refuse(f"input bands {list(img.band_names)} differ from the model's {card.bands}")
    want_u, got_u = canonical_units(card.units), canonical_units(img.units)
    if got_u and want_u and got_u != want_u:
        raise refuse(f"input is in {img.units!r} but {who} expects {card.units!r}")

    values = [_valid_values(img, c) for c in range(img.channels)]
    if any(v.size == 0 for v in values):
        raise refuse("input has a band with no valid values")
    lo = min(float(np.percentile(v, 0.1)) for v in values)
    hi = max(float(np.percentile(v, 99.9)) for v in values)
    if want_u == "DN" and img.data.dtype.kind == "f" and -0.5 <= lo and hi <= 1.5:
        raise refuse(f"values lie in [{lo:.3g}, {hi:.3g}]: this looks like reflectance (0-1), "
                     "not digital numbers; convert to DN (e.g. x10000 for Sentinel-2 L2A) first")
    if want_u == "a.u." and card.domain == "mri" and lo < -500:
        raise refuse(f"values reach {lo:.0f}: this looks like CT in Hounsfield units, not MR intensity")
    if card.input_range is not None and not scale_free(card):
        a, b = card.input_range
        span = b - a
        if hi > b + span or lo < a - span:
            raise refuse(f"values span [{lo:.4g}, {hi:.4g}] (0.1-99.9 percentiles), far outside "
                         f"the expected range [{a:.4g}, {b:.4g}] {card.units}")
    return input_normalization(card, img)


def _expects(card: ModelCard) -> str:
    bands = f"bands {card.bands}" if card.bands else f"{card.in_channels} channel(s)"
    rng = (" (any scale)" if scale_free(card) else
           f" in [{card.input_range[0]:g}, {card.input_range[1]:g}]" if card.input_range else "")
    return f"{card.domain}, {bands}, units {card.units!r}{rng}"


# ---------------------------------------------------------------------------------------------
# the inference wrapper


def _placeholder(card: ModelCard) -> InputNormalization:
    return InputNormalization(np.zeros(card.in_channels, np.float32), np.ones(card.in_channels, np.float32))


class CardModel(Normalized):
    """A network with its card's intensity normalisation around it (a :class:`Normalized`).

    ``forward`` maps inputs in the image's own units to outputs in the same units. For a fixed
    normalisation the numbers come from the card; for a per-image one call :meth:`prepare` with
    the whole image first (tiles must share the image's statistics, so they are never computed per
    tile). :meth:`prepare` also checks the image against the card.
    """

    def __init__(self, net: nn.Module, card: ModelCard) -> None:
        per_image = isinstance(card.normalization, PercentileNormalization)
        norm = _placeholder(card) if per_image else input_normalization(card)
        out_index = ([card.bands.index(b) for b in card.output_bands] if card.output_bands
                     else list(range(card.in_channels)))
        super().__init__(net, norm.offset.tolist(), norm.scale.tolist(),
                         norm.offset[out_index].tolist(), norm.scale[out_index].tolist())
        self._out_index = out_index
        self.card = card
        self._ready = not per_image

    def set_normalization(self, norm: InputNormalization) -> None:
        for name, v in (("norm_offset", norm.offset), ("norm_scale", norm.scale),
                        ("out_offset", norm.offset[self._out_index]), ("out_scale", norm.scale[self._out_index])):
            buf = getattr(self, name)
            buf.copy_(torch.as_tensor(np.asarray(v, np.float32)).view(buf.shape))
        self._ready = True

    def prepare(self, img: SpatialImage) -> InputNormalization:
        """Check ``img`` against the card and set the normalisation for it."""
        norm = check_input(self.card, img)
        self.set_normalization(norm)
        return norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._ready:
            raise ModelError(f"model {self.card.name!r} normalises per image: call prepare(image) first")
        return super().forward(x)


# ---------------------------------------------------------------------------------------------
# save / resolve / load


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _network(model: nn.Module) -> nn.Module:
    """The bare network inside inference/EMA wrappers (what the registry builds)."""
    from torch.optim.swa_utils import AveragedModel

    while True:
        if isinstance(model, Normalized):
            model = model.net
        elif isinstance(model, AveragedModel):
            model = model.module
        else:
            return model


def save_checkpoint(model: nn.Module, card: ModelCard, directory: str | os.PathLike[str]) -> Path:
    """Write ``<dir>/<name>.pt`` (CPU ``state_dict``) and ``<dir>/<name>.json`` (card with the
    weights' sha256), each atomically. Returns the card's path."""
    directory = Path(directory)
    net = _network(model)
    state = {k: v.detach().to("cpu", copy=True).contiguous() for k, v in net.state_dict().items()}
    pt = directory / f"{card.name}.pt"
    with atomic_path(pt) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
    card = card.model_copy(update={"weights_sha256": digest})
    card = ModelCard.model_validate(card.model_dump())  # re-validate after the update
    js = directory / f"{card.name}.json"
    with atomic_path(js) as tmp:
        tmp.write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return js


def resolve_checkpoint(name: str | os.PathLike[str]) -> Path:
    """Path of a model card: an explicit ``.json``/``.pt`` path or folder, else ``<name>`` looked
    up in the user folders (first) and the shipped ``domainsr/checkpoints/<name>/``."""
    p = Path(name).expanduser()
    if p.suffix in (".json", ".pt") and p.exists():
        js = p.with_suffix(".json")
        if not js.exists():
            raise ModelError("checkpoint has no model card (.json) beside it", p)
        return js
    if p.is_dir():
        cards = [p / f"{p.name}.json"] if (p / f"{p.name}.json").exists() else sorted(p.glob("*.json"))
        if len(cards) != 1:
            raise ModelError(f"folder holds {len(cards)} model cards; name one", p)
        return cards[0]
    stem = str(name)
    searched = []
    for root in checkpoint_roots():
        for cand in (root / stem / f"{stem}.json", root / f"{stem}.json"):
            searched.append(str(cand.parent))
            if cand.exists():
                return cand
    raise ModelError(f"no checkpoint named {stem!r}; looked in {sorted(set(searched))}", stem)


def read_card(path: str | os.PathLike[str]) -> ModelCard:
    path = Path(path)
    try:
        return ModelCard.model_validate_json(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ModelError(f"cannot read model card: {exc.strerror or exc}", path) from exc
    except (ValidationError, json.JSONDecodeError) as exc:
        raise ModelError(f"invalid model card: {exc}", path) from exc


def load_state(card_path: Path, card: ModelCard) -> dict[str, torch.Tensor]:
    """The verified ``state_dict`` beside ``card_path`` (sha256 checked, ``weights_only`` load)."""
    pt = card_path.with_suffix(".pt")
    if not pt.exists():
        raise ModelError("weights file is missing", pt)
    digest = sha256_file(pt)
    if digest != card.weights_sha256:
        raise ModelError(f"weights sha256 {digest[:16]}... does not match the card's "
                         f"{card.weights_sha256[:16] or '(none)'}...; the file was changed or corrupted", pt)
    try:
        state = torch.load(pt, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError and friends: anything but plain tensors is refused
        raise ModelError(f"refused to load weights (only plain tensors are accepted): {exc}", pt) from exc
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError("weights file is not a state_dict of tensors", pt)
    return state


def build_network(card: ModelCard) -> nn.Module:
    from domainsr.models import build_model

    try:
        return build_model(card.architecture.name, spatial_dims=card.spatial_dims,
                           in_channels=card.in_channels, scale=tuple(card.scale), **card.architecture.kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"cannot build {card.architecture.name!r} for card {card.name!r}: {exc}") from exc


def load_checkpoint(path_or_name: str | os.PathLike[str]) -> tuple[CardModel, ModelCard]:
    """Verified network in eval mode, wrapped with its card's normalisation, and the card."""
    card_path = resolve_checkpoint(path_or_name)
    card = read_card(card_path)
    state = load_state(card_path, card)
    net = build_network(card)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelError(f"weights do not fit {card.architecture.name!r}: {exc}", card_path) from exc
    model = CardModel(net, card)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card
