"""The audit protocols: held-out (degrade a real reference, enhance, compare) and third-party
output (audit an SR file made elsewhere, given its LR input and optionally a reference).

Both end in :class:`AuditResult`: metrics of the model and of the interpolation baseline (and the
gain), per-pixel class and risk maps, region flags with world coordinates, and an overall verdict.
``report.write_report(result, out_dir)`` turns it into one HTML file and one JSON file.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from domainsr.audit import hallucination as hal
from domainsr.audit import metrics as mt
from domainsr.audit.noise import RULE as NOISE_RULE
from domainsr.audit.noise import estimate_noise
from domainsr.audit.privacy import public_provenance
from domainsr.audit.uncertainty import Enhancer, tta_uncertainty
from domainsr.audit.uncertainty import unstable as unstable_pixels
from domainsr.errors import ConfigError, GeometryError, InputError
from domainsr.image import MultiResolutionImage, SpatialImage, now_iso
from domainsr.io.nifti import risk_map_meta

Array = np.ndarray
Degrader = Callable[[Array], Array]  # (C, *hr_spatial) -> (C, *lr_spatial), deterministic


class AuditThresholds(BaseModel):
    """Audit settings (``audit:`` in a task config). Unknown keys are errors.

    Pixel decisions use only the data's noise (see ``hallucination``); these numbers set the
    false-alarm rate, what counts as a region, and how bad a region must be to need review or fail.
    """

    model_config = ConfigDict(extra="forbid")

    alpha: float = Field(1e-3, gt=0.0, lt=0.5, description="per-pixel false-alarm rate of the significance tests")
    min_region_size: int | None = Field(
        None, ge=1, description="pixels/voxels on the SR grid; default: 2 LR pixels along every axis")
    review_risk: float = Field(1.0, gt=0.0, description="peak relative excess error that needs review")
    fail_risk: float = Field(4.0, gt=0.0, description="peak relative excess error that fails")
    min_gain_db: float = Field(0.0, description="held-out: mean PSNR gain over the baseline below this is 'review'")
    noise_method: Literal["mad-haar", "fixed"] = "mad-haar"
    noise_sigma: list[float] | None = Field(None, description="per-band noise sigma (data units) for 'fixed'")
    tta: Literal["off", "flips", "dihedral"] = "flips"
    tta_max: int = Field(4, ge=2, le=48, description="augmentations including the identity")
    baseline: Literal["cubic", "linear", "lanczos"] = "cubic"
    max_figure_regions: int = Field(6, ge=0, le=50)

    @model_validator(mode="after")
    def _check(self) -> AuditThresholds:
        if self.fail_risk < self.review_risk:
            raise ValueError("fail_risk must be >= review_risk")
        if self.noise_method == "fixed" and not self.noise_sigma:
            raise ValueError("noise_method 'fixed' needs noise_sigma (one value per band)")
        return self


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
    regions: list[hal.RegionFlag]
    metrics: dict[str, Any]
    noise: dict[str, Any]
    fractions: dict[str, Any]
    verdict: str
    reasons: list[str]
    thresholds: AuditThresholds
    min_region_size: int
    model: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The machine-readable report (the JSON file): every number the HTML shows."""
        return {
            "domainsr_audit": 1,
            "created": now_iso(),
            "mode": self.mode,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "domain": self.sr.domain,
            "bands": list(self.sr.band_names),
            "units": self.sr.units,
            "scale": list(self.scale),
            "grid": {"lr_shape": list(self.lr.spatial_shape), "sr_shape": list(self.sr.spatial_shape),
                     "valid_fraction": float(self.mask.mean())},
            "metrics": self.metrics,
            "fractions": self.fractions,
            "noise": self.noise,
            "regions": [r.to_dict() for r in self.regions],
            "thresholds": self.thresholds.model_dump(),
            "min_region_size": self.min_region_size,
            "rule": RULE_TEXT,
            "model": self.model,
            "provenance": self.provenance,
            "warnings": self.warnings,
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }


