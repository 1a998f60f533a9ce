"""Per-scan self-supervised thick-slice SR (SMORE / ECLARE style): no shipped model.

:func:`train_self_supervised` trains a 2D network on a thick-slice scan's own in-plane slices,
each degraded along one in-plane axis (both in turn) with the estimated slice profile and sampled
every ``K`` pixels, and saves a slice-wise checkpoint (``application: slicewise``, scale ``(1, K)``)
that the engine applies through-plane (both planes containing the thick axis, averaged).

* Slice profile (:func:`estimate_profile`): FWHM = slice thickness in output slices (``K *
  thickness / spacing``); the thickness comes from the DICOM header, else the slices are taken as
  contiguous (thickness = spacing: NIfTI has no thickness field). Gaussian for MRI (a selective
  excitation), box for CT (reconstructed thick slices average); ``fwhm``/``profile`` override.
* Normalisation: per scan, by robust percentiles (the valid voxels' 0.5th percentile maps to 0,
  the foreground's 99.5th to 1), written into the card as fixed numbers, so any units (MR
  arbitrary units at any scale, CT in HU) work and the output is mapped back to them.
* Budget: training stops at ``budget`` seconds (setup and validations included). Patches of
  held-out in-plane slices (never drawn for training) are scored against the best interpolation
  at the start (the untrained net *is* its cubic base), every 1/6 of the budget and at the end;
  the best-so-far EMA weights are kept: never worse than interpolation on them.
* Only integer ``K >= 2`` (the engine, geometry and degradations work on integer factors).
* The card names the scan by a content fingerprint (sha256 of its voxels), never by a file name.
"""
from __future__ import annotations

import copy
import hashlib
import math
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from domainsr.config import StrictModel
from domainsr.errors import ConfigError, InputError
from domainsr.image import SpatialImage

#: The ``--model`` name of the mode (``-``/``_`` alike), and its short alias.
SELF_SUPERVISED = "self-supervised"
_NAMES = ("self-supervised", "self_supervised", "selfsup")
Progress = Callable[[dict[str, Any]], None]
MAX_VAL_SLICES, VAL_PATCH = 6, 128  #: held-out in-plane slices (at most), side of the patch scored in each


class SelfSupSettings(StrictModel):
    """Options of ``--model self-supervised`` (config ``model.kwargs``, or ``self-supervised?budget=60``)."""

    budget: float = Field(300.0, gt=0, le=7200, description="training seconds (setup and validation included)")
    profile: Literal["auto", "gaussian", "box"] = "auto"
    fwhm: float | None = Field(None, gt=0, le=64, description="slice-profile FWHM in output slices")
    n_blocks: int = Field(4, ge=1, le=32)
    n_feats: int = Field(32, ge=8, le=128)
    patch: int = Field(64, ge=8, le=256)
    batch_size: int = Field(16, ge=1, le=256)
    lr: float = Field(1e-3, gt=0, le=1e-2)
    val_fraction: float = Field(0.1, gt=0, lt=0.5)
    seed: int = 0


def is_self_supervised(name: str) -> bool:
    """Whether ``--model name`` (optionally ``name?key=value``) is the self-supervised mode."""
    return str(name).partition("?")[0].strip().lower() in _NAMES


def parse_settings(name: str = SELF_SUPERVISED, kwargs: Mapping[str, Any] | None = None) -> SelfSupSettings:
    """Settings from ``model.kwargs`` and the reference's ``?key=value&...`` options (those win);
    ConfigError naming an unknown key or a bad value."""
    _, sep, query = str(name).partition("?")
    opts = dict(kwargs or {})
    for part in query.split("&") if sep else []:
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"model reference {name!r}: options after '?' are key=value (budget=120)")
        opts[key.strip()] = value.strip()
    try:
        return SelfSupSettings.model_validate(opts)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"--model {SELF_SUPERVISED}: {problems}") from None


