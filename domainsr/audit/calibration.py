"""Calibrated risk: every region kind's raw score mapped onto one risk scale, and a conformal
per-pixel error bound, both fitted on honest outputs (``benchmarks/audit_calibrate.py``).

Risk scale. Per domain and kind, a region's raw ``score`` (peak relative excess error for
hallucination / omission / inconsistency; peak spread in noise sigma for uncertain) becomes its
risk by a monotone piecewise-linear map: ``score / review`` below the review threshold, then
``1 + (score - review) / (fail - review)`` (risk 1.0 at ``review``, 2.0 at ``fail``, linear beyond).
A kind without a fail threshold (omission, uncertain: alone at most a review) saturates below 2.0:
``1 + 0.99 (1 - exp(-(score - review) / review))``.

The fit (:func:`fit_thresholds`). On honest outputs (interpolation, iterative back-projection,
shipped models where the truth contradicts the flag) with ``A`` million pixels/voxels audited and
false-alarm region scores ``S``: ``k = floor(rate * A)`` honest review regions are allowed, so the
review threshold is ``(1 + margin)`` times the ``(k+1)``-th largest score (none: the pooled fit of
all domains, else ``floor``); the fail threshold is the larger of ``fail_margin`` times the largest
honest score and twice the review threshold, so honest fails are zero with a margin.

Conformal bound (:func:`conformal_quantile`, :func:`local_scale`). With the truth known, the
nonconformity score of a pixel is ``|SR - truth| / u``; ``q`` is the finite-sample
``ceil((1 - alpha)(n + 1)) / n`` empirical quantile of block-subsampled calibration scores, so that
``|SR - truth| <= q u`` holds for a fraction ``>= 1 - alpha`` of exchangeable new pixels; the
weights of ``u``'s terms are chosen on the calibration data too (the smallest median bound on a
small grid), and the coverage measured on held-out scenes/subjects is stored beside it.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage as ndi

from domainsr.audit.results import ConformalReport

CALIBRATION_FILE = Path(__file__).with_name("calibration.json")
KINDS = ("hallucination", "omission", "inconsistency", "uncertain")
AT_MOST_REVIEW = ("omission", "uncertain")
SCALE_RULE = ("u = sqrt(sigma^2 + a G(d^2) + b G(e^2) + c G(h^2)) per band: sigma the LR noise, d = SR - baseline, "
              "e = the LR residual D(SR) - LR upsampled, h = baseline - G3(baseline) (the local detail), G a Gaussian "
              "mean about one LR pixel wide, G3 three times wider; weights (a, b, c) fitted per domain on calibration "
              "data (the smallest median bound), default 1")
SCALE_TERMS = 4  # sigma^2, G(d^2), G(e^2), G(h^2)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class KindThresholds(Strict):
    """Raw-score thresholds of one region kind: ``review`` -> risk 1.0, ``fail`` -> risk 2.0
    (``None``: this kind alone never fails)."""

    review: float = Field(gt=0)
    fail: float | None = None

    @model_validator(mode="after")
    def _order(self) -> KindThresholds:
        if self.fail is not None and not self.fail > self.review:
            raise ValueError(f"fail threshold {self.fail} must exceed the review threshold {self.review}")
        return self


class RateStats(Strict):
    """Honest false alarms of one kind on one part of the corpus: regions at risk >= 1 (review or
    worse) and >= 2 (fail) per million pixels/voxels audited."""

    area_m: float = Field(description="million pixels/voxels audited")
    items: int
    review_regions: int
    fail_regions: int
    review_per_m: float
    fail_per_m: float


class KindRates(Strict):
    calibration: RateStats | None = None
    holdout: RateStats | None = None


class ConformalBound(Strict):
    """Split-conformal per-pixel error bound ``|SR - truth| <= q * u`` at miscoverage ``alpha``."""

    alpha: float = Field(gt=0, lt=1)
    q: float = Field(gt=0)
    weights: list[float] = Field(default_factory=lambda: [1.0, 1.0, 1.0], min_length=3, max_length=3,
                                 description="(a, b, c) of the local scale (SCALE_RULE)")
    n_calibration: int | None = None
    coverage_calibration: float | None = None
    coverage_holdout: float | None = None
    n_holdout: int | None = None
    coverage_holdout_per_band: list[float] | None = None


class DomainCalibration(Strict):
    unit: str = "Mpx"
    kinds: dict[str, KindThresholds]
    rates: dict[str, KindRates] = Field(default_factory=dict)
    conformal: ConformalBound | None = None
    calibration_items: list[str] = Field(default_factory=list)
    holdout_items: list[str] = Field(default_factory=list)


class Calibration(Strict):
    """The fitted calibration (``calibration.json``): thresholds per domain and kind, the measured
    false-alarm rates, the conformal bound, and what it was fitted on."""

    version: int = 1
    created: str | None = None
    source: str = "calibration.json"
    method: str = ""
    target_review_per_m: float | None = None
    corpus: list[dict[str, Any]] = Field(default_factory=list)
    domains: dict[str, DomainCalibration]

    @model_validator(mode="after")
    def _complete(self) -> Calibration:
        default = self.domains.get("default")
        if default is None:
            raise ValueError("a calibration needs a 'default' domain")
        missing = [k for k in KINDS if k not in default.kinds]
        if missing:
            raise ValueError(f"the default calibration lacks kind(s) {missing}")
        for name, d in self.domains.items():
            odd = [k for k in d.kinds if k not in KINDS]
            if odd:
                raise ValueError(f"domain {name!r}: unknown kind(s) {odd}; expected {KINDS}")
        return self

    def _domain(self, domain: str) -> DomainCalibration:
        return self.domains.get(domain) or self.domains["default"]

    def thresholds(self, kind: str, domain: str) -> KindThresholds:
        """The review/fail score thresholds of ``kind`` in ``domain`` (the default's where unfitted)."""
        if kind not in KINDS:
            raise ValueError(f"unknown region kind {kind!r}; expected one of {KINDS}")
        return self._domain(domain).kinds.get(kind) or self.domains["default"].kinds[kind]

    def risk(self, kind: str, score: float, domain: str) -> float:
        """The calibrated risk of a raw ``score`` (monotone; 1.0 at review, 2.0 at fail)."""
        return float(self.risk_map(kind, np.asarray([score], np.float64), domain)[0])

    def risk_map(self, kind: str, score: np.ndarray, domain: str) -> np.ndarray:
        """:meth:`risk` element-wise for an array of raw scores (float32 out; NaN -> 0)."""
        th = self.thresholds(kind, domain)
        s = np.maximum(np.nan_to_num(np.asarray(score, np.float64)), 0.0)
        below = s / th.review
        if th.fail is None:
            above = 1.0 + 0.99 * (1.0 - np.exp(-(s - th.review) / th.review))
        else:
            above = 1.0 + (s - th.review) / (th.fail - th.review)
        return np.where(s <= th.review, below, above).astype(np.float32)

    def conformal(self, domain: str) -> ConformalBound | None:
        """The conformal bound fitted for ``domain`` (``None`` where none was)."""
        d = self.domains.get(domain)
        return None if d is None else d.conformal

    def describe(self, domain: str) -> dict[str, Any]:
        """What the report states: source and date, the corpus of ``domain``, its thresholds, the
        honest false-alarm rates on calibration and held-out data, and the conformal bound."""
        name = domain if domain in self.domains else "default"
        d = self.domains[name]
        kinds = {k: self.thresholds(k, domain).model_dump() for k in KINDS}
        corpus = [c for c in self.corpus if c.get("domain") in (domain, None)] or self.corpus
        return {"source": self.source, "created": self.created, "domain": name, "unit": d.unit,
                "method": self.method, "target_review_per_m": self.target_review_per_m,
                "corpus": [{k: c[k] for k in ("name", "source", "licence") if k in c} for c in corpus],
                "calibration_items": len(d.calibration_items), "holdout_items": len(d.holdout_items),
                "kinds": kinds, "rates": {k: v.model_dump() for k, v in d.rates.items()},
                "conformal": None if d.conformal is None else d.conformal.model_dump()}


NEUTRAL = Calibration(source="neutral fallback (no calibration.json)", method="unfitted: review at score 1, fail at 2",
                      domains={"default": DomainCalibration(unit="M", kinds={
                          "hallucination": KindThresholds(review=1.0, fail=2.0),
                          "omission": KindThresholds(review=1.0, fail=None),
                          "inconsistency": KindThresholds(review=1.0, fail=2.0),
                          "uncertain": KindThresholds(review=1.0, fail=None)})})


def read_calibration(path: str | Path) -> Calibration:
    """A calibration file; ValueError naming the file when it is not one."""
    from pydantic import ValidationError

    p = Path(path)
    try:
        return Calibration.model_validate(json.loads(p.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, ValidationError, UnicodeDecodeError) as exc:
        raise ValueError(f"{p}: not a valid audit calibration: {exc}") from exc


@lru_cache(maxsize=1)
def load_calibration() -> Calibration:
    """The committed calibration (``calibration.json``), else the neutral fallback."""
    return read_calibration(CALIBRATION_FILE) if CALIBRATION_FILE.exists() else NEUTRAL


# ---------------------------------------------------------------------------------------------
# fitting


def fit_thresholds(honest_scores: Sequence[float], area_m: float, *, rate: float, at_most_review: bool,
                   margin: float = 0.05, fail_margin: float = 1.5, fallback: KindThresholds | None = None,
                   floor: float = 1.0) -> KindThresholds:
    """Review/fail thresholds from the peak scores of honest false-alarm regions on ``area_m``
    million pixels/voxels, for at most ``rate`` honest review regions per million (module doc)."""
    s = np.sort(np.asarray([x for x in honest_scores if np.isfinite(x)], np.float64))[::-1]
    k = math.floor(rate * area_m)
    if s.size > k:
        review = float(s[k]) * (1.0 + margin)
    else:
        review = fallback.review if fallback is not None else floor
    review = max(review, 1e-6)
    if at_most_review:
        return KindThresholds(review=round(review, 4), fail=None)
    top = float(s[0]) if s.size else review
    fail = max(fail_margin * top, 2.0 * review)
    return KindThresholds(review=round(review, 4), fail=round(fail, 4))


def rate_stats(scores: Sequence[float], risks: Sequence[float], area_m: float, items: int,
               review_risk: float = 1.0, fail_risk: float = 2.0) -> RateStats:
    """Honest regions at review (risk >= ``review_risk``) and fail per million pixels/voxels."""
    r = np.asarray(list(risks), np.float64)
    n_rev, n_fail = int(np.sum(r >= review_risk)), int(np.sum(r >= fail_risk))
    a = max(area_m, 1e-12)
    return RateStats(area_m=round(area_m, 4), items=items, review_regions=n_rev, fail_regions=n_fail,
                     review_per_m=round(n_rev / a, 4), fail_per_m=round(n_fail / a, 4))


def conformal_quantile(scores: np.ndarray, alpha: float) -> float:
    """The split-conformal quantile: the ``ceil((1 - alpha)(n + 1))``-th smallest of ``n`` scores
    (``inf`` when ``n`` is too small for ``alpha``)."""
    s = np.sort(np.asarray(scores, np.float64).ravel())
    n = s.size
    k = math.ceil((1.0 - alpha) * (n + 1))
    return float("inf") if k > n or n == 0 else float(s[k - 1])


def block_sample(spatial: Sequence[int], block: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """One random index per ``block``-sided block of a grid: nearly independent pixels for the
    conformal fit (neighbouring pixels' errors are correlated, not exchangeable)."""
    grids = [np.arange(0, n - block + 1, block) for n in spatial]
    if any(g.size == 0 for g in grids):
        return tuple(np.zeros(0, int) for _ in spatial)
    mesh = np.meshgrid(*grids, indexing="ij")
    return tuple((m.ravel() + rng.integers(0, block, m.size)).astype(int) for m in mesh)


# ---------------------------------------------------------------------------------------------
# the per-pixel scale of the bound


def _inputs(sr: np.ndarray, baseline: np.ndarray, lr_residual_up: np.ndarray, sigma: np.ndarray | Sequence[float],
            window: Sequence[float] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[float, ...]]:
    sr = np.asarray(sr, np.float32)
    base = np.asarray(baseline, np.float32)
    nd = sr.ndim - 1
    win = tuple(window) if window is not None and len(tuple(window)) == nd else (1.0,) * nd
    sig = np.broadcast_to(np.asarray(sigma, np.float32), (sr.shape[0],))
    res = np.broadcast_to(np.asarray(lr_residual_up, np.float32), sr.shape)
    return sr, base, res, sig, win


def _band_terms(sr: np.ndarray, base: np.ndarray, res: np.ndarray, win: tuple[float, ...],
                at: Sequence[np.ndarray] | None = None, need: Sequence[bool] = (True, True, True)
                ) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """``G(d^2), G(e^2), G(h^2)`` of one band (float32, not yet clipped at 0; squares in place), on
    the grid ``at`` only when given (:func:`gaussian_at`), ``None`` where ``need`` says no. The
    detail's wider ``G3`` runs on every pixel: its reach is three times ``G``'s."""
    def g(v: np.ndarray) -> np.ndarray:
        return ndi.gaussian_filter(v, win, mode="reflect") if at is None else gaussian_at(v, win, at)

    b = np.nan_to_num(base)
    t1 = t2 = t3 = None
    if need[0]:
        d = np.nan_to_num(sr) - b
        t1 = g(np.multiply(d, d, out=d))
    if need[1]:
        e = np.nan_to_num(res)
        t2 = g(np.square(e, out=e))
    if need[2]:
        h = b - ndi.gaussian_filter(b, tuple(3.0 * w for w in win), mode="reflect")
        t3 = g(np.multiply(h, h, out=h))
    return t1, t2, t3


def scale_terms(sr: np.ndarray, baseline: np.ndarray, lr_residual_up: np.ndarray,
                sigma: np.ndarray | Sequence[float], window: Sequence[float] | None = None) -> np.ndarray:
    """The terms of the local scale, ``(4, C, *spatial)``: ``sigma^2, G(d^2), G(e^2), G(h^2)``
    (:data:`SCALE_RULE`; data units squared)."""
    sr, base, res, sig, win = _inputs(sr, baseline, lr_residual_up, sigma, window)
    out = np.empty((SCALE_TERMS, *sr.shape), np.float32)
    for c in range(sr.shape[0]):
        out[0, c] = sig[c] ** 2
        out[1, c], out[2, c], out[3, c] = _band_terms(sr[c], base[c], res[c], win)
    return np.maximum(out, 0.0)


def combine_scale(terms: np.ndarray, weights: Sequence[float] | None = None) -> np.ndarray:
    """``u = sqrt(sigma^2 + a G(d^2) + b G(e^2) + c G(h^2))`` from :func:`scale_terms` (axis 0)."""
    a, b, c = (1.0, 1.0, 1.0) if weights is None else (float(w) for w in weights)
    return np.sqrt(terms[0] + a * terms[1] + b * terms[2] + c * terms[3]).astype(np.float32)


def gaussian_at(v: np.ndarray, sigma: Sequence[float], at: Sequence[np.ndarray], truncate: float = 4.0) -> np.ndarray:
    """``ndi.gaussian_filter(v, sigma, mode="reflect", truncate=truncate)`` evaluated on the grid
    ``at`` (indexes per axis) only, ``(len(at[0]), len(at[1]), ...)``: the separable passes run
    axis by axis, each on the grid points of the axes already done, with scipy's weights and its
    reflecting boundary, accumulated in float64 and rounded to float32 after each pass as scipy does
    (equal to the full filter's values there up to the order of the float64 sums)."""
    out = np.asarray(v, np.float32)
    for ax, (s, idx) in enumerate(zip(sigma, at)):
        idx = np.asarray(idx, np.intp)
        r = int(truncate * float(s) + 0.5) if s > 0 else 0
        x = np.arange(-r, r + 1)
        w = np.exp(-0.5 / (float(s) ** 2 if s > 0 else 1.0) * x ** 2)
        w = w / w.sum()
        n = out.shape[ax]
        pos = (idx[:, None] + x) % (2 * n)
        pos = np.where(pos < n, pos, 2 * n - 1 - pos)  # scipy's "reflect": (d c b a | a b c d | d c b a)
        acc = np.zeros(out.shape[:ax] + (idx.size,) + out.shape[ax + 1:])
        for j in range(x.size):
            acc += w[j] * np.take(out, pos[:, j], axis=ax)
        out = acc.astype(np.float32)
    return out


def local_scale(sr: np.ndarray, baseline: np.ndarray, lr_residual_up: np.ndarray, sigma: np.ndarray | Sequence[float],
                window: Sequence[float] | None = None, weights: Sequence[float] | None = None,
                at: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Per-pixel scale ``u`` (data units, ``(C, *spatial)``) that the conformal bound multiplies
    (:data:`SCALE_RULE`). ``lr_residual_up``: ``D(SR) - LR`` on the SR grid (data units, per band);
    ``window``: the Gaussian sigma per spatial axis (default 1 pixel); ``weights``: the fitted
    ``ConformalBound.weights`` (default 1, 1, 1); ``at``: indexes per spatial axis, to compute ``u``
    on that grid only (``(C, len(at[0]), ...)``, the filters evaluated there alone by
    :func:`gaussian_at`; a full Sentinel-2 tile's audit samples one pixel in 225).

    ``combine_scale(scale_terms(...))`` band by band, with the same float32 operations in the same
    order (equal to it), without the ``(4, C, *spatial)`` array of terms and its clipped copy (8x
    the memory of one band); a term whose weight is 0 is not computed (its filters were most of
    the time: ``G3`` is three times wider)."""
    sr, base, res, sig, win = _inputs(sr, baseline, lr_residual_up, sigma, window)
    wts = (1.0, 1.0, 1.0) if weights is None else tuple(float(w) for w in weights)
    grid = sr.shape[1:] if at is None else tuple(len(i) for i in at)
    out = np.empty((sr.shape[0], *grid), np.float32)
    for ch in range(sr.shape[0]):
        t = np.full(grid, max(float(sig[ch]) ** 2, 0.0), np.float32)
        terms = _band_terms(sr[ch], base[ch], res[ch], win, at, [w != 0 for w in wts])
        for w, term in zip(wts, terms):
            if term is not None:
                t += np.maximum(term, 0.0, out=term) * np.float32(w)
        np.sqrt(t, out=out[ch])
    return out


def conformal_report(calibration: Calibration, domain: str, sr: np.ndarray, baseline: np.ndarray,
                     lr_residual_up: np.ndarray, sigma: np.ndarray | Sequence[float], mask: np.ndarray,
                     bands: Sequence[str], window: Sequence[float] | None = None) -> ConformalReport | None:
    """The report's conformal part for one audit: ``alpha``, ``q``, the held-out coverage, and the
    median bound ``q u`` per band over the valid pixels (data units); ``None`` without a fit."""
    cb = calibration.conformal(domain)
    if cb is None:
        return None
    u = local_scale(sr, baseline, lr_residual_up, sigma, window, cb.weights)
    m = np.asarray(mask, bool)
    med = [float(np.median(u[c][m])) * cb.q if m.any() else float("nan") for c in range(u.shape[0])]
    return ConformalReport(alpha=cb.alpha, q=round(cb.q, 4), coverage_holdout=cb.coverage_holdout,
                           median_bound=[round(v, 4) for v in med], bands=list(bands), scale_rule=SCALE_RULE)


__all__ = ["AT_MOST_REVIEW", "CALIBRATION_FILE", "KINDS", "NEUTRAL", "SCALE_RULE", "Calibration", "ConformalBound",
           "DomainCalibration", "KindRates", "KindThresholds", "RateStats", "block_sample", "combine_scale",
           "conformal_quantile", "conformal_report", "fit_thresholds", "gaussian_at", "load_calibration", "local_scale", "rate_stats",
           "read_calibration", "scale_terms"]
