"""The audit of an SR image against its LR input (and a reference when there is one): the
third-party output protocol, which the held-out protocol (``heldout``: degrade a real reference,
enhance, compare) ends in.

Both end in :class:`AuditResult`: metrics of the model and of the interpolation baseline (and the
gain), per-pixel class and risk maps, region flags with world coordinates, and an overall verdict.
``AuditResult.summary()`` is the typed JSON report (:class:`~domainsr.audit.results.AuditSummary`);
``report.write_report(result, out_dir)`` writes it with one HTML file.

Reference-based risk (held-out): :func:`~domainsr.audit.hallucination.correctness_maps` of SR vs
the baseline and the reference on the SR grid. Reference-free risk (production): the same rule on
the LR grid against the LR input, after re-degrading SR and baseline with the noise-free
degradation (LR consistency), localised on the SR grid to the pixels whose additions carry the
inconsistency; plus, when the model is at hand, the spread of its answers under test-time
augmentation (or across an ensemble). Where they agree (at least half of an LR-inconsistent
region is also unstable) the region is escalated one verdict level and ranked first; a region that
is only unstable is a ``review``.
"""
from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from domainsr.audit import hallucination as hal
from domainsr.audit import metrics as mt
from domainsr.audit.noise import RULE as NOISE_RULE
from domainsr.audit.noise import estimate_noise
from domainsr.audit.operators import Degrader, area_average, as_enhancer, interpolation_enhancer
from domainsr.audit.privacy import public_provenance
from domainsr.audit.results import (
    VERDICT_ORDER,
    AuditMetrics,
    AuditSummary,
    Fractions,
    Grid,
    LRConsistencyMetrics,
    MetricGain,
    NoiseReport,
    ReferenceMetrics,
    ReferenceTable,
    Region,
    UncertaintyReport,
    Verdict,
    escalate,
    worst,
)
from domainsr.audit.settings import RULE_TEXT, AuditThresholds
from domainsr.audit.uncertainty import Enhancer, ensemble_uncertainty, tta_uncertainty
from domainsr.audit.uncertainty import unstable as unstable_pixels
from domainsr.errors import ConfigError, GeometryError, InputError
from domainsr.image import Geometry, SpatialImage, now_iso
from domainsr.io.nifti import risk_map_meta

Array = np.ndarray


@dataclass
class AuditResult:
    """Everything an audit found; arrays are on the SR grid unless named ``*_lr``."""

    mode: Literal["held-out", "output"]
    lr: SpatialImage
    sr: SpatialImage
    baseline: SpatialImage
    reference: SpatialImage | None
    scale: tuple[int, ...]
    mask: Array
    classes: Array | None  # reference-based class map (uint8) or None
    risk: Array  # the risk the regions came from (float32)
    lr_residual: Array  # |D(SR) - LR| / sigma_lr, max over bands, on the SR grid
    lr_classes: Array  # LR-consistency class map, upsampled to the SR grid
    uncertainty: Array | None  # local RMS TTA spread / sigma_lr, max over bands
    regions: list[Region]
    metrics: AuditMetrics
    noise: NoiseReport
    fractions: Fractions
    verdict: Verdict
    reasons: list[str]
    thresholds: AuditThresholds
    min_region_size: int
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> AuditSummary:
        """The machine-readable report (the JSON file): every number the HTML shows."""
        return AuditSummary(
            created=now_iso(), mode=self.mode, verdict=self.verdict, reasons=self.reasons, domain=self.sr.domain,
            bands=list(self.sr.band_names), units=self.sr.units, scale=list(self.scale),
            grid=Grid(lr_shape=list(self.lr.spatial_shape), sr_shape=list(self.sr.spatial_shape),
                      valid_fraction=float(self.mask.mean())),
            metrics=self.metrics, fractions=self.fractions, noise=self.noise, regions=self.regions,
            thresholds=self.thresholds, min_region_size=self.min_region_size, rule=RULE_TEXT, model=self.model,
            provenance=self.provenance, warnings=self.warnings,
            timings_s={k: round(v, 3) for k, v in self.timings.items()})