def check_factor(scale: int | Sequence[int] | None) -> int | list[int]:
    """The scale of the mode: ``K`` (the thick axis found from the spacing) or one factor per axis
    with a single ``K`` (``1,1,K``). ConfigError for anything else."""
    hint = f"--model {SELF_SUPERVISED} upsamples one thick-slice axis by an integer K >= 2: --scale K or 1,1,K"
    if scale is None:
        raise ConfigError(f"{hint} (no scale given)")
    vals = [scale] if isinstance(scale, (int, np.integer)) else list(scale)
    if not all(isinstance(v, (int, np.integer)) for v in vals):
        raise ConfigError(f"{hint}; got {scale!r}")
    big = [int(v) for v in vals if v != 1]
    if len(big) != 1 or big[0] < 2 or min(int(v) for v in vals) < 1:
        raise ConfigError(f"{hint}; got {scale!r}")
    return int(vals[0]) if len(vals) == 1 else [int(v) for v in vals]


# ---------------------------------------------------------------------------------------------
# the slice profile


@dataclass(frozen=True)
class ProfileEstimate:
    """The thick axis' slice profile: shape, FWHM in output slices, and where the numbers came from."""

    profile: str
    fwhm: float
    factor: int
    thickness_mm: float
    spacing_mm: float
    source: str

    def degradation(self, domain: str) -> dict[str, Any]:
        """The 2D degradation spec (scale ``(1, K)``: the second axis is the thick one); the audit
        puts the volume's factors in its ``scale``."""
        k = self.factor
        if domain == "ct" and self.profile == "box":
            return {"kind": "ct", "scale": [1, k], "thickness": self.fwhm, "sigma_hu": 0.0, "hu_range": None}
        return {"kind": "mri", "scale": [1, k], "profile": self.profile, "fwhm": self.fwhm}

    def describe(self) -> dict[str, Any]:
        return {"profile": self.profile, "fwhm_output_slices": round(self.fwhm, 4), "factor": self.factor,
                "slice_thickness_mm": round(self.thickness_mm, 4), "slice_spacing_mm": round(self.spacing_mm, 4),
                "source": self.source}


def estimate_profile(img: SpatialImage, axis: int, factor: int, settings: SelfSupSettings) -> ProfileEstimate:
    """The slice profile along ``axis`` (see the module docstring)."""
    spacing = float(img.geometry.spacing[axis])
    dicom = img.meta.get("dicom") if isinstance(img.meta.get("dicom"), dict) else {}
    header = dicom.get("slice_thickness") if dicom else None
    if header is not None and float(header) > 0:
        thickness, source = float(header), "slice thickness from the DICOM header (SliceThickness)"
    else:
        thickness, source = spacing, "contiguous slices assumed: thickness = slice spacing (no thickness in the header)"
    fwhm = float(settings.fwhm) if settings.fwhm else factor * thickness / spacing
    if settings.fwhm:
        source = "FWHM given (fwhm option)"
    profile = settings.profile if settings.profile != "auto" else ("box" if img.domain == "ct" else "gaussian")
    return ProfileEstimate(profile, fwhm, factor, thickness, spacing, source)


# ---------------------------------------------------------------------------------------------
# data: in-plane slices, held-out slices, normalisation


@dataclass
class PlaneData:
    """The scan with its thick axis first (``(C, T, P, Q)``), its masks and the held-out slices."""

    stack: np.ndarray
    valid: np.ndarray
    fg: np.ndarray
    val_idx: np.ndarray
    train_idx: np.ndarray
    offset: np.ndarray
    scale: np.ndarray


