"""Per-pixel/voxel correctness against the interpolation baseline, risk maps and region flags.

The rule (2D and 3D alike)
--------------------------
Three images on one grid: the *candidate* (the SR output under audit), the *baseline* (plain
interpolation of the same LR input) and the *truth*. With ``d = candidate - baseline`` (what the
model added), ``r = baseline - truth`` (the baseline's error) and ``e = d + r`` (the candidate's
error), each divided by the band's noise sigma, local mean squares are taken with a Gaussian
window ``G`` about one LR pixel wide (sigma = max(1, scale/2) pixels per axis)::

    E2 = G(e^2)    R2 = G(r^2)    excess = E2 - R2 = G(d^2 + 2 d r)

``excess`` is how much more error energy the candidate has than the baseline, in units of the
noise variance. A model that merely adds noise-level texture (``d`` white, unit variance) costs
``excess ~ 1``; that is allowed. Beyond it, ``excess`` fluctuates through the truth's noise in the
cross term ``2 d r`` (variance ``4 sum w^2 G'(d^2)`` for a fixed addition) and, for an addition
that is itself noise-like, through ``d^2`` and ``2 d r`` (variance ``sum w^2 (2 + 4 G'(r^2))``);
``sum w^2`` is 1 / the effective sample count of the window and ``G'`` the window with squared
weights. The spread used covers both: ``s = 2 sqrt(sum w^2 (0.5 + G'(d^2) + G'(r^2)))``.
So, per band:

* **hallucinated**: ``excess - 1 > z s`` and the candidate *adds* structure rather than smoothing
  it away: ``G(d (d + b - mu)) > 0`` with ``mu`` the baseline's local level (a window 3x wider). A
  smoothing model moves ``b`` towards ``mu`` without passing it (``d = -k (b - mu)``,
  ``0 < k <= 1``), which makes the term <= 0: a blurrier model is worse than the baseline too, but
  by omission. ``z`` is the one-sided normal quantile of the per-pixel false-alarm rate ``alpha``
  (default 1e-3 -> z = 3.09). Such a pixel holds structure that is in neither the baseline nor the
  truth, beyond what noise-level texture would cost;
* **improved**: ``-excess > z 2 sqrt(sum w^2 G'(d^2))``: significantly closer to the truth than
  the baseline (the fixed-addition spread);
* **omitted**: the baseline's error is significantly above noise (``R2 > 1 + z sqrt(2 sum w^2)``,
  the chi-square bound for a window of pure noise) but the candidate did not improve on it;
* **unchanged**: none of these (nothing to recover, nothing wrongly added).

A hallucinated region is then shrunk to where its evidence sits: pixels whose own excess
``d (d + 2 r)`` exceeds one noise variance and at least half the window's mean excess (a strong
structure otherwise spreads over the window's reach), with one-pixel gaps closed.

A pixel is hallucinated if any band is, else improved if any band is, else omitted if any band
is. The thresholds are the noise variance and quantiles of the noise's own distribution for the
chosen false-alarm rate, not tuned constants. The baseline run through this rule is clean by
construction (``d = 0``), and so is noise-level texture (tested).

The raw **score** of a hallucinated pixel is the relative excess error
``(sqrt(E2) - sqrt(R2)) / max(sqrt(R2), 1)``: how much larger the candidate's local error is than
the baseline's (or than the noise, where the baseline is within noise). Pixels that are
significantly worse than the baseline but by smoothing (``excess - 1 > z s`` without the "added"
test) are **lost** detail (``CorrectnessMaps.lost``, scored the same way): omission regions;
lost pixels connected to a hallucination (within :func:`merge_reach`) belong to that change and
are not reported as omission.

Regions (:func:`find_regions`, :func:`make_region`, :func:`rank_regions`): connected flagged
pixels; a region's raw ``score`` (its peak) becomes its ``peak_risk`` through the fitted
calibration (:mod:`domainsr.audit.calibration`: risk 1 at the kind's review threshold, 2 at its
fail threshold, one scale for every kind), and the verdict is a function of ``peak_risk`` alone
(``review_risk`` / ``fail_risk`` of :class:`~domainsr.audit.settings.AuditThresholds`). An
inconsistency region that is mostly unstable too gets the quadrature sum of both calibrated risks
(:func:`agreed_risk`); omission and uncertain regions alone stay below ``fail_risk``.

The same rule runs in two places: against the high-resolution reference on the SR grid (held-out
audit), and without a reference on the LR grid, where the truth is the LR input and candidate and
baseline are re-degraded (LR consistency): structure the model added that the LR input does not
support shows up there too.

Size: just over 400 lines because the rule's maps, their band bookkeeping and the region making
share the statistics above; split, the region code would re-derive the rule's conventions.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.stats import norm

from domainsr.audit.calibration import AT_MOST_REVIEW, Calibration, load_calibration
from domainsr.audit.results import (
    ClassFractions,
    MapBox,
    MedicalBox,
    Region,
    RegionEvidence,
    RegionKind,
    verdict_for,
)
from domainsr.audit.settings import AuditThresholds
from domainsr.image import GeoGeometry, Geometry, MedicalGeometry

INVALID, UNCHANGED, IMPROVED, OMITTED, HALLUCINATED = 0, 1, 2, 3, 4
CLASS_NAMES = {INVALID: "invalid", UNCHANGED: "unchanged", IMPROVED: "improved",
               OMITTED: "omitted", HALLUCINATED: "hallucinated"}
_TRUNCATE = 3.0
MEAN_SCALE = 3.0  # the local level that "variation" is measured around: a window 3x wider


def window_sigma(scale: Sequence[float]) -> tuple[float, ...]:
    """Gaussian window (pixels, per axis) about one LR pixel wide on the SR grid."""
    return tuple(max(1.0, 0.5 * float(f)) for f in scale)


def kernel_sq_sum(sigma: Sequence[float]) -> float:
    """``sum w^2`` of scipy's normalised, truncated Gaussian window (= 1 / effective sample count)."""
    total = 1.0
    for s in sigma:
        radius = int(_TRUNCATE * s + 0.5)
        x = np.arange(-radius, radius + 1, dtype=np.float64)
        w = np.exp(-0.5 * (x / s) ** 2)
        w /= w.sum()
        total *= float(np.sum(w * w))
    return total


