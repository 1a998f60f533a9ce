"""Model resolution: which model a reference names (a checkpoint with its model card, third-party
weights, a registry architecture, or the per-scan ``self-supervised`` mode), its identity (what
keys a run), and the model built for an image (card checked, per-image normalisation set; a
slice-wise 2D checkpoint wrapped to run on a volume's thick-slice axis).
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.config import ModelRef
from domainsr.errors import ConfigError, InputError, ModelError
from domainsr.image import SpatialImage

log = logging.getLogger("domainsr.app")


def find_checkpoint(name: str) -> Path | None:
    """The model card path of checkpoint ``name`` (a path, or a name in the user/shipped folders,
    where ``-`` and ``_`` are interchangeable), or ``None`` when there is none (also for
    third-party weights files, which have no card)."""
    from domainsr.models.checkpoints import resolve_checkpoint
    from domainsr.models.names import is_weights_file

    if is_weights_file(name):
        return None
    for candidate in dict.fromkeys((name, name.replace("-", "_"), name.replace("_", "-"))):
        try:
            return resolve_checkpoint(candidate)
        except ModelError:
            continue
    return None


def parse_scale(text: str | int | Sequence[int] | None) -> int | list[int] | None:
    """``"2"`` -> 2, ``"1,1,4"`` -> [1, 1, 4] (the CLI's ``--scale``)."""
    if text is None or isinstance(text, int):
        return text
    if not isinstance(text, str):
        vals = [int(v) for v in text]
        return vals[0] if len(vals) == 1 else vals
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"scale {text!r} is not an integer or a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise ConfigError(f"scale {text!r} needs factors >= 1")
    return vals[0] if len(vals) == 1 else vals


def model_identity(ref: ModelRef) -> dict[str, Any]:
    """What identifies a model's outputs: a checkpoint's name and weights sha256, third-party
    weights' sha256, architecture and declared input range, or a registry model's name, scale and
    options. Raises ModelError/ConfigError for an unusable reference."""
    from domainsr.models.names import is_weights_file
    from domainsr.train.selfsup import is_self_supervised

    if is_self_supervised(ref.name):
        return self_supervised_identity(ref)
    if is_weights_file(ref.name):
        from domainsr.models.weights import weights_identity

        return weights_identity(ref.name, ref.kwargs)
    card_path = find_checkpoint(ref.name)
    if card_path is not None:
        from domainsr.models.checkpoints import read_card
        from domainsr.models.guided import is_guided

        card = read_card(card_path)
        if ref.kwargs:
            raise ConfigError(f"model.kwargs apply to registry models, not to checkpoint {card.name!r}")
        return {"kind": "checkpoint", "name": card.name, "version": card.version, "sha256": card.weights_sha256,
                "scale": list(card.scale), "application": card.application, "guided": is_guided(card),
                "path": str(card_path)}
    from domainsr.models import get_spec
    from domainsr.models.names import check_model

    check_model(ref.name, ref.scale)  # unknown (with the closest name), not an SR model, no scale
    spec = get_spec(ref.name)
    return {"kind": "registry", "name": spec.name, "family": spec.family, "scale": ref.scale,
            "kwargs": dict(ref.kwargs)}


def self_supervised_identity(ref: ModelRef) -> dict[str, Any]:
    """The identity of ``--model self-supervised`` (trained per scan when the item is enhanced):
    its scale (``K`` or ``1,1,K``) and settings (``model.kwargs`` and ``?key=value`` options).
    ConfigError for a bad scale or setting."""
    from domainsr.train.selfsup import SELF_SUPERVISED, check_factor, parse_settings

    settings = parse_settings(ref.name, ref.kwargs)
    return {"kind": SELF_SUPERVISED, "name": SELF_SUPERVISED, "scale": check_factor(ref.scale),
            "settings": settings.model_dump(mode="json")}


def slicewise_module(module: Any, slice_axis: int) -> Any:
    """The 3D module that applies a slice-wise checkpoint (a 2D network whose card has scale
    ``(1, s)``: its second axis is the slice axis) to a volume: on every plane that contains the
    slice axis, in both orientations, averaged (as SMORE-style models are trained). It exposes
    ``scale``, ``receptive_radius`` and the channels per volume axis, so the patch engine tiles it
    like any 3D model, and ``prepare(img)`` (the card's input check and normalisation)."""
    import torch

    from domainsr.models.layers import Runs2D

    card = module.card
    if len(card.scale) != 2 or card.scale[0] != 1:
        raise ModelError(f"slice-wise model needs scale (1, s), card says {card.scale}", card.name)
    s, (ra, rb) = int(card.scale[1]), card.receptive_radius

    class SliceWise(Runs2D):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.axis = slice_axis
            self.spatial_dims = 3
            self.scale = tuple(s if a == slice_axis else 1 for a in range(3))
            self.receptive_radius = tuple(rb if a == slice_axis else ra for a in range(3))
            self.in_channels = module.in_channels
            self.out_channels = module.out_channels
            self.card = card

        def prepare(self, img: SpatialImage) -> Any:
            return self.inner.prepare(img)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.movedim(2 + self.axis, -1)  # (B, C, P, Q, K), K = slice axis
            b, c, p, q, k = x.shape
            ya = self.inner(x.permute(0, 3, 1, 2, 4).reshape(b * q, c, p, k))  # planes (P, K)
            co = ya.shape[1]
            ya = ya.reshape(b, q, co, p, k * s).permute(0, 2, 3, 1, 4)
            yb = self.inner(x.permute(0, 2, 1, 3, 4).reshape(b * p, c, q, k))  # planes (Q, K)
            yb = yb.reshape(b, p, co, q, k * s).permute(0, 2, 1, 3, 4)
            return ((ya + yb) * 0.5).movedim(-1, 2 + self.axis)

    return SliceWise().eval()


def slicewise_descriptor(model: Any, slice_axis: int) -> Any:
    """A slice-wise checkpoint's descriptor with its module run on ``slice_axis`` of a volume
    (:func:`slicewise_module`)."""
    inner = slicewise_module(model.module, slice_axis)
    return model.with_module(inner, spatial_dims=3, scale=inner.scale, receptive_radius=inner.receptive_radius,
                             prepare=inner.prepare)


def slice_axis_of(img: SpatialImage) -> int:
    """The thick-slice axis of a volume. For a DICOM series: the axis it was stacked on (along the
    slice normal, from the geometry; an in-plane axis never is). Otherwise the axis with the
    largest spacing, the last of those within 0.1 % of it (rounding noise makes no slice thicker).
    A single slice (2D) has none: InputError."""
    from domainsr.io.dicom import stack_axis

    spacing = np.asarray(img.geometry.spacing, float)
    axis = stack_axis(img)
    if axis is None:
        axis = int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])
    if img.spatial_shape[axis] == 1:
        raise InputError("a single slice is 2D: a slice-wise model has no slice axis to upsample "
                         "(use an in-plane model or scale)")
    if spacing[axis] < 1.5 * np.min(spacing):
        log.warning("voxels are nearly isotropic (%s mm); a slice-wise model expects thick slices "
                    "along one axis; using axis %d", np.round(spacing, 3).tolist(), axis)
    return axis


