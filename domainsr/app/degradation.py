"""How the LR input relates to the SR grid in an audit (``domainsr audit --degradation SPEC``).

The reference-free audit re-degrades SR with a noise-free HR -> LR operator and compares it with
the LR input; auditing another tool's output fairly needs the operator that tool assumed. Specs:

* ``area``: each LR pixel is the mean of the SR pixels it covers (block mean);
* ``gaussian:SIGMA``: a Gaussian blur of ``SIGMA`` SR pixels, then the block mean;
* ``mtf:SENSOR``: the sensor's per-band MTF at the LR Nyquist frequency as a Gaussian PSF, then
  point sampling (:data:`MTF_SENSORS`: the sensors :mod:`domainsr.degrade.optical` knows);
* ``card:MODEL``: the degradation in a checkpoint's model card (a shipped or user checkpoint name,
  or a card/checkpoint path);
* ``auto`` (the default): the card of the model the SR file's DomainSR provenance names (our
  outputs carry it: the ``.provenance.json`` beside them, the GeoTIFF tag ``DOMAINSR_MODEL``, the
  NIfTI description, the DICOM DerivationDescription), else ``area``.

:func:`parse_degradation` checks a spec before any work (a ConfigError: a usage error);
:func:`choose_operator` makes the operator for one SR file: an :class:`AuditOperator`, which the
audit calls and whose ``describe()`` (in the report's ``provenance.degradation``) says which
operator was used and why.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from domainsr.bands import band_key
from domainsr.degrade import NoiseFreeOperator, noise_free_operator
from domainsr.degrade.optical import SENSORS
from domainsr.errors import ConfigError, DomainSRError

SpecKind = Literal["area", "gaussian", "mtf", "card", "auto"]
#: The sensors ``mtf:SENSOR`` accepts.
MTF_SENSORS: tuple[str, ...] = tuple(sorted(SENSORS))
#: ``--degradation``'s forms, for help texts.
SPEC_FORMS = ("auto", "area", "gaussian:SIGMA", *(f"mtf:{s}" for s in MTF_SENSORS), "card:MODEL")


@dataclass(frozen=True)
class DegradationSpec:
    """A parsed ``--degradation`` value: its kind and argument (sigma, sensor, or model)."""

    kind: SpecKind
    value: float | str | None = None

    @property
    def text(self) -> str:
        """The spec as written (``gaussian:1.5``, ``card:mri-t1-x2``)."""
        if self.value is None:
            return self.kind
        return f"{self.kind}:{self.value:g}" if isinstance(self.value, float) else f"{self.kind}:{self.value}"


def parse_degradation(text: str | None) -> DegradationSpec:
    """``--degradation`` as a :class:`DegradationSpec` (``None`` is ``auto``); a ConfigError naming
    the accepted forms for anything else, an unknown sensor, or a model without a model card."""
    raw = "auto" if text is None else str(text).strip()
    kind, sep, arg = raw.partition(":")
    kind, arg = kind.strip().lower(), arg.strip()
    forms = ", ".join(SPEC_FORMS)
    if kind in ("area", "auto") and not sep:
        return DegradationSpec(kind)  # type: ignore[arg-type]
    if kind == "gaussian" and arg:
        try:
            sigma = float(arg)
        except ValueError:
            sigma = float("nan")
        if not math.isfinite(sigma) or sigma < 0:
            raise ConfigError(f"--degradation {raw!r}: SIGMA must be a number >= 0 (Gaussian sigma in SR pixels)")
        return DegradationSpec("gaussian", sigma)
    if kind == "mtf" and arg:
        if arg.lower() not in MTF_SENSORS:
            raise ConfigError(f"--degradation {raw!r}: no MTF table for sensor {arg!r}; known: {list(MTF_SENSORS)}")
        return DegradationSpec("mtf", arg.lower())
    if kind == "card" and arg:
        card_path(arg)  # a ConfigError when there is no such checkpoint
        return DegradationSpec("card", arg)
    raise ConfigError(f"--degradation {raw!r} is not a degradation spec; use one of: {forms}")


def card_path(model: str) -> Path:
    """The model card of checkpoint ``model`` (a name or a path); a ConfigError when there is none."""
    from domainsr.app.models import find_checkpoint
    from domainsr.models.names import is_weights_file

    found = None if is_weights_file(model) else find_checkpoint(model)
    if found is not None:
        return found
    from domainsr.models import get_spec

    try:
        get_spec(model)
    except DomainSRError:
        raise ConfigError(f"--degradation card:{model}: no checkpoint with a model card named {model!r} "
                          "(see `domainsr models list`)") from None
    raise ConfigError(f"--degradation card:{model}: {model!r} is a registered model without a model card; "
                      "say the degradation with area, gaussian:SIGMA or mtf:SENSOR")


class AuditOperator:
    """The noise-free HR -> LR operator an audit re-degrades SR with, the spec it came from and why
    it was chosen. Called like the audit's default (``(C, *hr) -> (C, *lr)`` float32);
    ``describe()`` is what the report records."""

    def __init__(self, spec: str, why: str, scale: Sequence[int], operator: NoiseFreeOperator | None = None,
                 asked: str | None = None) -> None:
        self.spec, self.why, self.asked = spec, why, asked or spec
        self.scale = tuple(int(s) for s in scale)
        self.operator = operator

    def __call__(self, x: np.ndarray) -> np.ndarray:
        if self.operator is not None:
            return self.operator(x)
        c, *sp = x.shape
        shape = [c] + [v for s, k in zip(sp, self.scale) for v in (s // k, k)]
        return np.asarray(x, np.float32).reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(self.scale), 2)))

    def describe(self) -> dict[str, Any]:
        """``{"spec", "asked", "why", "operator"}``: the spec used (``auto`` resolved), the one given,
        the reason, and the operator's own description (``area-average`` for the block mean)."""
        op = (self.operator.describe() if self.operator is not None
              else {"name": "area-average", "scale": list(self.scale)})
        return {"spec": self.spec, "asked": self.asked, "why": self.why, "operator": op}