def smooth(v: np.ndarray, sigma: Sequence[float]) -> np.ndarray:
    return ndi.gaussian_filter(v, sigma, truncate=_TRUNCATE, mode="reflect")


@dataclass
class CorrectnessMaps:
    """Class and risk maps on one grid, with how they were computed."""

    classes: np.ndarray  # uint8 (*spatial): INVALID .. HALLUCINATED
    risk: np.ndarray  # float32 (*spatial): relative excess error where hallucinated, else 0
    excess: np.ndarray  # float32 (*spatial): max over bands of excess / noise variance
    detail: np.ndarray  # float32 (*spatial): max over bands of baseline RMS error / noise sigma
    sigma: np.ndarray  # (C,) noise sigma used per band, in data units
    window: tuple[float, ...]
    z: float
    lost: np.ndarray | None = None  # bool (*spatial): detail the truth has that the candidate lost beyond the baseline
    lost_score: np.ndarray | None = None  # float32 (*spatial): relative excess error where lost, else 0
    risk_band: np.ndarray | None = None  # uint8 (*spatial): the band whose score is ``risk`` (hallucinated pixels)
    lost_band: np.ndarray | None = None  # uint8 (*spatial): the band whose score is ``lost_score``

    def fractions(self) -> ClassFractions:
        """Share of valid pixels in each class, and of the baseline-error ("detail") pixels."""
        valid = self.classes != INVALID
        n = max(int(valid.sum()), 1)
        share = {CLASS_NAMES[k]: float(np.sum(self.classes == k)) / n
                 for k in (UNCHANGED, IMPROVED, OMITTED, HALLUCINATED)}
        m = max(int(np.isin(self.classes, (IMPROVED, OMITTED)).sum()), 1)
        return ClassFractions(**share, improved_of_detail=float(np.sum(self.classes == IMPROVED)) / m,
                              omitted_of_detail=float(np.sum(self.classes == OMITTED)) / m)


