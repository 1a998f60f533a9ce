"""Guided (multi-modal) super-resolution, DSen2-style (Lanaras et al. 2018).

``guided_rescnn`` super-resolves ``target`` bands with ``guide`` bands of the same scene that are
already on the fine grid (Sentinel-2: the 20 m bands guided by the 10 m bands; Landsat 8: the
30 m bands guided by the 15 m pan band)::

    up = cubic(lr)                                    # (N, Ct, *hr), the interpolation baseline
    y  = up + tail(body(head(cat(up, guide))) + head(...))   # every conv on the HR grid

``in_channels`` counts *all* input bands (``Ct + Cg``, as the model card lists them: target bands
first, then guide bands) and ``out_channels`` the target bands. The tail conv starts at zero, so
an untrained net *is* the cubic baseline. With ``guide_channels=0`` it is an unguided residual
CNN on the HR grid (``forward(x)`` alone).

Two-grid inputs travel as one tensor on the LR grid where a single-input API is needed (the
trainer's loop, the patch engine): :func:`pack` appends the guide's pixel-unshuffled blocks
(``Cg * prod(scale)`` channels) to the LR bands, and :class:`PackedGuided` unpacks them. The
packing is a lossless rearrangement, so a tile of the packed image *is* an LR tile with its
matching HR guide tile, and ``receptive_radius`` (LR pixels) is the halo for both.

:class:`GuidedCardModel` wraps a trained net with its card's fixed per-band normalisation, and
:func:`check_guided_input` refuses inputs that do not match the card (bands, units, range, grids).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from domainsr.errors import ModelCardMismatch, ModelError
from domainsr.image import SpatialImage
from domainsr.models.baselines import default_base, interpolator
from domainsr.models.checkpoints import (
    FixedNormalization,
    InputNormalization,
    ModelCard,
    check_input,
    input_normalization,
    load_checkpoint,
)
from domainsr.models.descriptor import ModelDescriptor
from domainsr.models.layers import (
    ResBlock,
    SRModule,
    branch_radius,
    chain_radius,
    conv,
    conv_nd,
    float32_path,
    memory_format,
    pixel_shuffle_nd,
    up,
)

FAMILY = "guided"


def pixel_unshuffle_nd(x: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """Inverse of :func:`~domainsr.models.layers.pixel_shuffle_nd`:
    ``(N, C, *(sp * s)) -> (N, C * prod(s), *sp)``."""
    s = tuple(int(v) for v in scale)
    if all(v == 1 for v in s):
        return x
    n, c, *hr = x.shape
    d = len(s)
    if len(hr) != d or any(a % b for a, b in zip(hr, s)):
        raise ModelError(f"pixel unshuffle by {s} needs {d} spatial axes divisible by it, "
                         f"got {tuple(x.shape)}")
    sp = [a // b for a, b in zip(hr, s)]
    x = x.reshape(n, c, *(v for a, b in zip(sp, s) for v in (a, b)))  # (N, C, x1, s1, x2, s2, ...)
    x = x.permute([0, 1] + [3 + 2 * i for i in range(d)] + [2 + 2 * i for i in range(d)])
    return x.reshape(n, c * math.prod(s), *sp)


def pack(lr: torch.Tensor, guide: torch.Tensor, scale: Sequence[int]) -> torch.Tensor:
    """One LR-grid tensor ``(N, Ct + Cg * prod(scale), *lr)`` holding both inputs."""
    return torch.cat([lr, pixel_unshuffle_nd(guide, scale)], dim=1)


class GuidedResCNN(SRModule):
    """``forward(lr, guide) -> (N, Ct, *lr * scale)`` with ``guide`` of shape ``(N, Cg, *lr * scale)``."""

    def __init__(self, spatial_dims: int, in_channels: int, scale: int | Sequence[int],
                 out_channels: int | None = None, guide_channels: int = 0, n_blocks: int = 8,
                 n_feats: int = 32, base: str | None = None, zero_init_tail: bool = True) -> None:
        target = int(in_channels) - int(guide_channels)
        if guide_channels < 0 or target < 1:
            raise ModelError(f"guided_rescnn needs 0 <= guide_channels < in_channels, got "
                             f"guide_channels={guide_channels}, in_channels={in_channels}")
        if out_channels is not None and int(out_channels) != target:
            raise ModelError(f"guided_rescnn outputs the {target} target bands (in_channels - "
                             f"guide_channels); out_channels={out_channels} differs")
        super().__init__(spatial_dims, in_channels, target, scale)
        d = self.spatial_dims
        self.target_channels, self.guide_channels = target, int(guide_channels)
        self.base = interpolator(base or default_base(d), d, target, self.scale)
        self.head = conv_nd(d, self.in_channels, n_feats, 3)
        self.body = nn.Sequential(*(ResBlock(d, n_feats) for _ in range(n_blocks)))
        self.tail = conv_nd(d, n_feats, target, 3)
        if zero_init_tail:
            nn.init.zeros_(self.tail.weight)
            nn.init.zeros_(self.tail.bias)
        convs = [conv(1)] * (2 + 2 * n_blocks)
        radii = [chain_radius([self.base.radius_op], d), chain_radius([self.base.radius_op, *convs], d)]
        if self.guide_channels:  # guide pixel p sits in LR pixel floor(p / s): an "up" step
            radii.append(chain_radius([up(self.scale), *convs], d))
        self.receptive_radius = branch_radius(*radii)
        self._format = memory_format(d)
        self.to(memory_format=self._format)

    def forward(self, lr: torch.Tensor, guide: torch.Tensor | None = None) -> torch.Tensor:
        if self.guide_channels and guide is None:
            raise ModelError(f"guided_rescnn needs {self.guide_channels} guide band(s) beside the LR bands: "
                             "run it with domainsr.engine.guided (e.g. enhance_band_set)")
        if self.guide_channels == 0 and guide is not None:
            raise ModelError("this guided_rescnn was built with guide_channels=0 and takes no guide")
        if lr.shape[1] != self.target_channels:
            raise ModelError(f"guided_rescnn expects {self.target_channels} LR bands, got {lr.shape[1]}")
        up_ = float32_path(self.base, lr)
        x = up_
        if guide is not None:
            want = (lr.shape[0], self.guide_channels, *up_.shape[2:])
            if tuple(guide.shape) != want:
                raise ModelError(f"guided_rescnn needs guide bands of shape {want} on the HR grid, "
                                 f"got {tuple(guide.shape)}")
            x = torch.cat([up_, guide.to(up_.dtype)], dim=1)
        f = self.head(x.contiguous(memory_format=self._format))
        # out of place: under autocast the residual is bf16/fp16, the base stays float32
        return up_ + self.tail(self.body(f) + f)


class PackedGuided(nn.Module):
    """A guided module (``forward(lr, guide)``) seen as a single-input SR module on the LR grid:
    ``forward(pack(lr, guide, scale))``. Exposes ``scale``, ``spatial_dims``, ``receptive_radius``,
    ``in_channels`` (packed count) and ``out_channels`` for the trainer loop and the patch engine."""

    def __init__(self, guided: nn.Module) -> None:
        super().__init__()
        self.net = guided
        self.target_channels = int(guided.target_channels)
        self.guide_channels = int(guided.guide_channels)
        self.in_channels = self.target_channels + self.guide_channels * math.prod(guided.scale)
        self.out_channels = self.target_channels

    scale = property(lambda self: self.net.scale)
    spatial_dims = property(lambda self: self.net.spatial_dims)
    receptive_radius = property(lambda self: self.net.receptive_radius)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.in_channels:
            raise ModelError(f"packed guided input needs {self.in_channels} channels "
                             f"({self.target_channels} LR + {self.guide_channels} guide x "
                             f"{math.prod(self.scale)}), got {x.shape[1]}")
        ct = self.target_channels
        return self.net(x[:, :ct], pixel_shuffle_nd(x[:, ct:], self.scale))


# ---------------------------------------------------------------------------------------------
# model cards


def is_guided(card: ModelCard) -> bool:
    """Whether ``card`` describes a guided model (inference needs the guide bands too)."""
    from domainsr.models.registry import get_spec

    try:
        family = get_spec(card.architecture.name).family
    except ModelError:
        return False
    return family == FAMILY and int(card.architecture.kwargs.get("guide_channels", 0)) > 0


def guided_bands(card: ModelCard) -> tuple[list[str], list[str]]:
    """``(target bands, guide bands)`` of a guided card: ``bands`` lists the targets (= the
    ``output_bands``) first, then the guides."""
    ct = card.out_channels
    target, guide = list(card.bands[:ct]), list(card.bands[ct:])
    if not is_guided(card) or target != list(card.output_bands) or len(guide) != card.in_channels - ct:
        raise ModelError(f"card {card.name!r} is not a guided model card "
                         "(bands = output bands, then guide bands)")
    return target, guide


def _sub_card(card: ModelCard, index: slice) -> ModelCard:
    """The card as if it took only ``bands[index]`` (for the per-image checks of check_input)."""
    assert isinstance(card.normalization, FixedNormalization)
    bands = card.bands[index]
    norm = FixedNormalization(offset=card.normalization.offset[index], scale=card.normalization.scale[index])
    return card.model_copy(update={"bands": bands, "output_bands": [], "in_channels": len(bands),
                                   "out_channels": len(bands), "normalization": norm})


def check_guided_input(card: ModelCard, lr: SpatialImage, guide: SpatialImage
                       ) -> tuple[InputNormalization, InputNormalization]:
    """Refuse a two-grid input the guided model was not made for; else the normalisations of the
    LR bands and of the guide bands. Checks each image like :func:`check_input` (domain, band
    names, units, value range) and that the guide's grid is the LR grid refined by the card's scale."""
    target, guide_names = guided_bands(card)
    ct = len(target)
    norm_lr = check_input(_sub_card(card, slice(0, ct)), lr)
    norm_guide = check_input(_sub_card(card, slice(ct, None)), guide)
    try:
        want = lr.geometry.scaled(card.scale)
    except Exception as exc:  # GeometryError: the LR grid cannot be refined by the scale
        raise ModelCardMismatch(f"the LR grid {lr.spatial_shape} cannot be refined by {card.scale}: {exc}",
                                lr.source or None) from exc
    if not want.almost_equal(guide.geometry):
        raise ModelCardMismatch(
            f"guide bands {guide_names} (grid {guide.spatial_shape}) are not on the LR bands' grid "
            f"{lr.spatial_shape} refined by {tuple(card.scale)}; read a Sentinel-2 folder with "
            "align=True or crop both to a common, nested extent", guide.source or lr.source or None)
    return norm_lr, norm_guide


class GuidedCardModel(nn.Module):
    """A guided network with its card's fixed normalisation: ``forward(lr, guide)`` maps LR and
    guide bands in the images' own units to the super-resolved target bands in the same units."""

    def __init__(self, net: GuidedResCNN, card: ModelCard) -> None:
        super().__init__()
        if not isinstance(card.normalization, FixedNormalization):
            raise ModelError(f"guided model {card.name!r} needs a fixed normalisation in its card")
        guided_bands(card)
        self.net = net
        self.card = card
        norm = input_normalization(card)
        ct = net.target_channels
        shape = (1, -1) + (1,) * net.spatial_dims
        for name, v in (("lr_offset", norm.offset[:ct]), ("lr_scale", norm.scale[:ct]),
                        ("guide_offset", norm.offset[ct:]), ("guide_scale", norm.scale[ct:])):
            self.register_buffer(name, torch.as_tensor(v, dtype=torch.float32).view(shape), persistent=False)

    scale = property(lambda self: self.net.scale)
    spatial_dims = property(lambda self: self.net.spatial_dims)
    receptive_radius = property(lambda self: self.net.receptive_radius)
    target_channels = property(lambda self: self.net.target_channels)
    guide_channels = property(lambda self: self.net.guide_channels)

    def check(self, lr: SpatialImage, guide: SpatialImage) -> None:
        """Refuse ``lr``/``guide`` images that do not match the card (see :func:`check_guided_input`)."""
        check_guided_input(self.card, lr, guide)

    def forward(self, lr: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
        lo, ls = self.lr_offset.to(lr.dtype), self.lr_scale.to(lr.dtype)
        g = (guide - self.guide_offset.to(guide.dtype)) / self.guide_scale.to(guide.dtype)
        return self.net((lr - lo) / ls, g) * ls + lo


def guided_descriptor(model: nn.Module) -> ModelDescriptor:
    """The packed single-input view (:class:`PackedGuided`) of a guided ``model`` as the engine's
    descriptor: a :class:`GuidedCardModel` is described by its card (name, weights sha256),
    an untrained :class:`GuidedResCNN` as a registry architecture."""
    packed = PackedGuided(model)
    card = getattr(model, "card", None) if isinstance(model, GuidedCardModel) else None
    common = {"module": packed, "architecture": FAMILY + "_rescnn", "scale": packed.scale,
              "spatial_dims": packed.spatial_dims, "in_channels": packed.in_channels,
              "out_channels": packed.out_channels, "receptive_radius": packed.receptive_radius,
              "application": "guided"}
    if card is None:
        return ModelDescriptor(name=f"{FAMILY}_rescnn", kind="registry", weights="untrained", **common)
    return ModelDescriptor(name=card.name, kind="checkpoint", version=card.version,
                           sha256=card.weights_sha256 or None, card=card, bands=tuple(card.bands),
                           output_bands=tuple(card.output_bands), units=card.units,
                           input_range=None if card.input_range is None else tuple(card.input_range),
                           **{**common, "architecture": card.architecture.name})


def load_guided_checkpoint(name: str) -> tuple[GuidedCardModel, ModelCard]:
    """A verified guided checkpoint (name or path, see ``load_checkpoint``) in eval mode."""
    model, card = load_checkpoint(name)
    if not is_guided(card):
        raise ModelError(f"checkpoint {card.name!r} ({card.architecture.name}) is not a guided model", name)
    out = GuidedCardModel(model.net, card).eval()
    return out, card


__all__ = ["GuidedCardModel", "GuidedResCNN", "PackedGuided", "check_guided_input", "guided_bands", "guided_descriptor",
           "is_guided", "load_guided_checkpoint", "pack", "pixel_unshuffle_nd"]