# ---------------------------------------------------------------------------------------------
# steps


def _scale_of(lr_shape: Sequence[int], sr_shape: Sequence[int], label: str | None) -> tuple[int, ...]:
    if len(lr_shape) != len(sr_shape):
        raise GeometryError(f"SR has {len(sr_shape)} spatial axes but LR has {len(lr_shape)}", label)
    scale = []
    for a, b in zip(lr_shape, sr_shape):
        if b % a:
            raise GeometryError(f"SR grid {tuple(sr_shape)} is not a whole multiple of the LR grid "
                                f"{tuple(lr_shape)}", label)
        scale.append(b // a)
    return tuple(scale)


def _check_inputs(sr: SpatialImage, lr: SpatialImage, reference: SpatialImage | None
                  ) -> tuple[tuple[int, ...], Geometry, list[str]]:
    """The scale and the SR grid (LR-derived), with warnings; InputError/GeometryError on a mismatch."""
    warnings: list[str] = []
    label = sr.source or None
    if sr.domain != lr.domain:
        raise InputError(f"SR is a {sr.domain} image but LR is {lr.domain}", label)
    if sr.channels != lr.channels:
        raise InputError(f"SR has {sr.channels} bands but LR has {lr.channels}", label)
    scale = _scale_of(lr.spatial_shape, sr.spatial_shape, label)
    grid = lr.geometry.scaled(scale)
    if not grid.almost_equal(sr.geometry, atol=1e-3 * float(min(grid.spacing))):
        warnings.append("the SR file's geometry differs from the LR grid scaled by "
                        f"{list(scale)}; the audit uses the LR-derived grid")
    if reference is not None:
        if reference.spatial_shape != sr.spatial_shape or reference.channels != sr.channels:
            raise InputError(f"reference {reference.data.shape} does not match SR {sr.data.shape}",
                             reference.source or None)
        if not reference.geometry.almost_equal(grid, atol=1e-3 * float(min(grid.spacing))):
            warnings.append("the reference's geometry differs from the SR grid")
    return scale, grid, warnings


def _valid(img: SpatialImage) -> Array:
    ok = img.valid_mask().copy()
    if img.data.dtype.kind == "f":
        ok &= np.all(np.isfinite(img.data), axis=0)
    return ok


def _noise(img: SpatialImage, mask: Array, th: AuditThresholds) -> Array:
    if th.noise_method == "fixed":
        sig = np.asarray(th.noise_sigma, np.float64)
        if sig.size not in (1, img.channels):
            raise ConfigError(f"noise_sigma has {sig.size} values for {img.channels} bands")
        return np.broadcast_to(sig, (img.channels,)).copy()
    return estimate_noise(img.data, mask)


def _reference_metrics(sr: Array, base: Array, ref: Array, mask: Array, scale: Sequence[int],
                       spacing: Sequence[float], bands: Sequence[str]) -> ReferenceMetrics:
    rng = mt.data_range(ref, mask)
    both = mt.reference_metrics({"model": sr, "baseline": base}, ref, mask, scale=scale, spacing=spacing,
                                data_range_=rng)
    m, b = both["model"], both["baseline"]  # metric -> per-band list or number
    gains = {name: MetricGain.compare(m[name], b[name], mt.HIGHER_IS_BETTER[name]) for name in m}  # type: ignore[arg-type]
    return ReferenceMetrics(data_range=rng.tolist(), bands=list(bands), per_metric=ReferenceTable(**gains))


def _lr_metrics(d_sr: Array, d_base: Array, lr: Array, mask: Array, sigma_lr: Array) -> LRConsistencyMetrics:
    rng = mt.data_range(lr, mask)

    def psnr(x: Array) -> list[float]:
        return mt.psnr(x, lr, mask, rng).tolist()

    def rmse_sigma(x: Array) -> list[float]:
        return (np.sqrt(mt.mse(x, lr, mask)) / np.maximum(sigma_lr, 1e-12)).tolist()

    return LRConsistencyMetrics(
        lr_psnr=MetricGain.compare(psnr(d_sr), psnr(d_base), mt.HIGHER_IS_BETTER["lr_psnr"]),
        lr_rmse_sigma=MetricGain.compare(rmse_sigma(d_sr), rmse_sigma(d_base), mt.HIGHER_IS_BETTER["lr_rmse_sigma"]))


def _uncertainty(model: Any, ensemble: Sequence[Any], lr: SpatialImage, scale: tuple[int, ...],
                 th: AuditThresholds, sigma_lr: Array, mask: Array, z: float
                 ) -> tuple[Array | None, Array, UncertaintyReport]:
    """The uncertainty map (local spread / sigma_lr), its unstable pixels, and how it was made:
    the ensemble's spread, else the model's under test-time augmentation, else none."""
    if ensemble:
        members = [as_enhancer(m) for m in ([model] if model is not None else []) + list(ensemble)]
        _, std = ensemble_uncertainty(members, lr)
        info = UncertaintyReport(method="ensemble", members=len(members))
    elif model is not None and th.tta != "off":
        _, std, names = tta_uncertainty(as_enhancer(model), lr, scale, th.tta, th.tta_max)
        info = UncertaintyReport(method=f"tta-{th.tta}", augmentations=names)
    else:
        return None, np.zeros_like(mask), UncertaintyReport()
    uncertainty, unstable = unstable_pixels(std, sigma_lr, mask, hal.window_sigma(scale), z)
    info.unstable_fraction = float(unstable[mask].mean())
    return uncertainty, unstable, info


def _rank_with_uncertainty(inconsistent: list[Region], unstable_only: list[Region]) -> list[Region]:
    """LR-inconsistent regions that are mostly unstable too are escalated (``agreement``); all are
    ranked worst first, agreeing ones first within a verdict, and renumbered."""
    agreed = [r.model_copy(update={"verdict": escalate(r.verdict),
                                   "evidence": r.evidence.model_copy(update={"agreement": True})})
              if (r.evidence.unstable or 0.0) >= 0.5 else r for r in inconsistent]
    ranked = sorted(agreed + unstable_only, key=lambda r: (-VERDICT_ORDER[r.verdict], -bool(r.evidence.agreement),
                                                           -r.peak_risk))
    return [r.model_copy(update={"id": i + 1}) for i, r in enumerate(ranked)]


def _decide(regions: Sequence[Region], reference: ReferenceMetrics | None, th: AuditThresholds
            ) -> tuple[Verdict, list[str]]:
    """The overall verdict and its reasons: the worst region, and (held-out) a PSNR gain below
    ``min_gain_db`` is a review."""
    reasons: list[str] = []
    verdict = worst(r.verdict for r in regions)
    n_bad = sum(r.verdict != "pass" for r in regions)
    if n_bad:
        reasons.append(f"{n_bad} flagged region(s) need attention (worst: {verdict})")
    gain = float("nan")
    if reference is not None:
        gain = reference.per_metric.psnr.gain_mean if reference.per_metric.psnr.gain_mean is not None else gain
        if gain < th.min_gain_db:
            verdict = worst([verdict, "review"])
            reasons.append(f"mean PSNR gain over {th.baseline} interpolation is {gain:+.2f} dB "
                           f"(< {th.min_gain_db:+.2f} dB)")
    if not reasons:
        head = (f"{len(regions)} minor region(s), all below the review threshold" if regions
                else "no flagged region")
        reasons.append(head + (f"; mean PSNR gain over {th.baseline} interpolation {gain:+.2f} dB"
                               if reference is not None else "; SR is consistent with its LR input"))
    return verdict, reasons


# ---------------------------------------------------------------------------------------------
# the protocols


def audit_output(sr: SpatialImage, lr: SpatialImage, reference: SpatialImage | None = None,
                 degradation: Degrader | None = None, *, thresholds: AuditThresholds | None = None,
                 baseline: Enhancer | None = None, model: Any = None, ensemble: Sequence[Any] = (),
                 model_info: dict[str, Any] | None = None, allow_identifiers: bool = False,
                 mode: Literal["held-out", "output"] = "output") -> AuditResult:
    """Audit a super-resolved image ``sr`` made from ``lr`` (by any tool).

    ``reference``: a high-resolution image on the SR grid (enables the full-reference metrics and
    the reference-based correctness map). ``degradation``: the noise-free HR -> LR operator for
    the LR-consistency check (default: area average). ``model``: the model that made ``sr``
    (torch module or ``SpatialImage -> SpatialImage`` callable), used for the TTA uncertainty;
    ``ensemble``: further checkpoints whose spread is the uncertainty instead.
    """
    th = thresholds or AuditThresholds()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    scale, grid, warnings = _check_inputs(sr, lr, reference)
    label = sr.source or None
    d = len(scale)
    down = degradation or area_average(scale)
    enh_base = baseline or interpolation_enhancer(th.baseline, lr.channels, scale)

    # ---- arrays and masks
    lr_mask = _valid(lr)
    mask = _valid(sr) & hal.upsample_nearest(lr_mask, scale)
    if reference is not None:
        mask &= _valid(reference)
    if not mask.any():
        raise InputError("no valid pixel is shared by the SR, LR (and reference) images", label)
    srd = np.asarray(sr.data, np.float32)
    lrd = np.asarray(lr.data, np.float32)
    refd = None if reference is None else np.asarray(reference.data, np.float32)
    base_img = enh_base(lr)
    based = np.asarray(base_img.data, np.float32)
    timings["baseline"] = time.perf_counter() - t0

    # ---- noise
    sigma_lr = _noise(lr, lr_mask, th)
    noise = NoiseReport(method=th.noise_method, rule=NOISE_RULE if th.noise_method == "mad-haar"
                        else "fixed per-band values from the config", lr_sigma=sigma_lr.tolist())
    sigma_cmp = sigma_lr
    if reference is not None:
        sigma_ref = _noise(reference, mask, th)
        sigma_cmp = np.sqrt(sigma_ref ** 2 + sigma_lr ** 2)
        noise.reference_sigma, noise.comparison_sigma = sigma_ref.tolist(), sigma_cmp.tolist()

    # ---- metrics
    ref_metrics = None
    if refd is not None:
        t = time.perf_counter()
        ref_metrics = _reference_metrics(srd, based, refd, mask, scale, [float(s) for s in sr.geometry.spacing],
                                         sr.band_names)
        timings["metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    d_sr, d_base = down(np.where(mask, srd, based)), down(based)
    lr_ok = lr_mask & (area_average(scale)(mask[None].astype(np.float32))[0] >= 1.0)
    metrics = AuditMetrics(reference=ref_metrics, lr_consistency=_lr_metrics(d_sr, d_base, lrd, lr_ok, sigma_lr))

    # ---- reference-free: LR consistency on the LR grid, localised on the SR grid
    cm_lr = hal.correctness_maps(d_sr, d_base, lrd, sigma_lr, lr_ok, window=(1.0,) * d, alpha=th.alpha)
    z = cm_lr.z
    lr_flag = hal.upsample_nearest(cm_lr.classes == hal.HALLUCINATED, scale)
    e_up = hal.upsample_nearest(d_sr - lrd, (1, *scale))
    added = (srd - based) / sigma_lr.reshape((-1,) + (1,) * d).astype(np.float32)
    carries = np.any((np.abs(added) > z) & (np.sign(added) == np.sign(e_up)), axis=0)
    lr_flag = hal.refine(lr_flag, lr_flag & carries) & mask
    lr_risk = hal.upsample_nearest(cm_lr.risk, scale)
    resid = np.max(np.abs(d_sr - lrd) / sigma_lr.reshape((-1,) + (1,) * d), axis=0)
    lr_residual = hal.upsample_nearest(np.where(lr_ok, resid, 0).astype(np.float32), scale)
    lr_classes = hal.upsample_nearest(cm_lr.classes, scale)
    timings["lr_consistency"] = time.perf_counter() - t

    # ---- uncertainty (TTA of the model, or the ensemble's spread)
    t = time.perf_counter()
    uncertainty, unstable, noise.uncertainty = _uncertainty(model, ensemble, lr, scale, th, sigma_lr, mask, z)
    if uncertainty is not None:
        timings["uncertainty"] = time.perf_counter() - t

    # ---- regions
    min_size = th.min_region_size or int(np.prod([2 * f for f in scale]))
    evidence: dict[str, Array] = {"lr_inconsistent": lr_flag.astype(np.float32)}
    if uncertainty is not None:
        evidence.update(uncertainty_sigma=uncertainty, unstable=unstable.astype(np.float32))
    find = partial(hal.find_regions, min_size=min_size, geometry=grid, evidence_maps=evidence)
    fractions = Fractions(lr_consistency=cm_lr.fractions())
    classes = None
    if refd is not None:
        t = time.perf_counter()
        cm = hal.correctness_maps(srd, based, refd, sigma_cmp, mask, window=hal.window_sigma(scale), alpha=th.alpha)
        classes, risk = cm.classes, cm.risk
        fractions.reference = cm.fractions()
        regions = find(classes == hal.HALLUCINATED, risk, kind="hallucination", review=th.review_risk,
                       fail=th.fail_risk)
        timings["correctness"] = time.perf_counter() - t
    else:
        risk = np.where(lr_flag, lr_risk, 0).astype(np.float32)
        regions = find(lr_flag, risk, kind="lr-inconsistency", review=th.review_risk, fail=th.fail_risk)
        if uncertainty is not None:
            regions = _rank_with_uncertainty(regions, find(unstable & ~lr_flag, uncertainty, kind="uncertainty",
                                                           review=0.0, fail=np.inf))

    verdict, reasons = _decide(regions, ref_metrics, th)
    timings["total"] = time.perf_counter() - t0
    info = dict(model_info or {})
    card = getattr(model, "card", None)
    if card is not None and hasattr(card, "model_dump"):
        info.setdefault("name", card.name)
        info.setdefault("card", card.model_dump(mode="json"))
    prov = {"lr": public_provenance(lr, allow_identifiers), "sr": public_provenance(sr, allow_identifiers)}
    if reference is not None:
        prov["reference"] = public_provenance(reference, allow_identifiers)
    prov["degradation"] = getattr(degradation, "describe", lambda: None)() if degradation is not None else {
        "name": "area-average", "scale": list(scale)}
    return AuditResult(
        mode=mode, lr=lr, sr=sr.derive(srd, geometry=grid, mask=mask), baseline=base_img, reference=reference,
        scale=scale, mask=mask, classes=classes, risk=risk, lr_residual=lr_residual, lr_classes=lr_classes,
        uncertainty=uncertainty, regions=regions, metrics=metrics, noise=noise, fractions=fractions,
        verdict=verdict, reasons=reasons, thresholds=th, min_region_size=min_size, model=info, provenance=prov,
        warnings=warnings, timings=timings)


def risk_image(result: AuditResult) -> SpatialImage:
    """The risk map (band 1) and class map (band 2: 0 invalid, 1 unchanged, 2 improved, 3 omitted,
    4 hallucinated; LR-consistency classes without a reference) on the SR grid, ready to write as
    NIfTI or GeoTIFF aligned with the output."""
    classes = result.classes if result.classes is not None else result.lr_classes
    data = np.stack([result.risk.astype(np.float32), classes.astype(np.float32)])
    return SpatialImage(data=data, domain=result.sr.domain, geometry=result.sr.geometry,
                        band_names=("risk", "class"), units="", nodata=None, mask=None,
                        provenance={"source": "domainsr audit risk map", "history": []},
                        meta={"storage_dtype": "float32", **risk_map_meta(result.sr)})


def write_risk_map(result: AuditResult, path: Any) -> Any:
    """Write :func:`risk_image` with the writer the path's suffix names (.nii.gz / .tif)."""
    from domainsr.io import write_image

    return write_image(risk_image(result), path)


__all__ = ["AuditResult", "audit_output", "risk_image", "write_risk_map"]
