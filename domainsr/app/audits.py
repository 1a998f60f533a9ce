"""Audits at model level: the audit settings of a run, the degradation a checkpoint was trained to
invert (its card) and its noise-free form for the LR-consistency check, the reference-free audit
of one enhanced item, and the two stand-alone audits: held-out (a real HR reference degraded,
enhanced, compared with interpolation and the reference) and of an SR file made by any tool.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from domainsr.app.inputs import input_for, select_input
from domainsr.app.models import load_model, model_identity
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.degrade import NoiseFreeOperator, noise_free_operator
from domainsr.errors import ConfigError
from domainsr.image import SpatialImage
from domainsr.io.formats import risk_label

if TYPE_CHECKING:
    from domainsr.audit import AuditOutcome


def audit_thresholds(config: EnhanceConfig, source: str | None = None) -> Any:
    """``config.audit`` as :class:`~domainsr.audit.AuditThresholds` (ConfigError naming the file)."""
    from pydantic import ValidationError

    from domainsr.audit import AuditThresholds

    try:
        return AuditThresholds.model_validate(config.audit)
    except ValidationError as exc:
        problems = "; ".join(f"audit.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config: {problems}", source) from exc


def audit_item(sr: SpatialImage, lr: SpatialImage, scale: Sequence[int], spec: Any, module: Any,
               info: dict[str, Any], out_dir: str | Path) -> tuple[dict[str, Path], str, list[str]]:
    """The reference-free audit of one enhanced item (``sr`` against its input ``lr``; a checkpoint
    is checked against its own degradation, and re-run under test-time augmentation when the
    settings ask and ``module`` is given): report (HTML + JSON) and risk map written into
    ``out_dir``. Returns the extras (label -> path), the verdict and its reasons."""
    from domainsr.audit import audit_output, write_report, write_risk_map

    th = audit_thresholds(spec.config, spec.source)
    result = audit_output(sr, lr, degradation=consistency_operator(spec.model, scale, lr.channels), thresholds=th,
                          model=module if th.tta != "off" else None,
                          model_info={k: v for k, v in info.items() if k != "path"})
    html, js = write_report(result, out_dir, stem="audit")
    risk_name = risk_label(lr.domain)
    risk = write_risk_map(result, Path(out_dir) / risk_name)
    return {"audit.html": html, "audit.json": js, risk_name: Path(risk)}, result.verdict, list(result.reasons)


def card_degradation(ident: dict[str, Any], scale: Sequence[int]) -> dict[str, Any] | None:
    """The degradation a checkpoint was trained to invert (its card), on ``scale``'s axes (a
    slice-wise card's 2D factors become the volume's), or ``None``. A training mix (``one_of``)
    is audited against its primary (first) operator: the held-out pair and the LR-consistency
    check must use one and the same physics."""
    if ident["kind"] != "checkpoint":
        return None
    from domainsr.models.checkpoints import read_card

    spec = dict(read_card(ident["path"]).degradation) or None
    if spec is not None and "kind" not in spec and isinstance(spec.get("target"), dict):
        spec = dict(spec["target"])  # guided cards: {protocol, target, guide}; the output is the target bands
    if spec is not None:
        from domainsr.degrade import primary_spec

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


def _default_degradation(scale: Sequence[int]) -> dict[str, Any]:
    return {"kind": "gaussian_mean", "scale": list(scale), "sigma": 0.0}


def heldout_audit(reference: str | Path, model: ModelRef, out_dir: str | Path, *, audit: dict[str, Any] | None = None,
                  bands: Sequence[str] | None = None, degradation: dict[str, Any] | None = None, seed: int = 0,
                  domain: str | None = None) -> AuditOutcome:
    """Held-out audit: degrade the real high-resolution ``reference`` (the checkpoint's own
    degradation from its card, else a block mean at the model's scale), enhance it with ``model``
    and with the interpolation baseline, compare both with the reference, and write the report
    (``<stem>.audit.html/.json``) and risk map into ``out_dir``. Returns the paths and headline
    numbers (:class:`~domainsr.audit.AuditOutcome`)."""
    from domainsr.audit import AuditOutcome, area_average, audit_heldout, write_report, write_risk_map
    from domainsr.audit.privacy import public_stem
    from domainsr.degrade import build_degradation
    from domainsr.io import detect_format, read_image

    th = audit_thresholds(EnhanceConfig(name="audit", model=model, audit=audit or {}))
    ident = model_identity(model)
    if ident.get("guided"):
        raise ConfigError(f"the held-out audit of guided model {ident['name']!r} needs its guide bands degraded "
                          "too; it is measured at training time (see its model card)")
    nifti_domain = domain if domain in ("mri", "ct") and detect_format(reference) == "nifti" else None
    raw = read_image(reference, domain=nifti_domain) if nifti_domain else read_image(reference)
    img = input_for(raw, bands, ident)
    module, info = load_model(model, img)
    scale = tuple(int(s) for s in np.broadcast_to(np.asarray(module.scale), (img.spatial_dims,)))
    spec = degradation or card_degradation(ident, scale) or _default_degradation(scale)
    consistency = noise_free_operator(spec, scale, img.channels) or area_average(scale)
    result = audit_heldout(img, module, build_degradation(spec), scale=scale, consistency=consistency,
                           thresholds=th, seed=seed, model_info=info)
    out = Path(out_dir)
    stem = public_stem(reference, img.domain)
    html, js = write_report(result, out, stem=f"{stem}.audit")
    risk = write_risk_map(result, out / f"{stem}.{risk_label(img.domain)}")
    table = None if result.metrics.reference is None else result.metrics.reference.per_metric
    return AuditOutcome(verdict=result.verdict, reasons=list(result.reasons), html=str(html), json_path=str(js),
                        risk_map=str(risk), model=info["name"], scale=list(scale), domain=img.domain,
                        psnr=None if table is None else table.psnr.means(),
                        ssim=None if table is None else table.ssim.means(), regions=len(result.regions))


def output_audit(sr: str | Path, lr: str | Path, out_dir: str | Path, *, reference: str | Path | None = None,
                 audit: dict[str, Any] | None = None, bands: Sequence[str] | None = None) -> AuditOutcome:
    """Audit a super-resolved file made by any tool against its low-resolution input (and a
    high-resolution reference when there is one); writes the report and risk map into ``out_dir``."""
    from domainsr.audit import AuditOutcome, AuditThresholds, audit_output, write_report, write_risk_map
    from domainsr.audit.privacy import public_stem
    from domainsr.io import read_image

    th = AuditThresholds.model_validate(audit or {})
    sr_img = select_input(read_image(sr), bands)
    lr_img = select_input(read_image(lr), bands)
    ref_img = select_input(read_image(reference), bands) if reference is not None else None
    result = audit_output(sr_img, lr_img, ref_img, thresholds=th)
    out = Path(out_dir)
    stem = public_stem(sr, sr_img.domain)
    html, js = write_report(result, out, stem=f"{stem}.audit")
    risk = write_risk_map(result, out / f"{stem}.{risk_label(sr_img.domain)}")
    reference_metrics = result.metrics.reference
    return AuditOutcome(verdict=result.verdict, reasons=list(result.reasons), html=str(html), json_path=str(js),
                        risk_map=str(risk), regions=len(result.regions),
                        psnr=None if reference_metrics is None else reference_metrics.per_metric.psnr.means())