def self_supervised_axis(img: SpatialImage, scale: int | Sequence[int], item_id: str) -> tuple[int, int]:
    """The thick axis and ``K`` of ``--model self-supervised``: the axis of a per-axis scale's
    factor, or for a single ``K`` the axis with the largest spacing. InputError naming the item
    for a 2D image, a non-medical one or a scale for other axes."""
    if img.domain not in ("mri", "ct"):
        raise InputError(f"self-supervised thick-slice SR is for MRI and CT volumes, this is a {img.domain} image",
                         item_id)
    if img.spatial_dims != 3 or 1 in img.spatial_shape:
        raise InputError(f"self-supervised thick-slice SR needs a 3D volume; this image is 2D (shape "
                         f"{list(img.spatial_shape)}): it has no thick-slice axis to upsample", item_id)
    if isinstance(scale, int):
        return slice_axis_of(img), scale
    if len(scale) != 3:
        raise InputError(f"scale {list(scale)} has {len(scale)} factors; this volume has 3 axes", item_id)
    axis = int(np.argmax(scale))
    spacing = img.geometry.spacing
    if spacing[axis] < max(spacing) * (1 - 1e-3):
        log.warning("%s: upsampling axis %d (%.3g mm) though axis %d has the largest spacing (%.3g mm)", item_id,
                    axis, spacing[axis], int(np.argmax(spacing)), max(spacing))
    return axis, int(scale[axis])


