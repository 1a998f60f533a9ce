"""Typed audit results: what an audit found, as pydantic models that serialise to the JSON report.

:class:`AuditSummary` is the report's JSON file (``to_json``; fields as docs/audit.md describes
them). Its parts: :class:`Grid`, :class:`AuditMetrics` (full-reference :class:`ReferenceMetrics`
and :class:`LRConsistencyMetrics`, each metric a :class:`MetricGain`), :class:`Fractions` of
:class:`ClassFractions`, :class:`NoiseReport` with its :class:`UncertaintyReport`, and the
flagged :class:`Region` list (:class:`RegionEvidence`, world box :class:`MedicalBox` or
:class:`MapBox`). The headline of an audit run outside a batch is in ``outcome``.

One name per quantity: a metric's gain is always *model minus baseline, signed so that positive
means better*; per band it is ``gain``, its band mean ``gain_mean`` (:class:`MetricMeans`).
"""
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    field_serializer,
    field_validator,
    model_serializer,
)

from domainsr.audit.settings import AuditThresholds

Verdict = Literal["pass", "review", "fail"]
VERDICT_ORDER: dict[str, int] = {"pass": 0, "review": 1, "fail": 2}
RegionKind = Literal["hallucination", "omission", "inconsistency", "uncertain"]


def worst(verdicts: Iterable[Verdict]) -> Verdict:
    """The most severe of ``verdicts`` (``pass`` for none)."""
    return max(verdicts, key=VERDICT_ORDER.__getitem__, default="pass")


def verdict_for(peak_risk: float, review: float, fail: float) -> Verdict:
    """The verdict of a region from its peak risk and the review/fail thresholds."""
    return "fail" if peak_risk >= fail else "review" if peak_risk >= review else "pass"


def jsonable(obj: Any) -> Any:
    """Plain JSON data: models dumped by alias, numpy scalars and arrays as Python values,
    non-finite floats as ``None``, paths as strings."""
    if isinstance(obj, BaseModel):
        return jsonable(obj.model_dump(by_alias=True))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    return obj


class Record(BaseModel):
    """A part of the report. Fields named in ``OMIT_NONE`` are left out of the JSON when ``None``
    (the report has no such key then, rather than ``null``); unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    OMIT_NONE: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data = handler(self)
        return {k: v for k, v in data.items() if not (v is None and k in self.OMIT_NONE)}


# ---------------------------------------------------------------------------------------------
# metrics


def _mean(values: Sequence[float]) -> float:
    arr = np.asarray(values, np.float64)
    arr = arr[~np.isnan(arr)]  # an exact band (PSNR = inf) keeps the mean infinite
    return float(arr.mean()) if arr.size else float("nan")


class MetricMeans(Record):
    """A metric's headline numbers: the model's, the baseline's and the gain (band means)."""

    model_mean: float | None = None
    baseline_mean: float | None = None
    gain_mean: float | None = None


class MetricGain(Record):
    """One metric of the model and of the baseline against the same truth, and the gain
    (positive = the model is better): per band (lists, with their means) or one number
    (spectral metrics: SAM, ERGAS)."""

    OMIT_NONE = frozenset({"model_mean", "baseline_mean", "gain_mean"})
    model: list[float] | float
    baseline: list[float] | float
    gain: list[float] | float
    higher_is_better: bool
    model_mean: float | None = None
    baseline_mean: float | None = None
    gain_mean: float | None = None

    @classmethod
    def compare(cls, model: list[float] | float, baseline: list[float] | float, higher_is_better: bool
                ) -> MetricGain:
        """The comparison of the model's and the baseline's values (per band lists or numbers)."""
        sign = 1.0 if higher_is_better else -1.0
        if isinstance(model, list) and isinstance(baseline, list):
            gain = [sign * (m - b) for m, b in zip(model, baseline)]
            return cls(model=model, baseline=baseline, gain=gain, higher_is_better=higher_is_better,
                       model_mean=_mean(model), baseline_mean=_mean(baseline), gain_mean=_mean(gain))
        if isinstance(model, list) or isinstance(baseline, list):
            raise TypeError("a metric is per band for both the model and the baseline, or for neither")
        return cls(model=model, baseline=baseline, gain=sign * (model - baseline), higher_is_better=higher_is_better)

    @property
    def per_band(self) -> bool:
        """Whether the values are per band (lists with their means)."""
        return isinstance(self.model, list)

    def means(self) -> MetricMeans:
        """The headline numbers: the band means, or the single values of a spectral metric."""
        if self.per_band:
            return MetricMeans(model_mean=self.model_mean, baseline_mean=self.baseline_mean, gain_mean=self.gain_mean)
        return MetricMeans.model_validate({"model_mean": self.model, "baseline_mean": self.baseline,
                                           "gain_mean": self.gain})