def choose_operator(spec: DegradationSpec | str | None, sr_path: str | Path | None, scale: Sequence[int],
                    channels: int, bands: Sequence[str] = ()) -> AuditOperator:
    """The operator of ``spec`` for an SR image of ``channels`` bands (named ``bands``) at ``scale``;
    ``auto`` reads the DomainSR provenance of the file at ``sr_path``. ConfigError when the spec does
    not fit the image (an MTF table without these bands, a card for other bands or axes)."""
    s = spec if isinstance(spec, DegradationSpec) else parse_degradation(spec)
    scale = tuple(int(f) for f in scale)
    if s.kind == "area":
        return AuditOperator("area", "asked for (--degradation area)", scale)
    if s.kind == "gaussian":
        op = _operator({"kind": "gaussian_mean", "scale": list(scale), "sigma": float(s.value)}, scale, channels)  # type: ignore[arg-type]
        return AuditOperator(s.text, f"asked for: Gaussian sigma {s.value:g} SR px, then the block mean", scale, op)
    if s.kind == "mtf":
        from domainsr.degrade.optical import OpticalDegradation

        if not bands:
            raise ConfigError(f"--degradation {s.text}: the SR image names no bands to look the MTF up by")
        deg = OpticalDegradation.for_sensor(str(s.value), list(bands), scale)
        return AuditOperator(s.text, f"asked for: the {s.value} MTF per band at the LR Nyquist frequency, "
                             "then point sampling", scale, _operator(deg.describe(), scale, channels))
    if s.kind == "card":
        return _card_operator(str(s.value), scale, channels, bands, s.text, "asked for")
    found = provenance_model(sr_path) if sr_path is not None else None
    if found is None:
        return AuditOperator("area", "auto: the SR file carries no DomainSR provenance naming its model; area "
                             "average assumed (say --degradation to choose)", scale, asked="auto")
    name, where = found
    shown = Path(name).name if name.endswith(".json") else name  # a card path: its folder may name a patient
    try:
        card_path(name)
    except ConfigError:
        return AuditOperator("area", f"auto: {where} names model {shown!r}, which has no model card here; area "
                             "average assumed", scale, asked="auto")
    return _card_operator(name, scale, channels, bands, "auto", f"auto: {where} names model {shown!r};")


def _operator(spec: dict[str, Any], scale: Sequence[int], channels: int) -> NoiseFreeOperator:
    op = noise_free_operator(spec, scale, channels)
    if op is None:
        raise ConfigError(f"degradation {spec.get('kind')!r} has no noise-free form to audit with")
    return op


def _card_operator(model: str, scale: tuple[int, ...], channels: int, bands: Sequence[str], asked: str,
                   reason: str) -> AuditOperator:
    """The card's degradation on ``scale``'s axes, its per-band values picked for ``bands``."""
    from domainsr.models.checkpoints import read_card

    path = card_path(model)
    card = read_card(path)
    spec = card_degradation({"kind": "checkpoint", "path": str(path)}, scale)
    text = f"card:{card.name}"
    if not spec:
        return AuditOperator("area", f"{reason} its card records no degradation; area average assumed", scale,
                             asked=asked)
    given = spec.get("scale")
    if isinstance(given, (list, tuple)) and [int(v) for v in given] != list(scale):
        raise ConfigError(f"--degradation {text}: the card's degradation is x{list(given)}, the SR/LR pair "
                          f"is x{list(scale)}")
    mtf = spec.get("mtf")
    if isinstance(mtf, (list, tuple)) and len(mtf) != channels and card.bands and bands:
        keys = {band_key(b): v for b, v in zip(card.bands, mtf)}
        missing = [b for b in bands if band_key(b) not in keys]
        if missing or len(card.bands) != len(mtf):
            raise ConfigError(f"--degradation {text}: the card has MTF values for {card.bands}, not for {missing}")
        spec = {**spec, "mtf": [keys[band_key(b)] for b in bands]}
    op = noise_free_operator(spec, scale, channels)
    if op is None:
        return AuditOperator("area", f"{reason} its card's degradation ({spec.get('kind')}) has no noise-free "
                             "form; area average assumed", scale, asked=asked)
    why = f"{reason} the noise-free form of its model card's degradation" if asked == "auto" else \
        f"asked for: the noise-free form of {card.name}'s model card degradation"
    return AuditOperator(text, why, scale, op, asked=asked)