def load_model(ref: ModelRef, img: SpatialImage) -> tuple[Any, dict[str, Any]]:
    """The :class:`~domainsr.models.descriptor.ModelDescriptor` that enhances ``img`` as ``ref``
    says (its ``scale``, and the module the engine runs), and its identity for provenance.

    A checkpoint is loaded (weights verified) and checked against ``img`` by its card
    (ModelCardMismatch on a wrong domain, band set, units or value range); its per-image
    normalisation is set from ``img``. Third-party weights are loaded through spandrel with a card
    generated for ``img`` (input range declared, from a card beside them, or a natural image's
    dtype range) and checked the same way. A registry model is built for ``img``'s channels and
    axes; an untrained architecture (random weights) is run only with a loud warning.
    """
    from domainsr.models.descriptor import from_checkpoint, from_registry

    ident = model_identity(ref)
    public = {k: v for k, v in ident.items() if k != "path"}
    if ident["kind"] == "self-supervised":
        raise ConfigError("the self-supervised model is trained per scan by `domainsr enhance SCAN --model "
                          "self-supervised`; to re-run or audit it, name the card written beside its output "
                          "(OUTPUT.card.json)")
    if ident["kind"] == "weights":
        from domainsr.models.weights import load_weights

        model = load_weights(ident["path"], img, input_range=ident.get("input_range"))
        model.prepare(img)
        if ref.scale is not None and not _same_scale(ref.scale, model.scale):
            raise ConfigError(f"scale {ref.scale} differs from the weights' {list(model.scale)} ({ident['name']})")
        return model, {**public, **model.record(), "card": model.card.model_dump(mode="json")}
    if ident["kind"] == "checkpoint":
        model = from_checkpoint(ident["path"])
        model.prepare(img)
        if model.application == "slicewise":
            model = slicewise_descriptor(model, slice_axis_of(img))
        if ref.scale is not None and not _same_scale(ref.scale, model.scale):
            raise ConfigError(f"scale {ref.scale} differs from checkpoint {model.name!r}'s {list(model.scale)}")
        return model, {**public, **model.record(), "scale": list(model.scale)}
    scale = in_plane_scale(ref.scale, img)
    model = from_registry(ref.name, spatial_dims=img.spatial_dims, in_channels=img.channels, scale=scale,
                          **ref.kwargs)
    if model.weights == "untrained":
        log.warning("UNTRAINED: model %r is a registry architecture with random weights; its output is "
                    "not super-resolution. Use a trained checkpoint or your own weights (--model FILE.pth); "
                    "`domainsr models list` shows which is which", ref.name)
    return model, {**ident, "scale": scale, "weights": model.record()["weights"], "sha256": None,
                   "config_sha256": model.config_sha256}


def in_plane_scale(scale: int | Sequence[int] | None, img: SpatialImage) -> int | list[int] | None:
    """A single factor for a volume with one slice (a single DICOM slice, a 2D NIfTI) applies in
    plane only: a single slice is a 2D image, and nothing is invented along its normal."""
    if isinstance(scale, int) and img.spatial_dims == 3 and 1 in img.spatial_shape:
        return [1 if n == 1 else scale for n in img.spatial_shape]
    return scale


def _same_scale(want: int | Sequence[int], have: Sequence[int]) -> bool:
    if isinstance(want, int):
        return max(have) == want and all(h in (1, want) for h in have)
    return list(want) == list(have)