class MetricSet(Record):
    """Metrics by name (the fields); ``items()`` lists those computed, in report order."""

    def items(self) -> Iterator[tuple[str, MetricGain]]:
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, MetricGain):
                yield name, value


class ReferenceTable(MetricSet):
    """Full-reference metrics on the SR grid; SAM and ERGAS for multispectral data only."""

    OMIT_NONE = frozenset({"sam", "ergas"})
    psnr: MetricGain
    ssim: MetricGain
    hfen: MetricGain
    gradient_error: MetricGain
    sam: MetricGain | None = None
    ergas: MetricGain | None = None


class ReferenceMetrics(Record):
    """Model and baseline against the high-resolution reference, with each band's data range."""

    data_range: list[float]
    bands: list[str]
    per_metric: ReferenceTable


class LRConsistencyMetrics(MetricSet):
    """Re-degraded model and baseline against the LR input (needs no reference)."""

    lr_psnr: MetricGain
    lr_rmse_sigma: MetricGain


class AuditMetrics(Record):
    """``reference`` only when the audit had a high-resolution reference."""

    OMIT_NONE = frozenset({"reference"})
    reference: ReferenceMetrics | None = None
    lr_consistency: LRConsistencyMetrics


# ---------------------------------------------------------------------------------------------
# pixel classes, noise


class ClassFractions(Record):
    """Share of valid pixels per class, and of the pixels where the baseline misses detail."""

    unchanged: float
    improved: float
    omitted: float
    hallucinated: float
    improved_of_detail: float
    omitted_of_detail: float


class Fractions(Record):
    """Pixel classes of the LR-consistency check and, with a reference, of the comparison with it."""

    OMIT_NONE = frozenset({"reference"})
    lr_consistency: ClassFractions
    reference: ClassFractions | None = None

    @property
    def headline(self) -> ClassFractions:
        """The fractions the report shows: against the reference when there is one."""
        return self.reference or self.lr_consistency


class UncertaintyReport(Record):
    """How the uncertainty map was made: ``none``, ``tta-<mode>`` (its augmentations) or
    ``ensemble`` (its member count), and the share of unstable valid pixels."""

    OMIT_NONE = frozenset({"members", "augmentations", "unstable_fraction"})
    method: str = "none"
    members: int | None = None
    augmentations: list[str] | None = None
    unstable_fraction: float | None = None


class NoiseReport(Record):
    """Per-band noise sigma (data units) of the LR input and, with a reference, of the reference
    and of their comparison; the estimator and its rule."""

    OMIT_NONE = frozenset({"reference_sigma", "comparison_sigma"})
    method: str
    rule: str
    lr_sigma: list[float]
    reference_sigma: list[float] | None = None
    comparison_sigma: list[float] | None = None
    uncertainty: UncertaintyReport = Field(default_factory=UncertaintyReport)


# ---------------------------------------------------------------------------------------------
# regions


class MedicalBox(Record):
    """A region's outer box and centroid in RAS+ millimetres."""

    space: Literal["RAS+ mm"] = "RAS+ mm"
    min: list[float]
    max: list[float]
    centroid: list[float]


class MapBox(Record):
    """A region's outer box and centroid in the map CRS, and in longitude/latitude (WGS84) where
    the CRS has a geographic position (``lonlat_centroid`` is ``null`` where it has none)."""

    OMIT_NONE = frozenset({"lonlat_min", "lonlat_max"})
    space: str
    min: list[float]
    max: list[float]
    centroid: list[float]
    lonlat_centroid: list[float] | None
    lonlat_min: list[float] | None = None
    lonlat_max: list[float] | None = None


class RegionEvidence(Record):
    """Evidence inside a region: means of the maps (fractions in [0, 1], spread in noise sigma),
    the peak spread (``uncertainty_peak_sigma``), and ``agreement`` when an inconsistency region is
    mostly unstable too (its risk was raised: see ``hallucination.agreed_risk``)."""

    OMIT_NONE = frozenset({"lr_inconsistent", "uncertainty_sigma", "uncertainty_peak_sigma", "unstable",
                           "agreement"})
    lr_inconsistent: float | None = None
    uncertainty_sigma: float | None = None
    uncertainty_peak_sigma: float | None = None
    unstable: float | None = None
    agreement: bool | None = None