def correctness_maps(candidate: np.ndarray, baseline: np.ndarray, truth: np.ndarray,
                     sigma: np.ndarray | Sequence[float], mask: np.ndarray | None = None, *,
                     window: Sequence[float] = (1.0,), alpha: float = 1e-3) -> CorrectnessMaps:
    """Classify every pixel of ``candidate`` against ``baseline`` and ``truth`` (see module doc).

    All three are ``(C, *spatial)`` on the same grid; ``sigma`` is the per-band noise sigma of the
    comparison (data units); ``window`` the Gaussian window sigma per axis (one value = all axes).
    """
    spatial = truth.shape[1:]
    win = tuple(window) if len(tuple(window)) == len(spatial) else (float(window[0]),) * len(spatial)
    valid = np.ones(spatial, bool) if mask is None else np.asarray(mask, bool)
    z = float(norm.isf(alpha))
    ksq = kernel_sq_sum(win)
    win_sq = tuple(s / np.sqrt(2.0) for s in win)  # w^2 is a Gaussian of sigma / sqrt(2)
    win_mean = tuple(MEAN_SCALE * s for s in win)
    detail_bound = 1.0 + z * np.sqrt(2.0 * ksq)
    sig = np.broadcast_to(np.asarray(sigma, np.float64), (truth.shape[0],))
    sig = np.where(sig > 0, sig, 1e-12)

    halluc = np.zeros(spatial, bool)
    core = np.zeros(spatial, bool)
    lost = np.zeros(spatial, bool)
    lost_core = np.zeros(spatial, bool)
    lost_score = np.zeros(spatial, np.float32)
    improved = np.zeros(spatial, bool)
    has_detail = np.zeros(spatial, bool)
    risk = np.zeros(spatial, np.float32)
    risk_band = np.zeros(spatial, np.uint8)
    lost_band = np.zeros(spatial, np.uint8)
    excess_max = np.full(spatial, -np.inf, np.float32)
    detail_max = np.zeros(spatial, np.float32)
    for c in range(truth.shape[0]):
        fill = lambda a: np.where(valid, np.nan_to_num(np.asarray(a, np.float32)), 0.0)
        cand, base, tru = fill(candidate[c]), fill(baseline[c]), fill(truth[c])
        d = (cand - base) / np.float32(sig[c])
        r = (base - tru) / np.float32(sig[c])
        e2 = smooth((d + r) ** 2, win)
        r2 = smooth(r * r, win)
        excess = e2 - r2
        a2 = np.maximum(smooth(d * d, win_sq), 0.0)
        spread = 2.0 * np.sqrt(ksq * (0.5 + a2 + np.maximum(smooth(r * r, win_sq), 0.0)))
        # added, not blurred away: a smoothing model moves the baseline towards its local level
        # mu without passing it (d = -k (b - mu), 0 < k <= 1, so d (d + b - mu) <= 0); anything
        # else adds structure. A blurrier model is worse than the baseline too, but that is omission.
        b = base / np.float32(sig[c])
        added = smooth(d * (d + b - smooth(b, win_mean)), win) > 0
        h = (excess - 1.0 > z * spread) & added
        halluc |= h
        own = d * (d + 2.0 * r)  # this pixel's own excess error
        core |= h & (own > 1.0) & (own >= 0.5 * excess)
        lo = (excess - 1.0 > z * spread) & ~added  # worse than the baseline by smoothing detail away
        lost |= lo
        lost_core |= lo & (own > 1.0) & (own >= 0.5 * excess)
        improved |= -excess > z * 2.0 * np.sqrt(ksq * a2)
        has_detail |= r2 > detail_bound
        rel = (np.sqrt(np.maximum(e2, 0)) - np.sqrt(np.maximum(r2, 0))) / np.maximum(np.sqrt(np.maximum(r2, 0)), 1.0)
        h_rel, lo_rel = np.where(h, rel, 0.0).astype(np.float32), np.where(lo, rel, 0.0).astype(np.float32)
        risk_band[h_rel > risk] = c
        lost_band[lo_rel > lost_score] = c
        risk = np.maximum(risk, h_rel)
        lost_score = np.maximum(lost_score, lo_rel)
        excess_max = np.maximum(excess_max, excess.astype(np.float32))
        detail_max = np.maximum(detail_max, np.sqrt(np.maximum(r2, 0)).astype(np.float32))

    halluc = refine(halluc, core)
    risk = np.where(halluc, risk, 0.0).astype(np.float32)
    lost = refine(lost, lost_core) & ~halluc & valid
    if halluc.any() and lost.any():  # one changed structure: lost pixels joined to a hallucination are its part
        lost &= ~ndi.binary_dilation(halluc, np.ones((3,) * halluc.ndim, bool), merge_reach(win), mask=halluc | lost)
    lost_score = np.where(lost, lost_score, 0.0).astype(np.float32)
    classes = np.full(spatial, UNCHANGED, np.uint8)
    classes[has_detail] = OMITTED
    classes[improved] = IMPROVED
    classes[halluc] = HALLUCINATED
    classes[~valid] = INVALID
    risk[~valid] = 0.0
    return CorrectnessMaps(classes=classes, risk=risk, excess=np.where(valid, excess_max, 0).astype(np.float32),
                           detail=np.where(valid, detail_max, 0).astype(np.float32),
                           sigma=np.asarray(sig, np.float64), window=win, z=z, lost=lost, lost_score=lost_score,
                           risk_band=risk_band, lost_band=lost_band)