RULE_TEXT = (
    "Per band, in units of the noise sigma: d = SR - baseline (what the model added), r = baseline - truth. "
    "Over a Gaussian window about one LR pixel wide, excess = mean((d + r)^2) - mean(r^2): the extra error "
    "energy of SR over the baseline. Noise-level texture costs about 1, so a pixel is hallucinated when "
    "excess - 1 > z(alpha) s, s = 2 sqrt(sum w^2 (0.5 + mean_w2(d^2) + mean_w2(r^2))) being the spread of "
    "the excess that noise causes, and the addition is not a smoothing of the baseline towards its local "
    "level mu (mean_w(d (d + baseline - mu)) > 0); improved when -excess > z 2 sqrt(sum w^2 mean_w2(d^2)); omitted when "
    "the baseline's error is significantly above "
    "noise and was not reduced. Flags are then shrunk to the pixels that carry the excess. "
    "Risk = (RMS error of SR - RMS error of baseline) / max(RMS error of baseline, noise). Truth = the HR "
    "reference (held-out) or the LR input after re-degrading SR and baseline (LR consistency). Regions: "
    "connected flagged pixels >= min_region_size; verdict from the peak risk (review_risk, fail_risk)."
)


# ---------------------------------------------------------------------------------------------
# helpers


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


