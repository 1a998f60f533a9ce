"""The audit's per-pixel computation run window by window over the SR grid, exactly.

Every audit (in memory: :func:`~domainsr.audit.protocol.audit_output`; rasters on disk:
:func:`audit_files`) runs through :func:`run_audit`:

1. **Global quantities first**: the per-band noise sigma (in memory: the whole image, as
   :func:`~domainsr.audit.noise.estimate_noise`; from files: the MAD pooled over a deterministic grid of
   sampled windows, :func:`~domainsr.audit.noise.estimate_noise_windows`, which is the whole image up to
   4 Mpx), the data ranges and means the metrics need, and the valid share.
2. **Windows**: core windows aligned to whole LR pixels partition the audited box; each is read with a
   halo of :func:`halo_lr` LR pixels per side, the sum of every reach in the chain (the baseline's
   interpolation support, the degrader's kernel measured on impulses, the Gaussian windows of the
   correctness rule incl. its 3x wider mean window, on the LR and the SR grid, the flag refinement,
   the metrics' filters, the conformal scale's windows, the TTA model's receptive radius and the region
   merge distance), so the cropped core equals the whole-image computation exactly. Two windows
   are read and computed at once in threads (:func:`computed`; one, with a model to run) while
   the last is accumulated in order: each window's numbers are the same whichever thread made them.
3. **Accumulators**: metrics as sums over core pixels (:class:`~domainsr.audit.metrics.MetricSums`,
   squared errors for PSNR/ERGAS/LR consistency), class counts, and regions: each window's core flags
   are labelled after a dilation by one LR pixel (flags with a gap of at most one LR pixel merge; size
   and statistics count flagged pixels only), with per-label size, box, centroid sum, peak/mean score
   and evidence; labels that touch across window seams are joined (connected components over the seam
   pairs), and regions made by :func:`~domainsr.audit.hallucination.make_region` and ranked.
4. **Sinks**: the result's arrays at full resolution or as an overview decimated by ``stride`` (block
   max for risk/residual/uncertainty, nearest for classes/mask, block mean for images), and the risk map
   (band 1 risk, band 2 class) written window by window into a COG.

A model without a known receptive radius (a plain callable) cannot be run per window: its TTA spread is
computed once on the whole LR image (in memory only).

Size: over 400 lines because the window plan, the halo arithmetic, the per-window maps and the three
accumulators (metrics, regions, overviews) must agree pixel for pixel; split, each would need the
others' private layout.
"""
from __future__ import annotations

import itertools
import math
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from domainsr.audit import hallucination as hal
from domainsr.audit import metrics as mt
from domainsr.audit.calibration import Calibration, local_scale
from domainsr.audit.operators import Degrader, area_average, degrader_reach, receptive_radius
from domainsr.audit.results import ClassFractions, Coverage, Region
from domainsr.audit.settings import AuditThresholds
from domainsr.audit.uncertainty import augmentations, spread, tta_outputs
from domainsr.audit.uncertainty import unstable as unstable_pixels
from domainsr.errors import InputError
from domainsr.image import Geometry, SpatialImage

Array = np.ndarray
Box = tuple[tuple[int, int], ...]  # [start, stop) per axis
Progress = Callable[[int, int], None]

TRUNCATE = 3.0  # the rule's Gaussian windows (hallucination.smooth)
DEFAULT_WINDOW = {2: 1024, 3: 256}  # core window, SR pixels per axis
OVERVIEW_PIXELS = 4_200_000  # the result's arrays of a file audit stay at or below this
CONFORMAL_SAMPLES = 2_000_000  # per band, for the median conformal bound
WORKERS = 2  # windows computed at once (threads)


def _rad(sigma: float, truncate: float = TRUNCATE) -> int:
    return int(truncate * sigma + 0.5)


def rule_reach(window: Sequence[float]) -> tuple[int, ...]:
    """Pixels the correctness rule reaches per axis for a Gaussian ``window``: the smoothed
    'added' term (its window over the 3x wider mean window) and the flag refinement (closing)."""
    return tuple(_rad(w) + _rad(hal.MEAN_SCALE * w) + 2 for w in window)


