"""Audits at model level: the audit settings of a run, the reference-free audit of one enhanced
item, and the two stand-alone audits: held-out (a real HR reference degraded, enhanced, compared
with interpolation and the reference) and of an SR file made by any tool (``domainsr audit --sr SR
--lr LR``).

A stand-alone audit writes its files into one folder (the contract of docs/audit.md):
``report.html``, ``report.json`` (:data:`REPORT_STEM`), the risk map ``risk.tif`` /
``risk.nii.gz`` and the exports (``regions.geojson``, ``regions.tif`` / ``regions.nii.gz``,
``risk.dcm``); an enhanced item's audit the same files as its extras (``audit.html``,
``audit.json``, ...: the store names them after the output). The operator the LR-consistency check re-degrades SR with is chosen in
:mod:`domainsr.app.degradation` (``--degradation``); the report records it and why.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from domainsr.app.degradation import (
    AuditOperator,
    DegradationSpec,
    card_degradation,
    choose_operator,
    consistency_operator,
    model_operator,
)
from domainsr.app.inputs import input_for, select_input
from domainsr.app.models import load_model, model_identity
from domainsr.audit.outcome import AuditOutcome
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.degrade import noise_free_operator
from domainsr.errors import ConfigError
from domainsr.image import SpatialImage
from domainsr.io.formats import risk_label

if TYPE_CHECKING:
    from domainsr.audit import AuditResult

#: The stem of a stand-alone audit's report files: ``report.html``, ``report.json``.
REPORT_STEM = "report"
Progress = Callable[[int, int], None]


class AuditRow(AuditOutcome):
    """:class:`~domainsr.audit.AuditOutcome` with what ``domainsr audit`` also shows: the item (its
    report folder in a batch) and the LR-consistency operator used (``spec``, ``why``)."""

    OMIT_NONE = AuditOutcome.OMIT_NONE | {"item", "degradation"}
    item: str | None = None
    degradation: dict[str, str] | None = None


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
               info: dict[str, Any], out_dir: str | Path, progress: Progress | None = None,
               link_stem: str | None = None) -> tuple[dict[str, Path], str, list[str]]:
    """The reference-free audit of one enhanced item (``sr`` against its input ``lr``; a checkpoint
    is checked against its own degradation, and re-run under test-time augmentation when the
    settings ask and ``module`` is given), written into ``out_dir`` as the item's extras:
    ``audit.html``, ``audit.json``, ``risk.*`` and the exports (``regions.*``), which the store names
    ``<output stem>.<label>`` (``link_stem``: that stem, for the report's links). Returns the
    extras (label -> path), the verdict and its reasons."""
    from domainsr.audit import audit_output

    th = audit_thresholds(spec.config, spec.source)
    result = audit_output(sr, lr, degradation=model_operator(spec.model, scale, lr.channels), thresholds=th,
                          model=module if th.tta != "off" else None,
                          model_info={k: v for k, v in info.items() if k != "path"},
                          progress=progress)
    return _item_extras(result, out_dir, link_stem)


def audit_item_files(sr_path: str | Path, lr_path: str | Path, scale: Sequence[int], spec: Any, module: Any,
                     info: dict[str, Any], out_dir: str | Path, *, bands: Sequence[int | str] | None = None,
                     progress: Progress | None = None, link_stem: str | None = None
                     ) -> tuple[dict[str, Path], str, list[str]]:
    """:func:`audit_item` of a raster too large for memory, from the files: the whole scene window
    by window (:func:`~domainsr.audit.audit_files`; bounded memory), the risk map written as it
    goes. ``bands``: the bands of both files to audit (names or indexes, the same in each)."""
    from domainsr.audit.protocol import audit_files

    th = audit_thresholds(spec.config, spec.source)
    channels = len(bands) if bands else _raster_channels(sr_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    risk = out / risk_label("optical")
    tta = th.tta != "off" and th.tta_streamed  # a full tile: see AuditThresholds.tta_streamed
    if th.tta != "off" and not tta:
        th = th.model_copy(update={"tta": "off"})
    result = audit_files(sr_path, lr_path, degradation=model_operator(spec.model, scale, channels), thresholds=th,
                         model=module if tta else None,
                         model_info={k: v for k, v in info.items() if k != "path"}, risk_map_path=risk,
                         progress=progress, bands=bands)
    return _item_extras(result, out_dir, link_stem, risk_map=risk)


def _item_extras(result: AuditResult, out_dir: str | Path, link_stem: str | None, risk_map: Path | None = None
                 ) -> tuple[dict[str, Path], str, list[str]]:
    files = write_audit(result, out_dir, stem="audit", risk_map=risk_map, link_stem=link_stem)
    extras = {"audit.html": files.pop("html"), "audit.json": files.pop("json")}
    return {**extras, **files}, result.verdict, list(result.reasons)


def _raster_channels(path: str | Path) -> int:
    from domainsr.io.raster import raster_info

    return int(raster_info(path)["count"])


def write_audit(result: AuditResult, out_dir: str | Path, *, stem: str = REPORT_STEM, risk_map: Path | None = None,
                derived_series: str | Path | None = None, link_stem: str | None = None) -> dict[str, Path]:
    """Write an audit's files into ``out_dir``: the risk map (``risk.tif`` / ``risk.nii.gz``;
    ``risk_map``: one already written there, window by window), the exports
    (:func:`~domainsr.audit.exports.write_exports`: ``regions.geojson``, the label map ``regions.tif``
    / ``regions.nii.gz``, and ``risk.dcm`` for the DICOM series ``derived_series``), and last the
    report ``<stem>.html`` (linking the others) and ``<stem>.json``. ``link_stem``: the files will be
    renamed ``<link_stem>.<name>`` beside the report (a store's extras), and linked so. Returns
    ``"html"``, ``"json"`` and each other file's name -> path. An export that does not apply is a
    warning in the report (a Parametric Map without a derived series, or a Segmentation, is not)."""
    from domainsr.audit import write_report, write_risk_map
    from domainsr.audit.exports import PARAMETRIC_MAP, SEGMENTATION, write_exports

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    risk = Path(risk_map) if risk_map is not None else Path(write_risk_map(result, out / risk_label(result.sr.domain)))
    exports = write_exports(result, out, risk_map=risk, derived_series=derived_series)
    files: dict[str, Path] = {risk.name: risk, **{Path(p).name: Path(p) for p in exports.values()}}
    for label, why in exports.skipped.items():
        # no Segmentation is no news when no region needs review; a DICOM map off the series' grid
        # is reported once, by the Parametric Map
        if label not in (PARAMETRIC_MAP, SEGMENTATION) or (label == PARAMETRIC_MAP and derived_series is not None):
            result.warnings.append(f"{label} not written: {why}")
    links = {name: f"{link_stem}.{name}" if link_stem else path for name, path in files.items()}
    html, js = write_report(result, out, stem=stem, links=links)
    return {"html": Path(html), "json": Path(js), **files}


def _default_degradation(scale: Sequence[int]) -> dict[str, Any]:
    return {"kind": "gaussian_mean", "scale": list(scale), "sigma": 0.0}


def heldout_audit(reference: str | Path, model: ModelRef, out_dir: str | Path, *, audit: dict[str, Any] | None = None,
                  bands: Sequence[str] | None = None, degradation: dict[str, Any] | None = None, seed: int = 0,
                  domain: str | None = None) -> AuditRow:
    """Held-out audit: degrade the real high-resolution ``reference`` (``degradation``, else the
    checkpoint's own degradation from its card, else a block mean at the model's scale), enhance it
    with ``model`` and with the interpolation baseline, compare both with the reference, and write
    ``report.html``, ``report.json`` and the risk map into ``out_dir``. Returns the paths and
    headline numbers."""
    from domainsr.audit import audit_heldout
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
    card = None if degradation else card_degradation(ident, scale)
    spec = degradation or card or _default_degradation(scale)
    source = "the degradation given" if degradation else f"{ident['name']}'s model card" if card else "a block mean"
    noise_free = noise_free_operator(spec, scale, img.channels)
    consistency = AuditOperator(
        f"card:{ident['name']}" if card and noise_free else "heldout" if noise_free else "area",
        f"held-out: the reference was degraded with {source}; LR consistency is checked with "
        + ("its noise-free form" if noise_free else "the area average (it has no noise-free form)"),
        scale, noise_free, asked="heldout")
    result = audit_heldout(img, module, build_degradation(spec), scale=scale, consistency=consistency,
                           thresholds=th, seed=seed, model_info=info)
    files = write_audit(result, out_dir)
    table = None if result.metrics.reference is None else result.metrics.reference.per_metric
    return AuditRow(verdict=result.verdict, reasons=list(result.reasons), html=str(files["html"]),
                    json_path=str(files["json"]), risk_map=str(files[risk_label(img.domain)]), model=info["name"],
                    scale=list(scale),
                    domain=img.domain, psnr=None if table is None else table.psnr.means(),
                    ssim=None if table is None else table.ssim.means(), regions=len(result.regions),
                    degradation=_said(consistency))


def output_audit(sr: str | Path, lr: str | Path, out_dir: str | Path, *, reference: str | Path | None = None,
                 audit: dict[str, Any] | None = None, bands: Sequence[str] | None = None,
                 degradation: DegradationSpec | str | None = None, progress: Progress | None = None) -> AuditRow:
    """Audit a super-resolved file made by any tool against its low-resolution input (and a
    high-resolution reference when there is one): the LR-consistency check re-degrades SR with the
    operator ``degradation`` names (:func:`~domainsr.app.degradation.choose_operator`; default
    ``auto``). Single-file rasters are audited whole, window by window from the files (bounded
    memory for any size); other images in memory. Writes ``report.html``, ``report.json``, the risk
    map and the exports into ``out_dir`` (an SR that is a DICOM series gets its Parametric Map)."""
    from domainsr.audit import AuditThresholds
    from domainsr.io import detect_format

    th = AuditThresholds.model_validate(audit or {})
    paths = [p for p in (sr, lr, reference) if p is not None]
    if all(detect_format(p) == "raster" for p in paths):
        result, operator = _raster_files_audit(sr, lr, reference, out_dir, th, bands, degradation, progress)
        files = write_audit(result, out_dir, risk_map=Path(out_dir) / risk_label("optical"))
    else:
        result, operator = _in_memory_audit(sr, lr, reference, th, bands, degradation, progress)
        dicom = Path(sr) if detect_format(sr) == "dicom" else None
        files = write_audit(result, out_dir, derived_series=dicom)
    reference_metrics = result.metrics.reference
    return AuditRow(verdict=result.verdict, reasons=list(result.reasons), html=str(files["html"]),
                    json_path=str(files["json"]), risk_map=str(files[risk_label(result.sr.domain)]),
                    regions=len(result.regions), scale=list(result.scale), domain=result.sr.domain,
                    degradation=_said(operator),
                    psnr=None if reference_metrics is None else reference_metrics.per_metric.psnr.means())


def _in_memory_audit(sr: str | Path, lr: str | Path, reference: str | Path | None, th: Any,
                     bands: Sequence[str] | None, degradation: DegradationSpec | str | None,
                     progress: Progress | None) -> tuple[AuditResult, AuditOperator]:
    from domainsr.audit import audit_output
    from domainsr.io import read_image

    sr_img = select_input(read_image(sr), bands)
    lr_img = select_input(read_image(lr), bands)
    ref_img = select_input(read_image(reference), bands) if reference is not None else None
    operator = choose_operator(degradation, sr, pair_scale(sr_img.spatial_shape, lr_img.spatial_shape, sr),
                               sr_img.channels, sr_img.band_names)
    result = audit_output(sr_img, lr_img, ref_img, degradation=operator, thresholds=th,
                          progress=progress)
    return result, operator


def _raster_files_audit(sr: str | Path, lr: str | Path, reference: str | Path | None, out_dir: str | Path, th: Any,
                        bands: Sequence[str] | None, degradation: DegradationSpec | str | None,
                        progress: Progress | None) -> tuple[AuditResult, AuditOperator]:
    from domainsr.audit.protocol import audit_files
    from domainsr.io.raster_read import RasterWindowReader

    with RasterWindowReader(sr, bands) as s, RasterWindowReader(lr, bands) as low:
        scale = pair_scale(s.shape, low.shape, sr)
        channels, names = s.channels, list(s.band_names)
    operator = choose_operator(degradation, sr, scale, channels, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = audit_files(sr, lr, reference, degradation=operator, thresholds=th,
                         risk_map_path=out / risk_label("optical"), progress=progress, bands=bands)
    return result, operator


def pair_scale(sr_shape: Sequence[int], lr_shape: Sequence[int], label: str | Path | None = None) -> tuple[int, ...]:
    """The integer factor per axis from the LR grid to the SR grid (GeometryError naming ``label``
    when SR is not a whole multiple of LR)."""
    from domainsr.errors import GeometryError

    if len(sr_shape) != len(lr_shape) or any(b == 0 or a % b for a, b in zip(sr_shape, lr_shape)):
        raise GeometryError(f"SR grid {tuple(sr_shape)} is not a whole multiple of the LR grid {tuple(lr_shape)}",
                            label)
    return tuple(a // b for a, b in zip(sr_shape, lr_shape))


def _said(op: AuditOperator) -> dict[str, str]:
    return {"spec": op.spec, "why": op.why}


__all__ = ["REPORT_STEM", "AuditRow", "audit_item", "audit_thresholds", "card_degradation", "consistency_operator",
           "heldout_audit", "output_audit", "pair_scale", "write_audit"]