def plane_data(img: SpatialImage, axis: int, val_fraction: float) -> PlaneData:
    """The scan's in-plane slices, the foreground (valid voxels above 5 % of the robust range),
    the held-out slices (evenly spaced among those with foreground) and the per-scan
    normalisation (valid 0.5th percentile -> 0, foreground 99.5th -> 1, per channel)."""
    stack = np.ascontiguousarray(np.moveaxis(np.asarray(img.data, np.float32), axis + 1, 1))
    valid = np.moveaxis(img.valid_mask(), axis, 0) & np.all(np.isfinite(stack), axis=0)
    if img.nodata is not None and not np.isnan(img.nodata):
        valid &= ~np.all(stack == img.nodata, axis=0)
    if not valid.any():
        raise InputError("no valid voxel to learn from", img.source or None)
    lo, hi = (np.array([np.percentile(c[valid], q) for c in stack], np.float32) for q in (0.5, 99.5))
    fg = valid & np.any(stack > (lo + 0.05 * (hi - lo)).reshape(-1, 1, 1, 1), axis=0)
    fg = fg if fg.any() else valid
    top = np.array([np.percentile(c[fg], 99.5) for c in stack], np.float32)
    scale = np.maximum(top - lo, 1e-6 * np.maximum(np.abs(top), 1.0)).astype(np.float32)
    n = stack.shape[1]
    if n < 3:
        raise InputError(f"{n} slice(s) along the thick axis: self-supervised SR needs at least 3", img.source or None)
    frac = fg.reshape(n, -1).mean(axis=1)
    cand = np.flatnonzero(frac >= 0.5 * frac.max())
    n_val = int(min(max(1, round(val_fraction * n)), MAX_VAL_SLICES, max(1, cand.size // 2)))
    val_idx = np.unique(cand[np.linspace(0, cand.size - 1, n_val + 2)[1:-1].round().astype(int)])
    train_idx = np.setdiff1d(np.arange(n), val_idx)
    return PlaneData(stack, valid, fg, val_idx, train_idx, lo, scale)


def patch_shape(side: int, factor: int, fwhm: float, want: int, source: str | None) -> tuple[tuple[int, int], int]:
    """``(patch, margin)``: a training patch (its second axis a multiple of ``K``) and the LR margin
    the degradation needs, fitted to in-plane slices of ``side`` pixels."""
    margin = math.ceil(1.5 * fwhm / factor) + 1
    room = side - 2 * margin * factor
    if room < 2 * factor:
        raise InputError(f"in-plane slices of {side} px are too small to learn x{factor} thick-slice SR "
                         f"(need at least {2 * margin * factor + 2 * factor} px)", source)
    pb = factor * (min(want, room) // factor)
    pa = min(want, side - 2 * margin)
    return (pa, pb), margin


def held_out_patch(pair: Any, factor: int, side: int) -> Any:
    """The ``side``-pixel patch of a held-out slice pair around its foreground centre (the same
    ground in HR, LR and the mask): validation stays cheap on large slices."""
    from domainsr.train.datasets import EvalPair

    n_a, n_b = pair.hr.shape[1:]
    ha, hb = min(side, n_a), min(side // factor, n_b // factor)
    ya, yb = np.nonzero(pair.valid) if pair.valid.any() else ([n_a // 2], [n_b // 2])
    a0 = int(np.clip(round(float(np.mean(ya))) - ha // 2, 0, n_a - ha))
    b0 = int(np.clip(round(float(np.mean(yb)) / factor) - hb // 2, 0, n_b // factor - hb))
    hr_box = (slice(a0, a0 + ha), slice(b0 * factor, (b0 + hb) * factor))
    return EvalPair(np.ascontiguousarray(pair.hr[(slice(None), *hr_box)]),
                    np.ascontiguousarray(pair.lr[:, a0:a0 + ha, b0:b0 + hb]), pair.valid[hr_box], pair.norm)


# ---------------------------------------------------------------------------------------------
# training


@dataclass
class SelfSupResult:
    """The saved checkpoint (card path) with the best held-out weights, its card and the run's figures."""

    checkpoint: Path
    card: Any
    seconds: float
    steps: int
    best_step: int
    profile: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)


def scan_fingerprint(img: SpatialImage) -> str:
    """A pseudonymous id of the scan: 12 hex digits of the sha256 of its voxels."""
    return hashlib.sha256(np.ascontiguousarray(img.data).tobytes()).hexdigest()[:12]


def train_self_supervised(img: SpatialImage, axis: int, factor: int, settings: SelfSupSettings,
                          out_dir: str | Path, *, threads: int | None = None,
                          progress: Progress | None = None) -> SelfSupResult:
    """Train the 2D network on ``img``'s in-plane slices (``axis``: the thick one) for at most
    ``settings.budget`` seconds, keep the best held-out weights and save the slice-wise
    checkpoint into ``out_dir``. ``progress`` gets a dict at each validation."""
    import torch

    from domainsr.degrade import build_degradation
    from domainsr.models import build_model
    from domainsr.models.checkpoints import InputNormalization, save_checkpoint
    from domainsr.train.datasets import PatchDataset, Region, eval_pairs
    from domainsr.train.loop import lr_factor
    from domainsr.train.state import ema_model

    t0 = time.perf_counter()
    deadline = t0 + settings.budget
    if threads:
        torch.set_num_threads(int(threads))
    torch.manual_seed(settings.seed)
    prof = estimate_profile(img, axis, factor, settings)
    deg = build_degradation(prof.degradation(img.domain))
    data = plane_data(img, axis, settings.val_fraction)
    patch, margin = patch_shape(min(data.stack.shape[2:]), factor, prof.fwhm, settings.patch, img.source or None)
    norm = InputNormalization(data.offset, data.scale)
    planes = [(1, 2), (2, 1)]
    train = data.stack[:, data.train_idx]
    ds = PatchDataset(np.ascontiguousarray(train), Region("train", 0, 0, train.shape[1]), scale=(1, factor),
                      patch=patch, degradation=deg, norm=norm, foreground=data.fg[data.train_idx],
                      min_foreground=0.25, planes=planes, margin=margin, augment=True, seed=settings.seed,
                      source=img.source)
    val = data.stack[:, data.val_idx]
    pairs = eval_pairs(np.ascontiguousarray(val), Region("val", 0, 0, val.shape[1]), scale=(1, factor),
                       degradation=deg, norm=norm, valid=data.fg[data.val_idx], foreground=data.fg[data.val_idx],
                       planes=planes, max_planes=2 * len(data.val_idx), min_foreground=0.0, seed=settings.seed)
    pairs = [held_out_patch(p, factor, VAL_PATCH) for p in pairs]
    kwargs = {"n_blocks": settings.n_blocks, "n_feats": settings.n_feats}
    net = build_model("rescnn", spatial_dims=2, in_channels=img.channels, scale=(1, factor), **kwargs)
    ema = ema_model(net, 0.999)
    opt = torch.optim.Adam(net.parameters(), lr=settings.lr, betas=(0.9, 0.99))
    scorer = _Scorer(pairs, factor)
    history: list[dict[str, Any]] = []

    best: dict[str, Any] = {}

    def validate(step: int) -> None:
        """Score the EMA weights on the held-out patches; keep them when they are the best so far."""
        v0 = time.perf_counter()
        m = scorer.metrics(ema.module)
        history.append({"step": step, "seconds": round(time.perf_counter() - t0, 1), "psnr": round(m.psnr, 3),
                        "gain_db": round(m.gain_db, 3)})
        if progress:
            progress({"event": "validation", **history[-1]})
        if not best or m.psnr > best["metrics"].psnr:
            best.update(metrics=m, state=copy.deepcopy(ema.module.state_dict()), step=step)
        scorer.last_cost = time.perf_counter() - v0

    validate(0)  # the untrained net is its cubic base: the floor
    every = max(settings.budget / 6.0, 2.0)
    last_val, step, stopped, step_cost = time.perf_counter(), 0, "time", 0.0
    batches = iter(torch.utils.data.DataLoader(ds, batch_size=settings.batch_size, sampler=range(10**12),
                                               num_workers=0, drop_last=True))
    net.train()
    while (s0 := time.perf_counter()) + 2 * step_cost + 1.5 * scorer.last_cost + 0.2 < deadline:
        for g in opt.param_groups:
            g["lr"] = settings.lr * lr_factor((time.perf_counter() - t0) / settings.budget, "cosine", step, 0)
        x, y = next(batches)
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.l1_loss(net(x), y)
        if not math.isfinite(float(loss.detach())):
            stopped = "diverged"
            break
        loss.backward()
        opt.step()
        ema.update_parameters(net)
        step, step_cost = step + 1, time.perf_counter() - s0
        if time.perf_counter() - last_val >= every and time.perf_counter() + 2.5 * scorer.last_cost < deadline:
            validate(step)
            last_val = time.perf_counter()
    if step and history[-1]["step"] != step and stopped != "diverged":
        validate(step)
    final = copy.deepcopy(ema.module).eval()
    final.load_state_dict(best["state"])
    seconds = time.perf_counter() - t0
    card = _card(img, final, kwargs, prof, deg, data, patch, best["metrics"], settings, step, best["step"],
                 seconds, stopped, history)
    path = save_checkpoint(final, card, out_dir)
    return SelfSupResult(path, card, seconds, step, best["step"], prof.describe(), history)


class _Scorer:
    """Held-out slices against the best interpolation (scored once), in the scan's units."""

    def __init__(self, pairs: Sequence[Any], factor: int) -> None:
        from domainsr.train.scoring import best_baseline

        self.pairs, self.scale, self.last_cost = list(pairs), (1, factor), 0.0
        self.baseline = best_baseline(self.pairs, 2, self.scale, self.run)

    @staticmethod
    def run(net: Any, pair: Any) -> np.ndarray:
        """``net`` on the pair's normalised LR, mapped back to the scan's units."""
        import torch

        from domainsr.train.datasets import denormalize, normalize

        with torch.no_grad():
            y = net(torch.from_numpy(normalize(pair.lr, pair.norm))[None]).float()[0].numpy()
        return denormalize(y, pair.norm)

    def metrics(self, net: Any) -> Any:
        from domainsr.train.scoring import region_metrics

        was = net.training
        outputs = [self.run(net.eval(), p) for p in self.pairs]
        net.train(was)
        return region_metrics(outputs, self.pairs, self.scale, self.baseline, "val",
                              f"{len(self.pairs)} patches of held-out in-plane slices of the scan, degraded along "
                              "each in-plane axis with the slice profile; foreground pixels without a 2 LR px "
                              "border; never drawn for training")


def _card(img: SpatialImage, net: Any, kwargs: dict[str, Any], prof: ProfileEstimate, deg: Any, data: PlaneData,
          patch: tuple[int, int], val: Any, settings: SelfSupSettings, steps: int, best_step: int, seconds: float,
          stopped: str, history: list[dict[str, Any]]) -> Any:
    import torch

    from domainsr.models import checkpoints as ck
    from domainsr.train.pairing import DEFAULT_UNITS

    scan = scan_fingerprint(img)
    rr = tuple(int(r) for r in np.broadcast_to(np.asarray(net.receptive_radius), (2,)))
    split = {"thick_axis": "the network's second axis (the scan's thick axis at inference)",
             "held_out_slices": [int(i) for i in data.val_idx], "train_slices": int(data.train_idx.size),
             "units": "in-plane slice indices along the thick axis",
             "note": "held-out slices are never drawn for training; the weights kept are those with the best "
                     "held-out PSNR"}
    return ck.ModelCard(
        name=f"selfsup-{scan}", architecture=ck.Architecture(name="rescnn", kwargs=kwargs), domain=img.domain,
        spatial_dims=2, scale=(1, prof.factor), in_channels=img.channels, out_channels=img.channels,
        channel_meaning=f"{img.domain.upper()} intensity of scan {scan}", units=img.units or DEFAULT_UNITS[img.domain],
        input_range=None, normalization=ck.FixedNormalization(offset=[float(v) for v in data.offset],
                                                           scale=[float(v) for v in data.scale]),
        receptive_radius=rr, application="slicewise", degradation=deg.describe(),
        training_data=ck.TrainingData(source=f"self-supervised: the in-plane slices of scan {scan}", split=split,
                                   description=f"scan {scan} ({img.domain}, shape {list(img.data.shape)}); "
                                   f"slice profile: {prof.describe()}"),
        training=ck.TrainingSettings(steps=steps, seconds=round(seconds, 1), device=f"cpu ({platform.machine()})",
                                  threads=torch.get_num_threads(), seed=settings.seed,
                                  batch_size=settings.batch_size, patch_size=list(patch), lr=settings.lr,
                                  loss="l1", stopped_by=stopped,
                                  extra={"budget_s": settings.budget, "best_step": best_step, "schedule": "cosine",
                                         "patches_drawn": steps * settings.batch_size, "ema_decay": 0.999,
                                         "profile": prof.describe(), "validations": history, "torch": torch.__version__}),
        metrics={"val": val}, license="derived from the scan itself; use under the scan's own terms",
        intended_use=f"through-plane x{prof.factor} SR of scan {scan} only (trained on its own slices)",
        limitations="trained on one scan for a short budget; assumes the in-plane resolution matches the target "
                    "through-plane spacing and the slice profile shown; not for other scans")


__all__ = ["SELF_SUPERVISED", "ProfileEstimate", "SelfSupResult", "SelfSupSettings", "check_factor", "estimate_profile",
           "is_self_supervised", "parse_settings", "patch_shape", "plane_data", "train_self_supervised"]