def halo_lr(scale: Sequence[int], baseline_r: Sequence[int], degrader_r: Sequence[int], *, reference: bool,
            model_r: Sequence[int] | None) -> tuple[int, ...]:
    """LR pixels per axis to read around a core window so that every per-pixel map of the core
    equals the whole-image computation (see the module doc), plus a margin of one LR pixel."""
    ws = hal.window_sigma(scale)
    out = []
    for a, f in enumerate(scale):
        up = lambda px, f=f: -(-px // f)  # SR pixels -> LR pixels, rounded up
        b, g = int(baseline_r[a]) + 1, int(degrader_r[a]) + 1
        # the LR-grid rule, then on the SR grid the refinement (2 px) and the localising growth (2 LR px)
        lr_rule = rule_reach((1.0,) * len(scale))[a] + g + b + up(2) + 2
        sr_rule = up(rule_reach(ws)[a]) + b if reference else 0
        metrics = up(mt.MetricSums.REACH) + b if reference else 0
        conformal = up(_rad(3.0 * ws[a], 4.0) + _rad(ws[a], 4.0)) + b + g
        unc = up(_rad(ws[a]) + 2) + int(model_r[a]) + 1 if model_r is not None else 0
        out.append(max(lr_rule, sr_rule, metrics, conformal, unc) + 1 + 1)  # + region merge, + margin
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# sources: windows of the inputs


def valid_of(img: SpatialImage) -> Array:
    """Valid pixels of an image: its mask and, for float data, finite in every band."""
    ok = img.valid_mask().copy()
    if img.data.dtype.kind == "f":
        ok &= np.all(np.isfinite(img.data), axis=0)
    return ok


class Source:
    """Windows of one input (``box``: [start, stop) per spatial axis) as small SpatialImages."""

    shape: tuple[int, ...]
    template: SpatialImage

    def image(self, box: Box) -> SpatialImage:  # pragma: no cover - interface
        raise NotImplementedError

    def read(self, box: Box) -> tuple[Array, Array]:
        """``(float32 data (C, *w), valid (*w))`` of ``box``."""
        img = self.image(box)
        return np.asarray(img.data, np.float32), valid_of(img)


class ArraySource(Source):
    """An image in memory."""

    def __init__(self, img: SpatialImage) -> None:
        self.img, self.shape, self.template = img, tuple(img.spatial_shape), img
        self.valid = valid_of(img)

    def image(self, box: Box) -> SpatialImage:
        sl = tuple(slice(a, b) for a, b in box)
        if all(a == 0 and b == s for (a, b), s in zip(box, self.shape)):
            return self.img
        return self.img.derive(self.img.data[(slice(None), *sl)],
                               geometry=self.img.geometry.cropped([a for a, _ in box], [b - a for a, b in box]),
                               mask=None if self.img.mask is None else self.img.mask[sl])

    def read(self, box: Box) -> tuple[Array, Array]:
        sl = tuple(slice(a, b) for a, b in box)
        return np.asarray(self.img.data[(slice(None), *sl)], np.float32), self.valid[sl]


class RasterSource(Source):
    """A raster file read window by window (``RasterWindowReader``)."""

    def __init__(self, path: str | Path, bands: Sequence[int | str] | None, domain: str = "optical") -> None:
        from domainsr.io.raster_read import RasterWindowReader

        self.path, self.bands, self.domain = Path(path), bands, domain
        self.reader = RasterWindowReader(path, bands)
        self.shape = self.reader.shape
        one = self.reader.image(((0, 1), (0, 1)), domain=domain)
        # the whole grid's header with no pixels behind it (a broadcast view of one pixel)
        self.template = one.derive(np.broadcast_to(one.data, (one.channels, *self.shape)),
                                   geometry=self.reader.geometry, mask=None)
        self.template.provenance.pop("window", None)

    def image(self, box: Box) -> SpatialImage:
        return self.reader.image(box, domain=self.domain)

    def close(self) -> None:
        self.reader.close()


# ---------------------------------------------------------------------------------------------
# the setup: everything global


@dataclass
class Setup:
    """The audit's global quantities and operators, shared by all windows (and by crops)."""

    scale: tuple[int, ...]
    grid: Geometry  # the SR grid (LR-derived)
    domain: str
    th: AuditThresholds
    down: Degrader
    baseline: Callable[[SpatialImage], SpatialImage]
    sigma_lr: Array
    sigma_cmp: Array
    lr_range: Array
    ref_range: Array | None
    ref_mean: Array | None
    min_size: int
    calibration: Calibration
    halo: tuple[int, ...]  # LR pixels
    window: tuple[int, ...]  # core, LR pixels
    model: Any = None  # enhancer run per window under TTA (known receptive radius)
    tta_std: Array | None = None  # or its spread computed once on the whole LR image
    uncertainty_method: str = "none"
    augmentation_names: list[str] = field(default_factory=list)
    members: int | None = None
    spacing: tuple[float, ...] = ()
    notes: list[str] = field(default_factory=list)
    bands: list[str] = field(default_factory=list)  # band names: a multi-band region names its band

    @property
    def d(self) -> int:
        return len(self.scale)

    @property
    def reference(self) -> bool:
        return self.ref_range is not None

    @property
    def has_uncertainty(self) -> bool:
        return self.model is not None or self.tta_std is not None


def plan(lr_shape: Sequence[int], scale: Sequence[int], window: int | Sequence[int] | None,
         baseline: Any, down: Degrader, channels: int, model: Any, reference: bool
         ) -> tuple[tuple[int, ...], tuple[int, ...], list[str]]:
    """Core window and halo (LR pixels per axis), and notes.
    An operator of unknown or global reach (k-space truncation, a callable baseline) makes the
    whole image one window."""
    d = len(scale)
    notes: list[str] = []
    win_sr = np.broadcast_to(np.asarray(DEFAULT_WINDOW.get(d, 256) if window is None else window), (d,))
    core = tuple(max(1, int(w) // int(f)) for w, f in zip(win_sr, scale))
    base_r = receptive_radius(baseline, d)
    deg_r = (0,) * d if getattr(down, "is_area_average", False) else degrader_reach(down, scale, channels)
    model_r = None if model is None else receptive_radius(model, d)
    whole = tuple(int(s) for s in lr_shape)
    if base_r is None or deg_r is None:
        notes.append("the baseline or the degradation has no finite reach: the image is one window")
        return whole, (0,) * d, notes
    halo = halo_lr(scale, base_r, deg_r, reference=reference, model_r=model_r)
    core = tuple(min(c, s) for c, s in zip(core, whole))
    return core, halo, notes


def area(scale: Sequence[int]) -> Degrader:
    """The generic degradation (block mean), marked so its reach needs no measuring."""
    op = area_average(scale)
    op.is_area_average = True  # type: ignore[attr-defined]
    return op


# ---------------------------------------------------------------------------------------------
# one window


@dataclass
class Maps:
    """Per-pixel maps of one padded window (SR grid unless ``*_lr``)."""

    mask: Array
    srd: Array
    based: Array
    refd: Array | None
    risk: Array
    lr_residual: Array
    lr_classes: Array
    lr_flag: Array
    lr_score: Array
    lr_band: Array | None = None
    classes: Array | None = None
    hall: Array | None = None
    hall_score: Array | None = None
    hall_band: Array | None = None
    lost: Array | None = None
    lost_score: Array | None = None
    lost_band: Array | None = None
    uncertainty: Array | None = None
    unstable: Array | None = None
    e_up: Array | None = None
    lr_ok: Array | None = None
    lr_cls: Array | None = None
    d_sr: Array | None = None
    d_base: Array | None = None
    lrd: Array | None = None
    kind_risk: dict[str, Array] = field(default_factory=dict)  # per kind; ``risk`` is their maximum


def window_maps(s: Setup, lr_img: SpatialImage, lr_valid: Array, srd: Array, sr_valid: Array,
                refd: Array | None, ref_valid: Array | None, tta_std: Array | None,
                timings: dict[str, float]) -> Maps:
    """The audit's per-pixel computation on one (padded) window; the whole image is one window."""
    t = time.perf_counter()
    scale, d = s.scale, s.d
    lrd = np.asarray(lr_img.data, np.float32)
    lr_usable = lr_valid
    if not lr_valid.all():  # the baseline is defined only where its whole footprint is valid
        lrd = np.where(lr_valid, lrd, 0.0).astype(np.float32)
        lr_img = lr_img.derive(lrd)
        r = receptive_radius(s.baseline, d) or (0,) * d
        lr_usable = ndi.minimum_filter(lr_valid.view(np.uint8), size=tuple(2 * v + 1 for v in r), mode="nearest") > 0
    mask = sr_valid & hal.upsample_nearest(lr_usable, scale)
    if refd is not None and ref_valid is not None:
        mask &= ref_valid
    based = np.asarray(s.baseline(lr_img).data, np.float32)
    _tick(timings, "baseline", t)
    t = time.perf_counter()
    d_sr, d_base = s.down(np.where(mask, srd, based)), s.down(based)
    lr_ok = lr_valid & (area_average(scale)(mask[None].astype(np.float32))[0] >= 1.0)
    cm_lr = hal.correctness_maps(d_sr, d_base, lrd, s.sigma_lr, lr_ok, window=(1.0,) * d, alpha=s.th.alpha)
    z = cm_lr.z
    lr_flag = hal.upsample_nearest(cm_lr.classes == hal.HALLUCINATED, scale)
    e_up = hal.upsample_nearest(d_sr - lrd, (1, *scale))
    sig = s.sigma_lr.reshape((-1,) + (1,) * d).astype(np.float32)
    added = (srd - based) / sig
    same = np.sign(added) == np.sign(e_up)
    carries = np.any((np.abs(added) > z) & same, axis=0)
    lr_flag = localise(lr_flag, carries, np.any((np.abs(added) > 1.0) & same, axis=0), mask, scale)
    lr_score = np.where(lr_flag, hal.upsample_nearest(cm_lr.risk, scale), 0).astype(np.float32)
    resid = np.max(np.abs(d_sr - lrd) / s.sigma_lr.reshape((-1,) + (1,) * d), axis=0)
    maps = Maps(mask=mask, srd=srd, based=based, refd=refd, risk=lr_score, lr_flag=lr_flag, lr_score=lr_score,
                lr_residual=hal.upsample_nearest(np.where(lr_ok, resid, 0).astype(np.float32), scale),
                lr_classes=hal.upsample_nearest(cm_lr.classes, scale), e_up=e_up, lr_ok=lr_ok,
                lr_band=None if cm_lr.risk_band is None else hal.upsample_nearest(cm_lr.risk_band, scale),
                lr_cls=cm_lr.classes, d_sr=d_sr, d_base=d_base, lrd=lrd)
    _tick(timings, "lr_consistency", t)
    if s.has_uncertainty:
        t = time.perf_counter()
        std = tta_std
        if std is None:
            augs = augmentations(d, scale, s.th.tta, s.th.tta_max)
            _, std = spread(tta_outputs(s.model, lr_img, augs))
        maps.uncertainty, maps.unstable = unstable_pixels(std, s.sigma_lr, mask, hal.window_sigma(scale), z)
        _tick(timings, "uncertainty", t)
    if refd is not None:
        t = time.perf_counter()
        cm = hal.correctness_maps(srd, based, refd, s.sigma_cmp, mask, window=hal.window_sigma(scale),
                                  alpha=s.th.alpha)
        maps.classes, maps.hall, maps.hall_score = cm.classes, cm.classes == hal.HALLUCINATED, cm.risk
        maps.lost = cm.lost if cm.lost is not None else np.zeros_like(mask)
        maps.lost_score = cm.lost_score if cm.lost_score is not None else np.zeros(mask.shape, np.float32)
        maps.hall_band, maps.lost_band = cm.risk_band, cm.lost_band
        _tick(timings, "correctness", t)
    maps.kind_risk = kind_risks(s, maps)
    maps.risk = np.maximum.reduce(list(maps.kind_risk.values()))  # the calibrated risk map
    return maps


def localise(lr_flag: Array, carries: Array, adds: Array, mask: Array, scale: Sequence[int]) -> Array:
    """LR-grid flags (upsampled) localised on the SR grid: the pixels that carry the
    inconsistency (the model's addition is significant, ``carries``: beyond z noise sigma with the
    sign of the LR residual), gaps closed, then grown for at most one LR pixel (``max(scale)``
    steps) through the pixels where the addition has that sign and exceeds one noise sigma
    (``adds``) within one LR pixel of the flags: an LR pixel that a structure only partly covers
    is not inconsistent on its own, but the structure's part of it is (hysteresis, as in edge
    detection). The growth is bounded, so the window halo covers it."""
    seed = hal.refine(lr_flag, lr_flag & carries) & mask
    if not seed.any():
        return seed
    full = ndi.generate_binary_structure(seed.ndim, seed.ndim)
    near = ndi.maximum_filter(lr_flag, size=tuple(2 * int(f) + 1 for f in scale), mode="constant", cval=0)
    allowed = (adds & near & mask) | seed
    grown = seed
    for _ in range(max(int(f) for f in scale)):
        grown = ndi.binary_dilation(grown, structure=full) & allowed
    return grown


def kind_flags(m: Maps) -> dict[str, tuple[Array, Array, Array | None]]:
    """Each region kind's flagged pixels, raw score and band map in this window: LR-inconsistent
    pixels always; with a reference hallucinated and lost pixels; without one, the unstable pixels
    that are not inconsistent."""
    out: dict[str, tuple[Array, Array, Array | None]] = {"inconsistency": (m.lr_flag, m.lr_score, m.lr_band)}
    if m.hall is not None and m.hall_score is not None and m.lost is not None and m.lost_score is not None:
        out["hallucination"] = (m.hall, m.hall_score, m.hall_band)
        out["omission"] = (m.lost, m.lost_score, m.lost_band)
    elif m.unstable is not None and m.uncertainty is not None:
        out["uncertain"] = (m.unstable & ~m.lr_flag, m.uncertainty, None)
    return out


def kind_risks(s: Setup, m: Maps) -> dict[str, Array]:
    """The calibrated per-pixel risk of each kind (0 where that kind is not flagged)."""
    return {k: np.where(flag, s.calibration.risk_map(k, score, s.domain), 0).astype(np.float32)
            for k, (flag, score, _) in kind_flags(m).items()}


def _tick(timings: dict[str, float], name: str, t0: float) -> None:
    timings[name] = timings.get(name, 0.0) + time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------
# regions across windows


class RegionAccumulator:
    """Connected regions of one kind's flags across windows (see the module doc).

    ``add`` takes a window's flags, score and evidence maps, valid on the core grown by ``merge``
    pixels on the low side of every axis (the dilation reaches that far); ``regions`` joins the
    labels across seams and makes the regions."""

    def __init__(self, kind: str, box: Box, merge: Sequence[int], evidence: Sequence[str], peaks: Sequence[str]):
        self.kind, self.box, self.merge = kind, box, tuple(int(m) for m in merge)
        self.evidence, self.peaks = list(evidence), list(peaks)
        self.d = len(box)
        self.n = 0
        self.parts: list[dict[str, Array]] = []
        self.seams: dict[tuple[int, int], list[Array]] = {}
        fp = []
        for a, r in enumerate(self.merge):  # output x = max of input [x - r, x]: gaps <= r merge
            shape = [1] * self.d
            shape[a] = 2 * r + 1
            w = np.zeros(shape, bool)
            w[tuple(slice(0, r + 1) if i == a else slice(None) for i in range(self.d))] = True
            fp.append(w)
        self.footprints = fp

    def _slab(self, axis: int, pos: int, side: int) -> Array:
        key = (axis, pos)
        if key not in self.seams:
            shape = [b - a for i, (a, b) in enumerate(self.box) if i != axis]
            self.seams[key] = [np.zeros(shape, np.int64), np.zeros(shape, np.int64)]
        return self.seams[key][side]

    def add(self, flags: Array, score: Array, evidence: dict[str, Array], core: tuple[slice, ...],
            start: Sequence[int], band: Array | None = None) -> None:
        """``flags``/``score``/``evidence`` on the padded window; ``core`` its core (slices in the
        window), ``start`` the core's first pixel in the scene; ``band``: the band of each pixel's
        score (the region keeps the band at its peak)."""
        grown = tuple(slice(max(sl.start - r, 0), sl.stop) for sl, r in zip(core, self.merge))
        dil = flags[grown]
        for fp in self.footprints:
            if fp.size > 1:
                dil = ndi.maximum_filter(dil, footprint=fp, mode="constant", cval=0)
        inner = tuple(slice(c.start - g.start, c.start - g.start + (c.stop - c.start)) for c, g in zip(core, grown))
        lab, n = ndi.label(dil[inner], structure=ndi.generate_binary_structure(self.d, self.d))
        if n == 0:
            return
        fl = flags[core]
        lab_f = np.where(fl, lab, 0)
        ll = lab_f[fl]
        idx = np.arange(1, n + 1)
        size = np.bincount(ll, minlength=n + 1)[1:]
        coords = np.nonzero(fl)
        part: dict[str, Array] = {"size": size.astype(np.int64)}
        part["csum"] = np.stack([np.bincount(ll, weights=c + start[a], minlength=n + 1)[1:]
                                 for a, c in enumerate(coords)], 1)
        lo = np.full((n, self.d), np.iinfo(np.int64).max, np.int64)
        hi = np.full((n, self.d), -1, np.int64)
        for i, sl in enumerate(ndi.find_objects(lab_f, max_label=n)):
            if sl is not None:
                lo[i] = [s.start + start[a] for a, s in enumerate(sl)]
                hi[i] = [s.stop - 1 + start[a] for a, s in enumerate(sl)]
        part["lo"], part["hi"] = lo, hi
        sc = score[core]
        part["peak"] = np.asarray(ndi.maximum(sc, lab_f, idx), np.float64) if fl.any() else np.full(n, -np.inf)
        part["peak"] = np.where(size > 0, part["peak"], -np.inf)
        part["band"] = np.full(n, -1, np.int64)
        if band is not None and fl.any():
            bc = band[core]
            pos = ndi.maximum_position(np.where(fl, sc, -np.inf), lab_f, idx)
            part["band"] = np.asarray([int(bc[p]) if sz > 0 else -1 for p, sz in zip(pos, size)], np.int64)
        part["sum"] = np.bincount(ll, weights=sc[fl], minlength=n + 1)[1:]
        for k in self.evidence:
            part["ev:" + k] = np.bincount(ll, weights=evidence[k][core][fl], minlength=n + 1)[1:]
        for k in self.peaks:
            pk = np.asarray(ndi.maximum(evidence[k][core], lab_f, idx), np.float64) if fl.any() else np.zeros(n)
            part["pk:" + k] = np.where(size > 0, pk, -np.inf)
        self.parts.append(part)
        glab = np.where(lab > 0, lab + self.n, 0)
        for a in range(self.d):
            c0, c1 = start[a], start[a] + lab.shape[a]
            other = tuple(slice(st - b0, st - b0 + lab.shape[i]) for i, (st, (b0, _)) in enumerate(zip(start, self.box))
                          if i != a)
            if c0 > self.box[a][0]:
                self._slab(a, c0, 1)[other] = np.take(glab, 0, axis=a)
            if c1 < self.box[a][1]:
                self._slab(a, c1, 0)[other] = np.take(glab, lab.shape[a] - 1, axis=a)
        self.n += n

    def regions(self, s: Setup) -> list[Region]:
        """The merged regions of at least ``min_size`` flagged pixels (unranked)."""
        if not self.parts:
            return []
        cat = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        rows, cols = [], []
        for lo, hi in self.seams.values():
            for off in itertools.product((-1, 0, 1), repeat=lo.ndim):
                a = lo[tuple(slice(max(0, -o), lo.shape[i] - max(0, o)) for i, o in enumerate(off))]
                b = hi[tuple(slice(max(0, o), hi.shape[i] - max(0, -o)) for i, o in enumerate(off))]
                both = (a > 0) & (b > 0)
                rows.append(a[both] - 1)
                cols.append(b[both] - 1)
        r = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        c = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        graph = coo_matrix((np.ones(r.size, np.int8), (r, c)), shape=(self.n, self.n))
        ncomp, comp = connected_components(graph, directed=False)
        size = np.bincount(comp, weights=cat["size"], minlength=ncomp)
        lo = np.full((ncomp, self.d), np.iinfo(np.int64).max, np.int64)
        hi = np.full((ncomp, self.d), -1, np.int64)
        np.minimum.at(lo, comp, cat["lo"])
        np.maximum.at(hi, comp, cat["hi"])
        peak = np.full(ncomp, -np.inf)
        np.maximum.at(peak, comp, cat["peak"])
        band = np.full(ncomp, -1, np.int64)  # the band of the part holding the component's peak
        order = np.lexsort((cat["peak"], comp))
        last = np.r_[comp[order][1:] != comp[order][:-1], True]
        band[comp[order][last]] = cat["band"][order][last]
        sums = {k: np.bincount(comp, weights=v, minlength=ncomp) for k, v in cat.items()
                if k in ("sum",) or k.startswith("ev:")}
        csum = np.stack([np.bincount(comp, weights=cat["csum"][:, a], minlength=ncomp) for a in range(self.d)], 1)
        pks = {}
        for k in self.peaks:
            pk = np.full(ncomp, -np.inf)
            np.maximum.at(pk, comp, cat["pk:" + k])
            pks[k] = pk
        out = []
        for i in np.flatnonzero(size >= max(s.min_size, 1)):
            n = float(size[i])
            ev = {k: float(sums["ev:" + k][i] / n) for k in self.evidence}
            ev.update({k: float(pks[k][i]) for k in self.peaks})
            b = int(band[i])
            name = s.bands[b] if len(s.bands) > 1 and 0 <= b < len(s.bands) else None
            out.append(hal.make_region(
                kind=self.kind, size=int(n), bbox=[[int(lo[i, a]), int(hi[i, a])] for a in range(self.d)],  # type: ignore[arg-type]
                centroid=(csum[i] / n).tolist(), peak_score=float(peak[i]), mean_score=float(sums["sum"][i] / n),
                evidence=ev, geometry=s.grid, domain=s.domain, thresholds=s.th, calibration=s.calibration,
                band=name))
        return out


# ---------------------------------------------------------------------------------------------
# overviews


class Overview:
    """An array over the audited box, at full resolution (``stride`` 1) or decimated."""

    def __init__(self, shape: Sequence[int], stride: Sequence[int], channels: int | None, dtype: Any, how: str):
        self.stride, self.how, self.channels = tuple(int(v) for v in stride), how, channels
        sp = tuple(-(-int(n) // k) for n, k in zip(shape, self.stride))
        fill = np.nan if how == "mean" else 0
        self.data = np.full(sp if channels is None else (channels, *sp), fill, dtype)

    def put(self, start: Sequence[int], arr: Array) -> None:
        """``arr`` (a core window, ``(C,)`` + spatial if channels) at ``start`` in the box (a multiple of stride)."""
        lead = 0 if self.channels is None else 1
        if all(k == 1 for k in self.stride):
            sl = tuple(slice(a, a + n) for a, n in zip(start, arr.shape[lead:]))
            self.data[(slice(None),) * lead + sl] = arr
            return
        red = _reduce(arr, self.stride, self.how, lead)
        sl = tuple(slice(a // k, a // k + n) for a, k, n in zip(start, self.stride, red.shape[lead:]))
        self.data[(slice(None),) * lead + sl] = red


def _reduce(arr: Array, stride: Sequence[int], how: str, lead: int) -> Array:
    """Block reduction of ``arr`` by ``stride``: nearest, NaN-ignoring max or mean (numpy's
    ``nanmax``/``nanmean``). One contiguous float32 copy, padded (NaN) only where the axis is not
    a multiple of the stride. Without NaN, a block mean is ``nanmean``'s own float32 sum divided by
    the count in float64, and a block max the plain max, each reduced one axis at a time (a 4 x
    1024^2 core at stride 12: 42 ms with ``nanmean``, 26 ms both axes at once, 8.5 ms one at a time)."""
    if how == "nearest":
        return arr[(slice(None),) * lead + tuple(slice(None, None, k) for k in stride)]
    x = np.ascontiguousarray(arr, dtype=np.float32)
    pad = [(0, 0)] * lead + [(0, (-n) % k) for n, k in zip(x.shape[lead:], stride)]
    if any(p for _, p in pad):
        x = np.pad(x, pad, constant_values=np.nan)
    shape = list(x.shape[:lead]) + [v for n, k in zip(x.shape[lead:], stride) for v in (n // k, k)]
    axes = tuple(lead + 2 * i + 1 for i in range(len(stride)))
    blocks = x.reshape(shape)
    if not np.isnan(x).any():  # axis by axis, the innermost first: 3x faster than both at once at stride 12
        for ax in reversed(axes):
            blocks = blocks.sum(axis=ax) if how == "mean" else blocks.max(axis=ax)
        return (blocks / np.float64(np.prod(stride))).astype(np.float32) if how == "mean" else blocks
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks (invalid pixels) stay NaN
        return (np.nanmean if how == "mean" else np.nanmax)(blocks, axis=axes)


def stride_for(shape: Sequence[int], scale: Sequence[int], budget: int | None = None) -> int:
    """The overview stride: 1 when the box has at most ``budget`` (default :data:`OVERVIEW_PIXELS`)
    pixels, else the smallest multiple of the scale that brings it there."""
    budget = budget or OVERVIEW_PIXELS
    n = float(np.prod([int(v) for v in shape]))
    if n <= budget:
        return 1
    k = math.ceil((n / budget) ** (1.0 / len(shape)))
    step = math.lcm(*[int(f) for f in scale])
    return int(step * math.ceil(k / step))


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Sources:
    """The inputs of an audit, read by window."""

    lr: Source
    sr: Source
    reference: Source | None = None


@dataclass
class Run:
    """What :func:`run_audit` accumulated over the audited box."""

    box: Box  # SR pixels
    stride: int
    arrays: dict[str, Array]
    images: dict[str, Array]
    lr_image: Array
    regions: list[Region]
    reference_metrics: dict[str, dict[str, object]] | None
    lr_sq: Array  # (2, C): model, baseline squared LR errors
    lr_count: int
    lr_fractions: ClassFractions
    fractions: ClassFractions | None
    valid: int
    unstable: int
    conformal_u: list[Array]
    coverage: Coverage
    timings: dict[str, float]


def class_fractions(counts: Array) -> ClassFractions:
    """:meth:`~domainsr.audit.hallucination.CorrectnessMaps.fractions` from class counts."""
    n = max(int(counts[1:].sum()), 1)
    share = {hal.CLASS_NAMES[k]: float(counts[k]) / n for k in (hal.UNCHANGED, hal.IMPROVED, hal.OMITTED,
                                                                 hal.HALLUCINATED)}
    m = max(int(counts[hal.IMPROVED] + counts[hal.OMITTED]), 1)
    return ClassFractions(**share, improved_of_detail=float(counts[hal.IMPROVED]) / m,
                          omitted_of_detail=float(counts[hal.OMITTED]) / m)


def windows(box_lr: Box, core: Sequence[int]) -> Iterator[Box]:
    """Core windows (LR pixels) partitioning ``box_lr``, row-major."""
    ranges = [[(a, min(a + c, b)) for a in range(lo, b, c)] for (lo, b), c in zip(box_lr, core)]
    yield from itertools.product(*ranges)


def run_audit(s: Setup, src: Sources, box: Box | None = None, *, stride: int = 1,
              risk_writer: Any = None, progress: Progress | None = None,
              noise_sampling: str | None = None) -> Run:
    """Run the audit over ``box`` (SR pixels, [start, stop) per axis, aligned to LR pixels;
    default the whole scene) window by window."""
    f, d = s.scale, s.d
    lr_shape = src.lr.shape
    sr_shape = tuple(n * k for n, k in zip(lr_shape, f))
    box = box or tuple((0, n) for n in sr_shape)
    box_lr = tuple((a // k, b // k) for (a, b), k in zip(box, f))
    shape = tuple(b - a for a, b in box)
    st = (stride,) * d
    st_lr = tuple(max(1, stride // k) for k in f)
    core = s.window
    if stride > 1:  # cores start on multiples of the stride
        core = tuple(max(c // (stride // k), 1) * (stride // k) for c, k in zip(core, f))
    timings: dict[str, float] = {}
    c = src.sr.template.channels
    arrays = {"mask": Overview(shape, st, None, bool, "nearest"), "risk": Overview(shape, st, None, np.float32, "max"),
              "lr_residual": Overview(shape, st, None, np.float32, "max"),
              "lr_classes": Overview(shape, st, None, np.uint8, "nearest")}
    if s.reference:
        arrays["classes"] = Overview(shape, st, None, np.uint8, "nearest")
    if s.has_uncertainty:
        arrays["uncertainty"] = Overview(shape, st, None, np.float32, "max")
    images = {"sr": Overview(shape, st, c, np.float32, "mean"), "baseline": Overview(shape, st, c, np.float32, "mean")}
    if s.reference:
        images["reference"] = Overview(shape, st, c, np.float32, "mean")
    lr_ov = Overview(tuple(b - a for a, b in box_lr), st_lr, c, np.float32, "mean")
    evidence = ["lr_inconsistent"] + (["uncertainty_sigma", "unstable"] if s.has_uncertainty else [])
    peaks = sorted(hal.PEAK_EVIDENCE) if s.has_uncertainty else []
    kinds = ["hallucination", "omission", "inconsistency"] if s.reference else ["inconsistency"] + (
        ["uncertain"] if s.has_uncertainty else [])
    acc = {k: RegionAccumulator(k, box, f, evidence, peaks) for k in kinds}
    sums = None
    if s.reference and s.ref_range is not None and s.ref_mean is not None:
        sums = mt.MetricSums(["model", "baseline"], c, s.ref_range, s.ref_mean, scale=f, spacing=s.spacing,
                             spectral=c > 2)
    lr_sq, lr_count = np.zeros((2, c)), 0
    counts_lr, counts = np.zeros(5, np.int64), np.zeros(5, np.int64)
    valid, unstable_n = 0, 0
    step = conformal_grid(shape)
    conf_u: list[list[Array]] = [[] for _ in range(c)]
    wins = list(windows(box_lr, core))
    for i, (w, lr_img, lr_valid, m, u) in enumerate(computed(s, src, wins, timings, box, step)):
        core_lr, core_sr = core_slices(s, w, lr_shape)
        start = tuple(a * k for (a, _), k in zip(w, f))
        rel = tuple(a - b0 for a, (b0, _) in zip(start, box))
        t = time.perf_counter()
        mc = m.mask[core_sr]
        valid += int(mc.sum())
        arrays["mask"].put(rel, mc)
        arrays["risk"].put(rel, m.risk[core_sr])
        arrays["lr_residual"].put(rel, m.lr_residual[core_sr])
        arrays["lr_classes"].put(rel, m.lr_classes[core_sr])
        sr_core = m.srd[(slice(None), *core_sr)]
        images["sr"].put(rel, sr_core if stride == 1 else np.where(mc, sr_core, np.nan))
        images["baseline"].put(rel, m.based[(slice(None), *core_sr)])
        lr_core = np.asarray(lr_img.data, np.float32)[(slice(None), *core_lr)]
        lr_ov.put(tuple(a - b0 for (a, _), (b0, _) in zip(w, box_lr)),
                  lr_core if stride == 1 else np.where(lr_valid[core_lr], lr_core, np.nan))
        ok_lr = m.lr_ok[core_lr]
        lr_count += int(ok_lr.sum())
        for j, x in enumerate((m.d_sr, m.d_base)):
            diff = x[(slice(None), *core_lr)] - m.lrd[(slice(None), *core_lr)]
            lr_sq[j] += [float(np.square(dd[ok_lr], dtype=np.float32).sum(dtype=np.float64)) for dd in diff]
        counts_lr += np.bincount(m.lr_cls[core_lr].ravel(), minlength=5)[:5]
        ev = {"lr_inconsistent": m.lr_flag.astype(np.float32)}
        if m.uncertainty is not None and m.unstable is not None:
            arrays["uncertainty"].put(rel, m.uncertainty[core_sr])
            unstable_n += int(m.unstable[core_sr][mc].sum())
            ev.update(uncertainty_sigma=m.uncertainty, unstable=m.unstable.astype(np.float32),
                      uncertainty_peak_sigma=m.uncertainty)
        floor = s.th.region_floor * s.th.review_risk  # hysteresis, per kind: weak flags join no region
        for kind, (flag, score, band) in kind_flags(m).items():
            acc[kind].add(flag & (m.kind_risk[kind] >= floor), score, ev, core_sr, start, band)
        if m.classes is not None and m.hall is not None and m.refd is not None:
            arrays["classes"].put(rel, m.classes[core_sr])
            images["reference"].put(rel, m.refd[(slice(None), *core_sr)])
            counts += np.bincount(m.classes[core_sr].ravel(), minlength=5)[:5]
            if sums is not None:
                sums.add({"model": m.srd, "baseline": m.based}, m.refd, m.mask, core_sr)
        if u is not None:
            u_grid, u_mask = u
            for b in range(c):
                conf_u[b].append(u_grid[b][u_mask])
        if risk_writer is not None:
            cls = m.classes if m.classes is not None else m.lr_classes
            risk_writer.write(np.stack([m.risk[core_sr], cls[core_sr].astype(np.float32)]), start[0], start[1])
        _tick(timings, "accumulate", t)
        del m, u, lr_img, lr_valid, sr_core, lr_core, ev  # this window's arrays: gone before the next is yielded
        if progress is not None:
            progress(i + 1, len(wins))
    t = time.perf_counter()
    regions = without_repeats([r for a in acc.values() for r in a.regions(s)])
    _tick(timings, "regions", t)
    n_box = int(np.prod(shape))
    cover = Coverage(windows=len(wins), window_shape=[int(cc * k) for cc, k in zip(core, f)],
                     halo=[int(h * k) for h, k in zip(s.halo, f)],
                     scene_fraction=round(n_box / float(np.prod(sr_shape)), 6), sr_pixels=n_box,
                     valid_fraction=valid / max(n_box, 1), stride=stride,
                     box=[[a, b - 1] for a, b in box], noise_sampling=noise_sampling)
    return Run(box=box, stride=stride, arrays={k: v.data for k, v in arrays.items()},
               images={k: v.data for k, v in images.items()}, lr_image=lr_ov.data, regions=regions,
               reference_metrics=None if sums is None else sums.result(), lr_sq=lr_sq, lr_count=lr_count,
               lr_fractions=class_fractions(counts_lr), fractions=class_fractions(counts) if s.reference else None,
               valid=valid, unstable=unstable_n, conformal_u=[np.concatenate(u) if u else np.zeros(0) for u in conf_u],
               coverage=cover, timings=timings)


def conformal_scale(s: Setup, m: Maps, core: tuple[slice, ...], first: Sequence[int], step: int
                    ) -> tuple[Array, Array]:
    """The conformal scale ``u`` (:func:`~domainsr.audit.calibration.local_scale`, with the card
    domain's fitted weights) at the sample grid of a window's ``core``: the pixels whose window
    index per axis is ``first`` modulo ``step`` (see :func:`conformal_grid`), and the mask there.
    The filters run on the core grown by their reach (``G(h^2)`` after ``h = b - G3(b)``: the two
    radii added) and are evaluated at the grid points only; the reflecting boundary stays where the
    window's edge is, so the values are those of the whole image."""
    ws = hal.window_sigma(s.scale)
    cb = s.calibration.conformal(s.domain)
    reach = [_rad(3.0 * w, 4.0) + _rad(w, 4.0) for w in ws]  # scipy's radius: int(truncate * sigma + 0.5)
    grown = tuple(slice(max(0, c.start - r), min(n, c.stop + r)) for c, r, n in zip(core, reach, m.mask.shape))
    at = [np.arange(c.start + (f0 - c.start) % step, c.stop, step) - g.start for c, f0, g in zip(core, first, grown)]
    sl = (slice(None), *grown)
    assert m.e_up is not None
    u = local_scale(m.srd[sl], m.based[sl], m.e_up[sl], s.sigma_lr, ws, None if cb is None else cb.weights,
                    at=None if step == 1 else at)
    if step == 1:
        u = u[(slice(None), *(slice(c.start - g.start, c.stop - g.start) for c, g in zip(core, grown)))]
    return u, m.mask[grown][np.ix_(*at)]


def conformal_grid(shape: Sequence[int]) -> int:
    """The step (pixels per axis) of the regular grid of pixels whose conformal scale is sampled
    for the median bound: the largest keeping about :data:`CONFORMAL_SAMPLES` or more per band."""
    n = float(np.prod(shape))
    return max(1, int((n / CONFORMAL_SAMPLES) ** (1.0 / len(shape))))


Inputs = tuple[SpatialImage, Array, Array, Array, Array | None, Array | None, Array | None]


def read_window(s: Setup, src: Sources, w: Box) -> Inputs:
    """The inputs of core window ``w`` (LR pixels) read with its halo: the LR image and its valid
    pixels, SR data and valid pixels, the reference's (or ``None``), and the TTA spread's window."""
    pad = tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(w, s.halo, src.lr.shape))
    pad_sr = tuple((a * k, b * k) for (a, b), k in zip(pad, s.scale))
    lr_img = src.lr.image(pad)
    srd, sr_valid = src.sr.read(pad_sr)
    refd = ref_valid = None
    if src.reference is not None:
        refd, ref_valid = src.reference.read(pad_sr)
    std = None if s.tta_std is None else s.tta_std[(slice(None), *(slice(a, b) for a, b in pad_sr))]
    return lr_img, valid_of(lr_img), srd, sr_valid, refd, ref_valid, std


def core_slices(s: Setup, w: Box, lr_shape: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """The core of window ``w`` (LR pixels) inside its padded window, on the LR and the SR grid."""
    pad = tuple((max(0, a - h), min(n, b + h)) for (a, b), h, n in zip(w, s.halo, lr_shape))
    core_lr = tuple(slice(a - p, b - p) for (a, b), (p, _) in zip(w, pad))
    return core_lr, tuple(slice(cl.start * k, cl.stop * k) for cl, k in zip(core_lr, s.scale))


def computed(s: Setup, src: Sources, wins: Sequence[Box], timings: dict[str, float], box: Box, step: int,
             workers: int = WORKERS) -> Iterator[tuple[Box, SpatialImage, Array, Maps, tuple[Array, Array] | None]]:
    """``(window, LR image, LR valid, maps, conformal scale and mask at the core's sample grid or
    None)`` of every window (``box``: the audited SR box, whose first pixel starts the sample grid
    of ``step`` pixels)
    in order, ``workers`` windows read and computed at once in threads while the caller accumulates
    the last (reads one at a time: a dataset serves one thread at a time). GDAL's decoding, numpy's
    ufuncs and torch release the GIL, scipy.ndimage's filters do not. Each window's computation is
    the same whichever thread runs it. Memory holds at most ``workers + 1`` windows' maps. One
    worker when a model runs per window (TTA): a card model's ``prepare`` sets per-image state."""
    lock = threading.Lock()
    conformal = s.calibration.conformal(s.domain) is not None
    workers = 1 if s.model is not None else max(1, workers)  # a model's prepare() keeps per-image state

    def task(w: Box) -> tuple[Inputs, Maps, tuple[Array, Array] | None, dict[str, float]]:
        tm: dict[str, float] = {}
        t = time.perf_counter()
        with lock:
            inputs = read_window(s, src, w)
        _tick(tm, "read", t)
        m = window_maps(s, *inputs, tm)
        u = None
        if conformal:
            t = time.perf_counter()
            core = core_slices(s, w, src.lr.shape)[1]  # in the padded window, which starts at a k - core.start
            first = [(b0 - a * k + c.start) % step for (a, _), k, (b0, _), c in zip(w, s.scale, box, core)]
            u = conformal_scale(s, m, core, first, step)
            _tick(tm, "conformal", t)
        return inputs, m, u, tm

    with ThreadPoolExecutor(workers, thread_name_prefix="audit-window") as pool:
        pending = deque(pool.submit(task, w) for w in wins[:workers])
        for i, w in enumerate(wins):
            t = time.perf_counter()
            inputs, m, u, tm = pending.popleft().result()
            _tick(timings, "wait", t)
            for k, v in tm.items():
                timings[k] = timings.get(k, 0.0) + v
            yield w, inputs[0], inputs[1], m, u
            del inputs, m, u
            if i + workers < len(wins):
                pending.append(pool.submit(task, wins[i + workers]))


def without_repeats(regions: list[Region], share: float = 0.5) -> list[Region]:
    """Drop an ``inconsistency`` region that repeats a reference region: with a reference, a
    structure the truth already flags (hallucination / omission) is often LR-inconsistent too; one
    region per structure, and the reference's evidence is the stronger. Repeating = at least
    ``share`` of its box inside the box of one such region."""
    ref = [r.bbox_index for r in regions if r.kind in ("hallucination", "omission")]
    if not ref:
        return regions

    def inside(a: list[list[int]], b: list[list[int]]) -> float:
        inter = np.prod([max(0, min(x1, y1) - max(x0, y0) + 1) for (x0, x1), (y0, y1) in zip(a, b)])
        return float(inter) / float(np.prod([x1 - x0 + 1 for x0, x1 in a]))

    return [r for r in regions if r.kind != "inconsistency" or max(inside(r.bbox_index, b) for b in ref) < share]


@contextmanager
def opened(factory: Callable[[], Sources]) -> Iterator[Sources]:
    """Sources from ``factory``, closed (raster readers) on exit."""
    src = factory()
    with ExitStack() as stack:
        for part in (src.lr, src.sr, src.reference):
            if part is not None and hasattr(part, "close"):
                stack.callback(part.close)
        yield src


def check_box(box: Box, shape: Sequence[int], scale: Sequence[int], label: str | None) -> None:
    """InputError unless ``box`` lies in ``shape`` on whole LR pixels."""
    for (a, b), n, k in zip(box, shape, scale):
        if not 0 <= a < b <= n or a % k or b % k:
            raise InputError(f"audit box {list(box)} is not inside the SR grid {tuple(shape)} on whole LR pixels",
                             label)


__all__ = ["DEFAULT_WINDOW", "ArraySource", "Maps", "Overview", "RasterSource", "RegionAccumulator", "Run",
           "Setup", "Source", "Sources", "area", "class_fractions", "halo_lr", "plan", "rule_reach", "run_audit",
           "stride_for", "valid_of", "window_maps", "windows"]