def area_average(scale: Sequence[int]) -> Degrader:
    """The generic degradation: each LR pixel is the mean of the SR pixels it covers."""
    f = tuple(int(s) for s in scale)

    def down(x: Array) -> Array:
        c, *sp = x.shape
        shape = [c] + [v for s, k in zip(sp, f) for v in (s // k, k)]
        return np.asarray(x, np.float32).reshape(shape).mean(axis=tuple(range(2, 2 + 2 * len(f), 2)))

    return down


def module_enhancer(module: Any) -> Enhancer:
    """Run a torch SR module (registry model or checkpoint ``CardModel``) on a whole image.

    The module's ``scale`` gives the output grid (``geometry.scaled``); a ``prepare`` method (a
    card's per-image normalisation and input checks) is called first.
    """
    import torch

    from domainsr.engine import PatchInferer, enhance_image

    def run(img: SpatialImage) -> SpatialImage:
        # inference mode also for prepare(): after a first run the engine leaves the module's
        # buffers as inference tensors, which may only be updated in inference mode
        with torch.inference_mode():
            if hasattr(module, "prepare"):
                module.prepare(img)
            return enhance_image(img, PatchInferer(module))

    return run


def as_enhancer(model: Any) -> Enhancer:
    """A callable ``SpatialImage -> SpatialImage`` for a torch module or such a callable."""
    try:
        import torch

        if isinstance(model, torch.nn.Module):
            return module_enhancer(model)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if callable(model):
        return model
    raise ConfigError(f"cannot run {type(model).__name__} as a super-resolution model")


def interpolation_enhancer(method: str, channels: int, scale: Sequence[int]) -> Enhancer:
    """The parameter-free baseline, run on the whole image (no tiling needed)."""
    import torch

    from domainsr.models import build_model

    net = build_model(method, spatial_dims=len(scale), in_channels=channels, scale=tuple(scale))

    def run(img: SpatialImage) -> SpatialImage:
        with torch.no_grad():
            out = net(torch.from_numpy(np.asarray(img.data, np.float32))[None])[0].numpy()
        mask = None if img.mask is None else hal.upsample_nearest(img.mask, scale)
        return img.derive(out, geometry=img.geometry.scaled(scale), mask=mask,
                          step={"step": "baseline", "method": method, "scale": list(scale)})

    return run


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


def _mean(values: Any) -> float:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]  # an exact band (PSNR = inf) keeps the mean infinite
    return float(arr.mean()) if arr.size else float("nan")


def _gain(name: str, model: Any, base: Any) -> Any:
    sign = 1.0 if mt.HIGHER_IS_BETTER[name] else -1.0
    if isinstance(model, list):
        return [sign * (m - b) for m, b in zip(model, base)]
    return sign * (model - base)


def _metric_table(sr: Array, base: Array, ref: Array, mask: Array, scale: Sequence[int],
                  spacing: Sequence[float] | None, bands: Sequence[str]) -> dict[str, Any]:
    rng = mt.data_range(ref, mask)
    both = mt.reference_metrics({"model": sr, "baseline": base}, ref, mask, scale=scale, spacing=spacing,
                                data_range_=rng)
    m, b = both["model"], both["baseline"]
    table: dict[str, Any] = {"data_range": rng.tolist(), "bands": list(bands), "per_metric": {}}
    for name in m:
        entry = {"model": m[name], "baseline": b[name], "gain": _gain(name, m[name], b[name]),
                 "higher_is_better": mt.HIGHER_IS_BETTER[name]}
        if isinstance(m[name], list):
            entry.update(model_mean=_mean(m[name]), baseline_mean=_mean(b[name]),
                         gain_mean=_mean(entry["gain"]))
        table["per_metric"][name] = entry
    return table


def _lr_table(d_sr: Array, d_base: Array, lr: Array, mask: Array, sigma_lr: Array) -> dict[str, Any]:
    rng = mt.data_range(lr, mask)
    out: dict[str, Any] = {}
    for name, fn in (("lr_psnr", lambda x: mt.psnr(x, lr, mask, rng)),
                     ("lr_rmse_sigma", lambda x: np.sqrt(mt.mse(x, lr, mask)) / np.maximum(sigma_lr, 1e-12))):
        a, b = fn(d_sr).tolist(), fn(d_base).tolist()
        out[name] = {"model": a, "baseline": b, "gain": _gain(name, a, b), "model_mean": _mean(a),
                     "baseline_mean": _mean(b), "gain_mean": _mean(_gain(name, a, b)),
                     "higher_is_better": mt.HIGHER_IS_BETTER[name]}
    return out


def _spacing(img: SpatialImage) -> list[float]:
    return [float(s) for s in img.geometry.spacing]


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
    base_img = enh_base(lr)
    based = np.asarray(base_img.data, np.float32)
    timings["baseline"] = time.perf_counter() - t0

    # ---- noise
    sigma_lr = _noise(lr, lr_mask, th)
    noise: dict[str, Any] = {"method": th.noise_method, "rule": NOISE_RULE if th.noise_method == "mad-haar"
                             else "fixed per-band values from the config", "lr_sigma": sigma_lr.tolist()}
    if reference is not None:
        sigma_ref = _noise(reference, mask, th)
        sigma_cmp = np.sqrt(sigma_ref ** 2 + sigma_lr ** 2)
        noise.update(reference_sigma=sigma_ref.tolist(), comparison_sigma=sigma_cmp.tolist())

    # ---- metrics
    metrics: dict[str, Any] = {}
    if reference is not None:
        t = time.perf_counter()
        metrics["reference"] = _metric_table(srd, based, np.asarray(reference.data, np.float32), mask, scale,
                                             _spacing(sr), sr.band_names)
        timings["metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    d_sr, d_base = down(np.where(mask, srd, based)), down(based)
    lr_ok = lr_mask & (area_average(scale)(mask[None].astype(np.float32))[0] >= 1.0)
    metrics["lr_consistency"] = _lr_table(d_sr, d_base, lrd, lr_ok, sigma_lr)

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
    uncertainty = None
    unc_info: dict[str, Any] = {"method": "none"}
    t = time.perf_counter()
    win = hal.window_sigma(scale)
    if ensemble:
        from domainsr.audit.uncertainty import ensemble_uncertainty

        members = [as_enhancer(m) for m in ([model] if model is not None else []) + list(ensemble)]
        _, std = ensemble_uncertainty(members, lr)
        unc_info = {"method": "ensemble", "members": len(members)}
    elif model is not None and th.tta != "off":
        _, std, names = tta_uncertainty(as_enhancer(model), lr, scale, th.tta, th.tta_max)
        unc_info = {"method": f"tta-{th.tta}", "augmentations": names}
    unstable = np.zeros_like(mask)
    if unc_info["method"] != "none":
        uncertainty, unstable = unstable_pixels(std, sigma_lr, mask, win, z)
        unc_info["unstable_fraction"] = float(unstable[mask].mean())
        timings["uncertainty"] = time.perf_counter() - t
    noise["uncertainty"] = unc_info

    # ---- regions
    min_size = th.min_region_size or int(np.prod([2 * f for f in scale]))
    evidence: dict[str, Array] = {"lr_inconsistent": lr_flag.astype(np.float32)}
    if uncertainty is not None:
        evidence["uncertainty_sigma"] = uncertainty
        evidence["unstable"] = unstable.astype(np.float32)
    fractions: dict[str, Any] = {"lr_consistency": cm_lr.fractions()}
    classes = None
    if reference is not None:
        t = time.perf_counter()
        cm = hal.correctness_maps(srd, based, np.asarray(reference.data, np.float32), sigma_cmp, mask,
                                  window=win, alpha=th.alpha)
        classes, risk = cm.classes, cm.risk
        fractions["reference"] = cm.fractions()
        regions = hal.find_regions(classes == hal.HALLUCINATED, risk, kind="hallucination", min_size=min_size,
                                   review=th.review_risk, fail=th.fail_risk, geometry=grid,
                                   evidence_maps=evidence)
        timings["correctness"] = time.perf_counter() - t
    else:
        risk = np.where(lr_flag, lr_risk, 0).astype(np.float32)
        regions = hal.find_regions(lr_flag, risk, kind="lr-inconsistency", min_size=min_size,
                                   review=th.review_risk, fail=th.fail_risk, geometry=grid,
                                   evidence_maps=evidence)
        if uncertainty is not None:
            for r in regions:
                if r.evidence.get("unstable", 0.0) >= 0.5:  # most of the region is unstable too
                    r.evidence["agreement"] = True
                    r.verdict = {"pass": "review", "review": "fail", "fail": "fail"}[r.verdict]
            more = hal.find_regions(unstable & ~lr_flag, uncertainty, kind="uncertainty", min_size=min_size,
                                    review=0.0, fail=np.inf, geometry=grid, evidence_maps=evidence)
            regions = sorted(regions + more, key=lambda r: (-hal._ORDER[r.verdict],
                                                            -bool(r.evidence.get("agreement")), -r.peak_risk))
            for i, r in enumerate(regions):
                r.id = i + 1

    # ---- verdict
    reasons: list[str] = []
    verdict = hal.worst([r.verdict for r in regions])
    n_bad = sum(r.verdict != "pass" for r in regions)
    if n_bad:
        reasons.append(f"{n_bad} flagged region(s) need attention (worst: {verdict})")
    if reference is not None:
        gain = metrics["reference"]["per_metric"]["psnr"]["gain_mean"]
        if gain < th.min_gain_db:
            verdict = hal.worst([verdict, "review"])
            reasons.append(f"mean PSNR gain over {th.baseline} interpolation is {gain:+.2f} dB "
                           f"(< {th.min_gain_db:+.2f} dB)")
    if not reasons:
        head = (f"{len(regions)} minor region(s), all below the review threshold" if regions
                else "no flagged region")
        reasons.append(head + (
            f"; mean PSNR gain over {th.baseline} interpolation "
            f"{metrics['reference']['per_metric']['psnr']['gain_mean']:+.2f} dB" if reference is not None
            else "; SR is consistent with its LR input"))
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


def consistency_operator(degradation: Any, scale: Sequence[int]) -> Degrader:
    """The deterministic HR -> LR operator for LR-consistency checks: a domainsr ``Degradation``
    without its noise, else the area average."""
    from domainsr.degrade import build_degradation, noise_free_spec

    spec = degradation.describe() if hasattr(degradation, "describe") else None
    clean = noise_free_spec(spec) if isinstance(spec, dict) and "kind" in spec else None
    if not clean:
        return area_average(scale)

    op = build_degradation(clean)
    rng = np.random.default_rng(0)  # unused by a noise-free operator; the interface wants one

    def down(x: Array) -> Array:
        return np.asarray(op(np.asarray(x, np.float32), rng), np.float32)

    down.describe = lambda: {**clean, "note": "noise-free copy of the held-out degradation"}  # type: ignore[attr-defined]
    return down


def crop_to_multiple(img: SpatialImage, scale: Sequence[int]) -> SpatialImage:
    """The largest leading sub-grid of ``img`` whose shape is a whole multiple of ``scale``."""
    shape = tuple((s // f) * f for s, f in zip(img.spatial_shape, scale))
    if shape == img.spatial_shape:
        return img
    if any(s == 0 for s in shape):
        raise GeometryError(f"image {img.spatial_shape} is smaller than the scale {tuple(scale)}", img.source or None)
    sl = (slice(None),) + tuple(slice(0, s) for s in shape)
    mask = None if img.mask is None else img.mask[sl[1:]]
    return img.derive(img.data[sl], geometry=img.geometry.cropped([0] * len(shape), shape), mask=mask)


def audit_heldout(reference: SpatialImage, model: Any, degradation: Callable[..., Array], *,
                  scale: Sequence[int], consistency: Degrader | None = None,
                  thresholds: AuditThresholds | None = None, baseline: Enhancer | None = None,
                  ensemble: Sequence[Any] = (), model_info: dict[str, Any] | None = None,
                  seed: int = 0, allow_identifiers: bool = False) -> AuditResult:
    """Held-out protocol: degrade the real high-resolution ``reference`` with the domain's
    ``degradation(hr, rng) -> lr``, super-resolve with ``model`` and with the baseline, and compare
    both to the reference. ``consistency`` is the noise-free operator for the LR-consistency check
    (default: :func:`consistency_operator` of ``degradation``)."""
    scale = tuple(int(s) for s in scale)
    ref = crop_to_multiple(reference, scale)
    rng = np.random.default_rng(seed)
    lr_data = np.asarray(degradation(np.asarray(ref.data, np.float32), rng), np.float32)
    lr_grid = ref.geometry.scaled([1.0 / f for f in scale])
    if tuple(lr_data.shape[1:]) != tuple(lr_grid.shape):
        raise GeometryError(f"degradation gave LR {lr_data.shape[1:]} for reference {ref.spatial_shape} at "
                            f"scale {scale}; expected {lr_grid.shape}", ref.source or None)
    lr_mask = None
    if ref.mask is not None:
        lr_mask = area_average(scale)(ref.mask[None].astype(np.float32))[0] >= 1.0
    lr = ref.derive(lr_data, geometry=lr_grid, mask=lr_mask,
                    step={"step": "held-out degradation", "seed": seed,
                          "degradation": getattr(degradation, "describe", lambda: repr(degradation))()})
    sr = as_enhancer(model)(lr)
    down = consistency or consistency_operator(degradation, scale)
    result = audit_output(sr, lr, ref, down, thresholds=thresholds, baseline=baseline, model=model,
                          ensemble=ensemble, model_info=model_info, allow_identifiers=allow_identifiers,
                          mode="held-out")
    result.provenance["held_out"] = {
        "degradation": getattr(degradation, "describe", lambda: repr(degradation))(), "seed": seed,
        "reference_region": {"start": [0] * len(scale), "shape": list(ref.spatial_shape)}}
    return result


def heldout_region(card: Any, reference: SpatialImage | MultiResolutionImage, region: str = "test") -> SpatialImage:
    """The part of ``reference`` a checkpoint never saw in training: its card's ``region`` of the
    spatial split (``training_data.split.regions``), when the card records one for this image's
    grid; else the whole image. Bands are selected as the card names them (also from a
    multi-resolution band set such as a Sentinel-2 folder)."""
    img = reference.select(card.bands) if isinstance(reference, MultiResolutionImage) else reference
    if card.bands and list(img.band_names) != list(card.bands):
        missing = [b for b in card.bands if b not in img.band_names]
        if missing:
            raise InputError(f"reference lacks band(s) {missing} that model {card.name!r} needs", img.source or None)
        idx = [img.band_names.index(b) for b in card.bands]
        img = img.derive(img.data[idx], band_names=tuple(card.bands))
    split = (card.training_data.split if card.training_data is not None else {}) or {}
    bounds = (split.get("regions") or {}).get(region)
    if bounds is None:
        return img
    axis = int(split["axis"])
    start, stop = int(bounds[0]), int(bounds[1])
    if not 0 <= start < stop <= img.spatial_shape[axis]:
        raise InputError(f"the card's {region} region {bounds} does not fit this image's axis {axis} "
                         f"({img.spatial_shape[axis]} px)", img.source or None)
    first = [0] * img.spatial_dims
    first[axis] = start
    shape = list(img.spatial_shape)
    shape[axis] = stop - start
    sl = tuple(slice(a, a + n) for a, n in zip(first, shape))
    mask = None if img.mask is None else img.mask[sl]
    out = img.derive(np.ascontiguousarray(img.data[(slice(None), *sl)]), geometry=img.geometry.cropped(first, shape),
                     mask=mask, step={"step": "held-out region", "region": region, "axis": axis,
                                      "start": start, "stop": stop})
    return out


def audit_checkpoint(reference: SpatialImage | MultiResolutionImage, checkpoint: str, *, region: str = "test",
                     thresholds: AuditThresholds | None = None, seed: int = 0,
                     allow_identifiers: bool = False) -> AuditResult:
    """Held-out audit of a shipped or user checkpoint on a real reference image: its card gives
    the bands, the scale, the degradation and the held-out region (see :func:`heldout_region`)."""
    from domainsr.degrade import build_degradation, primary_spec
    from domainsr.models.checkpoints import load_checkpoint

    model, card = load_checkpoint(checkpoint)
    if card.application != "direct":
        raise ConfigError(f"model {card.name!r} is applied {card.application}; pass its enhancer to "
                          "audit_heldout instead")
    ref = heldout_region(card, reference, region)
    degradation = build_degradation(primary_spec(card.degradation))  # a training mix: its primary
    info = {"name": card.name, "checkpoint": str(checkpoint), "card": card.model_dump(mode="json"),
            "held_out_region": region}
    return audit_heldout(ref, model, degradation, scale=card.scale, thresholds=thresholds, seed=seed,
                         model_info=info, allow_identifiers=allow_identifiers)


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


__all__ = ["AuditResult", "AuditThresholds", "area_average", "as_enhancer", "audit_checkpoint", "audit_heldout",
           "audit_output", "consistency_operator", "crop_to_multiple", "heldout_region", "interpolation_enhancer",
           "module_enhancer", "risk_image", "write_risk_map"]