def card_degradation(ident: dict[str, Any], scale: Sequence[int]) -> dict[str, Any] | None:
    """The degradation a checkpoint was trained to invert (its card), on ``scale``'s axes (a
    slice-wise card's 2D factors become the volume's), or ``None``. A training mix (``one_of``)
    is audited against its primary (first) operator: the held-out pair and the LR-consistency
    check must use one and the same physics."""
    if ident["kind"] != "checkpoint":
        return None
    from domainsr.degrade import primary_spec
    from domainsr.models.checkpoints import read_card

    spec = dict(read_card(ident["path"]).degradation) or None
    if spec is not None and "kind" not in spec and isinstance(spec.get("target"), dict):
        spec = dict(spec["target"])  # guided cards: {protocol, target, guide}; the output is the target bands
    if spec is not None:
        spec = primary_spec(spec)
    given = spec.get("scale") if spec is not None else None
    if isinstance(given, (list, tuple)) and len(given) != len(scale):
        spec["scale"] = list(scale)
    return spec


def consistency_operator(ident: dict[str, Any], scale: Sequence[int], channels: int) -> NoiseFreeOperator | None:
    """The noise-free HR -> LR operator for the reference-free audit's LR-consistency check: the
    checkpoint's own degradation (SR re-degraded that way should give back the input; see
    :func:`~domainsr.degrade.noise_free_operator`), or ``None`` (the audit's default area average)
    for registry models and degradations without a noise-free form."""
    spec = card_degradation(ident, scale)
    return None if spec is None else noise_free_operator(spec, scale, channels)


def model_operator(ident: dict[str, Any], scale: Sequence[int], channels: int) -> AuditOperator:
    """The operator of the enhance flow's audit of ``ident``'s own output: its card's degradation
    (:func:`consistency_operator`), else the block mean, with the reason."""
    op = consistency_operator(ident, scale, channels)
    name = ident.get("name", "?")
    if op is not None:
        return AuditOperator(f"card:{name}", f"the model that made this output ({name}): the noise-free form of "
                             "its model card's degradation", scale, op, asked="auto")
    why = ("its model card's degradation has no noise-free form" if ident.get("kind") == "checkpoint"
           else "it has no model card")
    return AuditOperator("area", f"the model that made this output ({name}): {why}; area average assumed", scale,
                         asked="auto")


def provenance_model(path: str | Path) -> tuple[str, str] | None:
    """The model that made the DomainSR output at ``path`` and where that was found, or ``None``:
    the ``.provenance.json`` beside it, else the marker in the file (GeoTIFF tag ``DOMAINSR_MODEL``,
    NIfTI description, DICOM DerivationDescription)."""
    p = Path(str(path).rstrip("/"))
    side = p.with_name(p.name + ".provenance.json")
    if side.is_file():
        try:
            record = json.loads(side.read_text(encoding="utf-8"))
            model = record.get("provenance", {}).get("model") or {}
            extras = record.get("extras") or {}
        except (OSError, ValueError, AttributeError):
            model, extras = {}, {}
        card = extras.get("card.json") if isinstance(extras, dict) else None
        if isinstance(model, dict) and model.get("kind") == "self-supervised" and isinstance(card, str):
            # a per-scan model: its card lies beside the output
            return str(p.parent / Path(card).name), f"its provenance file {side.name} (the per-scan model card beside it)"
        name = model.get("name") if isinstance(model, dict) else None
        if name:
            return str(name), f"its provenance file {side.name}"
    try:
        name = _embedded_model(p)
    except Exception:  # noqa: BLE001 - an unreadable header: no provenance (the audit's reader says why)
        name = None
    return (name, "its DomainSR marker") if name else None


def _embedded_model(p: Path) -> str | None:
    from domainsr.io import FORMATS, OUTPUTS, detect_format

    fmt = FORMATS.get(detect_format(p))
    out = OUTPUTS.get(fmt.output) if fmt is not None else None
    return out.marker_model(p) if out is not None else None


__all__ = ["MTF_SENSORS", "SPEC_FORMS", "AuditOperator", "DegradationSpec", "card_degradation", "card_path",
           "choose_operator", "consistency_operator", "model_operator", "parse_degradation", "provenance_model"]