class Region(Record):
    """One connected region of risk, located in index and world coordinates (``world`` is ``{}``
    in the JSON for an image without a known geometry). ``score`` is the raw evidence (peak
    relative excess error; peak spread in noise sigma for ``uncertain``); ``peak_risk`` its
    calibrated risk on the one scale of every kind, which alone sets the verdict."""

    model_config = ConfigDict(validate_assignment=True)
    OMIT_NONE = frozenset({"score", "band"})
    id: int
    kind: RegionKind
    size: int = Field(description="pixels / voxels")
    physical_size: float = Field(description="mm² / mm³ or map units²")
    physical_unit: str
    bbox_index: list[list[int]] = Field(description="[start, stop_inclusive] per spatial axis")
    centroid_index: list[float]
    score: float | None = Field(None, description="raw evidence of the region before calibration")
    band: str | None = Field(None, description="the band whose evidence peaks in the region (multi-band images)")
    peak_risk: float
    mean_risk: float
    verdict: Verdict
    world: MedicalBox | MapBox | None = None
    evidence: RegionEvidence = Field(default_factory=RegionEvidence)

    @field_validator("world", mode="before")
    @classmethod
    def _no_world(cls, value: Any) -> Any:
        return None if value == {} else value

    @field_serializer("world", mode="wrap")
    def _world(self, value: MedicalBox | MapBox | None, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        return {} if value is None else handler(value)

    def slices(self) -> tuple[slice, ...]:
        return tuple(slice(a, b + 1) for a, b in self.bbox_index)


# ---------------------------------------------------------------------------------------------
# the report


class Coverage(Record):
    """What an audit covered (written by ``audit.windowed``): the windows it ran over (their cores
    partition the audited box; each was read with ``halo`` more SR pixels per side so every
    per-pixel value equals the whole-image computation), the audited share of the scene, and the
    decimation ``stride`` of the report's arrays (1: full resolution)."""

    OMIT_NONE = frozenset({"box", "noise_sampling"})
    windows: int
    window_shape: list[int] = Field(description="core window, SR pixels per axis")
    halo: list[int] = Field(description="SR pixels per axis read around each core")
    scene_fraction: float = Field(description="audited SR pixels / SR pixels of the scene")
    sr_pixels: int = Field(description="SR pixels audited")
    valid_fraction: float = Field(description="share of the audited SR pixels that are valid")
    stride: int = Field(1, description="decimation of the result's arrays (1: full resolution)")
    box: list[list[int]] | None = Field(None, description="the audited box, [start, stop_inclusive] per axis")
    noise_sampling: str | None = Field(None, description="what the noise sigma was estimated on")


class Grid(Record):
    lr_shape: list[int]
    sr_shape: list[int]
    valid_fraction: float


class ConformalReport(Record):
    """The split-conformal per-pixel error bound of this audit: ``|SR - truth| <= q * u`` with
    probability ``1 - alpha`` per pixel, ``u`` the local scale (``calibration.local_scale``);
    coverage measured on held-out calibration data, and the median bound per band (data units)."""

    alpha: float
    q: float
    coverage_holdout: float | None
    median_bound: list[float]
    bands: list[str]
    scale_rule: str


class AuditSummary(Record):
    """The machine-readable report (the JSON file beside the HTML): every number the HTML shows.
    ``model`` and ``provenance`` are the caller's model record and the inputs' public provenance;
    ``calibration`` what the risk scale was fitted on (``Calibration.describe``), ``conformal``
    the per-pixel error bound."""

    OMIT_NONE = frozenset({"calibration", "conformal", "coverage"})
    domainsr_audit: int = 1
    created: str
    mode: Literal["held-out", "output"]
    verdict: Verdict
    reasons: list[str]
    domain: str
    bands: list[str]
    units: str
    scale: list[int]
    grid: Grid
    metrics: AuditMetrics
    fractions: Fractions
    noise: NoiseReport
    regions: list[Region]
    thresholds: AuditThresholds
    min_region_size: int
    rule: str
    model: dict[str, Any] = Field(default_factory=dict)
    provenance: dict[str, Any] = Field(default_factory=dict)
    warnings: list[str] = Field(default_factory=list)
    timings_s: dict[str, float] = Field(default_factory=dict)
    calibration: dict[str, Any] | None = None
    conformal: ConformalReport | None = None
    coverage: Coverage | None = None

    def to_json(self) -> str:
        """The report's JSON text (non-finite numbers as ``null``)."""
        return json.dumps(jsonable(self), indent=2, allow_nan=False) + "\n"


__all__ = ["VERDICT_ORDER", "AuditMetrics", "AuditSummary", "ClassFractions", "ConformalReport", "Coverage",
           "Fractions", "Grid", "LRConsistencyMetrics", "MapBox", "MedicalBox", "MetricGain", "MetricMeans", "MetricSet",
           "NoiseReport", "ReferenceMetrics", "ReferenceTable", "Region", "RegionEvidence", "RegionKind",
           "UncertaintyReport", "Verdict", "jsonable", "verdict_for", "worst"]