def merge_reach(window: Sequence[float]) -> int:
    """Pixels (two LR pixels: 4 window sigmas) over which lost-detail pixels connected to a
    hallucination belong to it (not an omission): where a bright addition crosses a dark
    structure, the pixels it moves towards their local level look like smoothing, but they are the
    same change. A windowed run needs this much more halo for the reference rule."""
    return int(np.ceil(4.0 * max(window)))


def refine(flagged: np.ndarray, core: np.ndarray) -> np.ndarray:
    """Shrink window-smoothed flags to where the evidence sits: ``core`` pixels, with one-pixel
    gaps closed, inside ``flagged``. A strong structure otherwise spreads over the window's reach."""
    if not core.any():
        return core
    structure = ndi.generate_binary_structure(core.ndim, core.ndim)
    return ndi.binary_closing(core, structure=structure, border_value=0) & flagged | core & flagged


def upsample_nearest(arr: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """Repeat each element ``scale[a]`` times along spatial axis ``a`` (LR grid -> SR grid)."""
    out = arr
    for ax, f in enumerate(scale):
        if int(f) != f or f < 1:
            raise ValueError(f"scale factors must be positive integers, got {tuple(scale)}")
        if f > 1:
            out = np.repeat(out, int(f), axis=ax + (arr.ndim - len(scale)))
    return out


# --------------------------------------------------------------------------------------------- regions

def box_iou(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """IoU of two inclusive index boxes ``[[start, stop] per axis]``."""
    inter, va, vb = 1, 1, 1
    for (a0, a1), (b0, b1) in zip(a, b):
        inter *= max(0, min(a1, b1) - max(a0, b0) + 1)
        va *= a1 - a0 + 1
        vb *= b1 - b0 + 1
    return inter / float(va + vb - inter)


def pixel_volume(geometry: Geometry | None, ndim: int) -> tuple[float, str]:
    """Physical size of one pixel/voxel and its unit."""
    if isinstance(geometry, MedicalGeometry):
        sp = geometry.spacing[:ndim]
        return float(np.prod(sp)), "mm³" if ndim == 3 else "mm²"
    if isinstance(geometry, GeoGeometry):
        t = geometry.transform
        unit = str(geometry.crs.linear_units or "unit")
        unit = {"metre": "m", "meter": "m", "metres": "m", "degree": "deg"}.get(unit.lower(), unit)
        return float(abs(t.a * t.e - t.b * t.d)), f"{unit}²"
    return 1.0, "px"


def world_box(geometry: Geometry | None, bbox: Sequence[Sequence[int]],
              centroid: Sequence[float]) -> MedicalBox | MapBox | None:
    """World coordinates of an index box (outer voxel edges) and its centroid.

    Medical: RAS+ mm (``min``/``max`` over the box corners, ``centroid``). Map: CRS coordinates of
    the box's outer edges and the centroid, plus longitude/latitude (WGS84) of the centroid and
    the corners.
    """
    if geometry is None:
        return None
    lo = [b[0] - 0.5 for b in bbox]
    hi = [b[1] + 0.5 for b in bbox]
    corners = np.array(np.meshgrid(*[[a, b] for a, b in zip(lo, hi)], indexing="ij")).reshape(len(bbox), -1).T
    if isinstance(geometry, MedicalGeometry):
        pad = lambda p: np.concatenate([p, np.zeros(p.shape[:-1] + (3 - p.shape[-1],))], -1)
        w = geometry.index_to_world(pad(corners))
        c = geometry.index_to_world(pad(np.asarray(centroid, float)[None]))[0]
        return MedicalBox(min=np.round(w.min(0), 3).tolist(), max=np.round(w.max(0), 3).tolist(),
                          centroid=np.round(c, 3).tolist())
    if isinstance(geometry, GeoGeometry):
        xs, ys = geometry.index_to_world(corners[:, 0], corners[:, 1])
        cx, cy = geometry.index_to_world(np.asarray([centroid[0]]), np.asarray([centroid[1]]))
        box = MapBox(space=geometry.crs.to_string(), min=[round(float(xs.min()), 3), round(float(ys.min()), 3)],
                     max=[round(float(xs.max()), 3), round(float(ys.max()), 3)],
                     centroid=[round(float(cx[0]), 3), round(float(cy[0]), 3)], lonlat_centroid=None)
        from pyproj import Transformer
        from pyproj.exceptions import CRSError, ProjError

        try:
            tr = Transformer.from_crs(geometry.crs.to_wkt(), "EPSG:4326", always_xy=True)
            lon, lat = tr.transform(np.append(xs, cx), np.append(ys, cy))
        except (CRSError, ProjError):  # a local/engineering CRS has no geographic position
            return box
        return box.model_copy(update={
            "lonlat_centroid": [round(float(lon[-1]), 7), round(float(lat[-1]), 7)],
            "lonlat_min": [round(float(np.min(lon[:-1])), 7), round(float(np.min(lat[:-1])), 7)],
            "lonlat_max": [round(float(np.max(lon[:-1])), 7), round(float(np.max(lat[:-1])), 7)]})
    return None


AGREEMENT_FRACTION = 0.5  # an inconsistency region at least this unstable "agrees" with the uncertainty
PEAK_EVIDENCE = frozenset({"uncertainty_peak_sigma"})  # evidence taken as the region's maximum, not its mean


def agreed_risk(inconsistency_risk: float, uncertain_risk: float) -> float:
    """The risk of an inconsistency region that is also unstable: the two calibrated risks added
    in quadrature, ``hypot(r_i, r_u)``. Monotone in both, never below either, so a region where
    both kinds of evidence agree ranks above one with either alone, and its verdict is still the
    one fixed function of its (raised) peak risk."""
    return float(np.hypot(max(inconsistency_risk, 0.0), max(uncertain_risk, 0.0)))


def _capped(kind: str, risk: float, th: AuditThresholds) -> float:
    """Omission/uncertainty alone are at most a review: risk below ``fail_risk`` (by the 1e-4 rounding)."""
    if kind in AT_MOST_REVIEW and risk >= th.fail_risk:
        return max(th.review_risk, round(th.fail_risk - 1e-4, 4))
    return risk


def make_region(*, kind: RegionKind, size: int, bbox: Sequence[Sequence[int]], centroid: Sequence[float],
                peak_score: float, mean_score: float, evidence: Mapping[str, float] | None,
                geometry: Geometry | None, domain: str, thresholds: AuditThresholds | None = None,
                calibration: Calibration | None = None, region_id: int = 0, band: str | None = None) -> Region:
    """One region from its raw evidence: world box and physical size from ``geometry``, the
    calibrated ``peak_risk``/``mean_risk`` of its ``peak_score``/``mean_score`` for ``kind`` in
    ``domain`` (:meth:`~domainsr.audit.calibration.Calibration.risk`), and the verdict as a
    function of the peak risk alone (``thresholds.review_risk`` / ``fail_risk``). ``band``: the
    band whose evidence peaks in the region (multi-band images; ``None`` for one band).

    An ``inconsistency`` region whose ``evidence`` has ``unstable >= AGREEMENT_FRACTION`` and an
    ``uncertainty_peak_sigma`` is raised to :func:`agreed_risk` of its own and that spread's
    calibrated risk (``evidence.agreement``). ``omission`` and ``uncertain`` regions are capped
    below ``fail_risk`` (at most a review).
    """
    cal, th = calibration or load_calibration(), thresholds or AuditThresholds()
    ev = {k: v for k, v in dict(evidence or {}).items() if v is not None}
    peak = cal.risk(kind, peak_score, domain)
    mean = min(cal.risk(kind, mean_score, domain), peak)
    spread = ev.get("uncertainty_peak_sigma")
    if kind == "inconsistency" and spread is not None and float(ev.get("unstable", 0.0)) >= AGREEMENT_FRACTION:
        peak = agreed_risk(peak, cal.risk("uncertain", float(spread), domain))
        ev["agreement"] = True
    peak = _capped(kind, round(peak, 4), th)
    mean = min(_capped(kind, round(mean, 4), th), peak)
    unit_size, unit = pixel_volume(geometry, len(bbox))
    box, cen = [[int(a), int(b)] for a, b in bbox], [round(float(c), 2) for c in centroid]
    return Region(
        id=region_id, kind=kind, size=int(size), physical_size=round(float(size) * unit_size, 4), physical_unit=unit,
        bbox_index=box, centroid_index=cen, score=round(float(peak_score), 4), band=band, peak_risk=peak, mean_risk=mean,
        verdict=verdict_for(peak, th.review_risk, th.fail_risk), world=world_box(geometry, box, cen),
        evidence=RegionEvidence(**{k: (bool(v) if k == "agreement" else round(float(v), 4)) for k, v in ev.items()}))


def rank_regions(regions: Iterable[Region]) -> list[Region]:
    """Regions worst first (peak risk descending; ties: larger first), renumbered from 1."""
    ranked = sorted(regions, key=lambda r: (-r.peak_risk, -r.size, r.bbox_index))
    return [r.model_copy(update={"id": i + 1}) for i, r in enumerate(ranked)]


def find_regions(flagged: np.ndarray, score: np.ndarray, *, kind: RegionKind, min_size: int, domain: str,
                 geometry: Geometry | None = None, thresholds: AuditThresholds | None = None,
                 calibration: Calibration | None = None, evidence_maps: Mapping[str, np.ndarray] | None = None,
                 peak_maps: Mapping[str, np.ndarray] | None = None) -> list[Region]:
    """Connected regions (full connectivity) of ``flagged`` with at least ``min_size`` pixels, made
    by :func:`make_region` and ranked by :func:`rank_regions`.

    ``score`` is the raw evidence map (relative excess error; spread in noise sigma for
    ``uncertain``): a region's ``peak_score``/``mean_score`` are its maximum and mean inside it.
    ``evidence_maps`` are averaged and ``peak_maps`` maximised inside each region, named as the
    fields of :class:`~domainsr.audit.results.RegionEvidence`.
    """
    structure = ndi.generate_binary_structure(flagged.ndim, flagged.ndim)
    labels, n = ndi.label(flagged, structure=structure)
    if n == 0:
        return []
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    objects = ndi.find_objects(labels)
    regions: list[Region] = []
    for lab in range(1, n + 1):
        if sizes[lab] < min_size:
            continue
        sl = objects[lab - 1]
        inside = labels[sl] == lab
        vals = score[sl][inside]
        idx = np.argwhere(inside) + np.array([s.start for s in sl])
        ev = {k: float(v[sl][inside].mean()) for k, v in (evidence_maps or {}).items()}
        ev.update({k: float(v[sl][inside].max()) for k, v in (peak_maps or {}).items()})
        regions.append(make_region(
            kind=kind, size=int(sizes[lab]), bbox=[[int(s.start), int(s.stop - 1)] for s in sl],
            centroid=idx.mean(0).tolist(), peak_score=float(vals.max()), mean_score=float(vals.mean()),
            evidence=ev, geometry=geometry, domain=domain, thresholds=thresholds, calibration=calibration))
    return rank_regions(regions)
