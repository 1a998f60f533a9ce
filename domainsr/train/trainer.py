"""``train(config) -> TrainResult``: PSNR stage, optional GAN stage, EMA, validation, checkpoint.

One high-resolution image is split along an axis into train / val / test regions (see
:mod:`domainsr.train.datasets`); patches of the train region are degraded on the fly with the
config's degradation. The PSNR stage optimises L1/Charbonnier (+ optional SSIM, frequency and
gradient terms) with Adam; the GAN stage starts the generator from the PSNR stage's EMA weights
and adds a relativistic-average GAN term against a registry discriminator. EMA weights (decay
0.999 with a warm-up) are validated every ``val_every`` steps against the best interpolation
baseline on the val region, tested once on the held-out test region, and saved with their card.

Budgets: ``steps`` and ``max_minutes`` per stage, whichever ends first; the learning-rate
schedule follows the larger of the step and time fractions, so a run cut by time still anneals
(a run bounded by steps only is bit-for-bit reproducible on CPU). State is saved to
``<run_dir>/<name>/state.pt`` every ``save_every`` steps; ``resume=True`` continues from it.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from domainsr.audit import metrics as M
from domainsr.errors import ConfigError, ModelError
from domainsr.image import SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.models.checkpoints import (
    Architecture,
    FileRecord,
    FixedNormalization,
    InputNormalization,
    ModelCard,
    PercentileNormalization,
    RegionMetrics,
    TrainingData,
    TrainingSettings,
    percentile_normalization,
    read_card,
    save_checkpoint,
    sha256_file,
)
from domainsr.train.config import FixedNormSpec, PercentileNormSpec, TrainConfig
from domainsr.train.datasets import (
    EvalPair,
    PatchDataset,
    Region,
    denormalize,
    eval_pairs,
    normalize,
    split_regions,
)
from domainsr.train.losses import PixelLoss, frequency_l1, gradient_l1, l1, ragan_d_loss, ragan_g_loss

log = logging.getLogger("domainsr.train")

DEFAULT_UNITS = {"optical": "DN", "ct": "HU", "mri": "a.u."}
BASELINES = ("linear", "cubic", "lanczos")
Callback = Callable[[dict[str, Any]], None]


@dataclass
class TrainResult:
    checkpoint: Path
    card: ModelCard
    run_dir: Path
    steps: int
    gan_steps: int
    seconds: float
    stopped_by: str
    losses: list[tuple[int, float]] = field(default_factory=list)
    val_history: list[dict[str, Any]] = field(default_factory=list)
    val: RegionMetrics | None = None
    test: RegionMetrics | None = None


# ---------------------------------------------------------------------------------------------
# data


def load_source(config: TrainConfig) -> SpatialImage:
    """The HR training image: a sample name (``sentinel2``, ``mni152``, ...), ``pydicom:<test
    file>`` or a path, with ``data.bands`` selected."""
    from domainsr.image import MultiResolutionImage
    from domainsr.io import read_image

    path = source_path(config)
    img = read_image(path)
    bands = config.data.bands
    if isinstance(img, MultiResolutionImage):
        if not bands:
            raise ConfigError(f"{path} holds bands {list(img.band_names)}: name data.bands to train on")
        return img.select(bands)
    if bands:
        missing = [b for b in bands if b not in img.band_names]
        if missing:
            raise ConfigError(f"bands {missing} not in {list(img.band_names)}", path)
        idx = [img.band_names.index(b) for b in bands]
        img = img.derive(img.data[idx], band_names=tuple(bands))
    img.provenance.setdefault("source", str(path))
    return img


def source_path(config: TrainConfig) -> Path:
    """Where ``data.source`` is: a sample name (fetched), ``pydicom:<test file>`` or a path."""
    src = config.data.source
    if src.startswith("pydicom:"):
        from pydicom.data import get_testdata_file

        found = get_testdata_file(src.split(":", 1)[1], download=False)
        if found is None:
            raise ConfigError(f"pydicom has no test file {src.split(':', 1)[1]!r}")
        path = Path(str(found))
    elif "/" not in src and not Path(src).exists():
        from domainsr.data import NAMES, fetch_sample_data

        if src not in NAMES:
            raise ConfigError(f"data.source {src!r} is neither a file nor a sample ({', '.join(NAMES)})")
        path = fetch_sample_data()[src]
    else:
        path = Path(src)
    return path


def _source_files(img: SpatialImage, bands: list[str]) -> list[FileRecord]:
    """The files the image was read from (those of the chosen bands for a band folder), hashed."""
    files = img.provenance.get("files") or [img.source]
    if isinstance(files, dict):  # band -> file (band-set readers)
        files = [f for b, f in files.items() if not bands or b in bands]
    paths = []
    for f in files:
        p = Path(str(f))
        if p.is_dir():
            paths += [q for q in sorted(p.iterdir()) if q.is_file()
                      and (not bands or any(b.upper() in q.name.upper() for b in bands))]
        elif p.is_file():
            paths.append(p)
    return [FileRecord(path=str(p), sha256=sha256_file(p)) for p in paths]


def _foreground(img: SpatialImage, data: np.ndarray, background: float | None) -> tuple[np.ndarray, np.ndarray]:
    valid = img.valid_mask() & np.all(np.isfinite(data), axis=0)
    if img.nodata is not None and not np.isnan(img.nodata):
        valid &= ~np.all(data == img.nodata, axis=0)
    fg = valid if background is None else valid & np.any(data > background, axis=0)
    return valid, fg


@dataclass
class _Data:
    image: SpatialImage
    regions: dict[str, Region]
    gap: int
    train: PatchDataset
    val: list[EvalPair]
    test: list[EvalPair]
    norm: InputNormalization  # of the train region (fixed: the card's numbers)
    valid: np.ndarray


def _region_image(img: SpatialImage, data: np.ndarray, valid: np.ndarray, region: Region) -> SpatialImage:
    box = region.slices(data.shape[1:])
    start = [s.start for s in box]
    shape = [s.stop - s.start for s in box]
    return img.derive(data[(slice(None), *box)], geometry=img.geometry.cropped(start, shape), mask=valid[box])


def prepare_data(config: TrainConfig, img: SpatialImage, degradation: Any,
                 receptive_radius: tuple[int, ...]) -> _Data:
    """Split ``img``, fix the normalisation and build the train dataset and val/test pairs."""
    d = config.data
    data = np.ascontiguousarray(img.data, dtype=np.float32)
    nd = data.ndim - 1
    if d.planes is None and nd != config.spatial_dims:
        raise ConfigError(f"scale {config.scale} is for {config.spatial_dims}D but {img.source} is {nd}D; "
                          "use data.planes for a 2D network on a volume", img.source or None)
    for pair in d.planes or []:
        if max(pair) >= nd:
            raise ConfigError(f"data.planes {pair} names an axis the {nd}D source lacks", img.source or None)
    axis = d.split.axis
    if not 0 <= axis < nd:
        raise ConfigError(f"data.split.axis {axis} not in 0..{nd - 1}", img.source or None)
    valid, fg = _foreground(img, data, d.background)

    # extent of a training patch (margins included) and receptive radius along the split axis
    orientations = d.planes or [tuple(range(nd))]
    full = [p + 2 * d.margin * s for p, s in zip(config.patch_size, config.scale)]
    ext_axis, rr_axis = 1, 0
    for axes in orientations:
        if axis in axes:
            i = list(axes).index(axis)
            ext_axis = max(ext_axis, full[i])
            rr_axis = max(rr_axis, receptive_radius[i] * config.scale[i])
    gap = max(d.split.gap or 0, rr_axis + ext_axis)
    fr = {"train": d.split.train, "val": d.split.val, "test": d.split.test}
    need_eval = max(config.scale) * 4
    regions = split_regions(data.shape[1 + axis], axis=axis, fractions=fr, order=d.split.order, gap=gap,
                            min_sizes={"train": ext_axis, "val": need_eval, "test": need_eval},
                            source=img.source)

    spec = config.normalization
    fixed = _fixed_norm(spec, data, fg, regions["train"], img.source) if isinstance(spec, FixedNormSpec) else None

    def norm_of(region: Region) -> InputNormalization:
        if fixed is not None:
            return fixed
        assert isinstance(spec, PercentileNormSpec)
        return percentile_normalization(_region_image(img, data, valid, region), spec.low, spec.high)

    train_norm = norm_of(regions["train"])
    ds = PatchDataset(data, regions["train"], scale=config.scale, patch=config.patch_size,
                      degradation=degradation, norm=train_norm, foreground=fg,
                      min_foreground=d.min_foreground, planes=d.planes, margin=d.margin, augment=d.augment,
                      seed=config.seed, source=img.source)
    held = {}
    for name in ("val", "test"):
        held[name] = eval_pairs(data, regions[name], scale=config.scale, degradation=degradation,
                                norm=norm_of(regions[name]), valid=fg, foreground=fg, planes=d.planes,
                                max_planes=d.val_planes, min_foreground=d.min_foreground,
                                seed=config.seed + (1 if name == "val" else 2))
    return _Data(img, regions, gap, ds, held["val"], held["test"], train_norm, valid)


def _fixed_norm(spec: FixedNormSpec, data: np.ndarray, fg: np.ndarray, train: Region,
                source: str) -> InputNormalization:
    """The config's numbers, or the mean / std of the train region's foreground per channel."""
    if spec.offset is None or spec.scale is None:
        box = train.slices(data.shape[1:])
        vals = [data[c][box][fg[box]] for c in range(data.shape[0])]
        offset = spec.offset or [float(v.mean()) for v in vals]
        scale = spec.scale or [max(float(v.std()), 1e-6) for v in vals]
    else:
        offset, scale = spec.offset, spec.scale
    if len(offset) != data.shape[0] or len(scale) != data.shape[0]:
        raise ConfigError(f"normalization needs {data.shape[0]} offsets/scales", source or None)
    return InputNormalization(np.asarray(offset, np.float32), np.asarray(scale, np.float32))


# ---------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True)
class Baseline:
    """The best interpolation on a held-out region (by PSNR), scored once."""

    name: str
    psnr: float
    ssim: float


def _predict(net: nn.Module, pair: EvalPair, device: torch.device, amp: Any) -> np.ndarray:
    x = torch.from_numpy(normalize(pair.lr, pair.norm))[None].to(device)
    with torch.no_grad(), amp():
        y = net(x).float()[0].cpu().numpy()
    return denormalize(y, pair.norm)


def _border(pair: EvalPair, scale: tuple[int, ...]) -> np.ndarray:
    """Valid mask without a border of 2 LR pixels (both model and baseline are scored on it)."""
    m = pair.valid.copy()
    for a, s in enumerate(scale):
        b = min(2 * s, m.shape[a] // 4)
        if b:
            idx = [slice(None)] * m.ndim
            idx[a] = slice(0, b)
            m[tuple(idx)] = False
            idx[a] = slice(m.shape[a] - b, None)
            m[tuple(idx)] = False
    return m


def score(outputs: list[np.ndarray], pairs: list[EvalPair], scale: tuple[int, ...]) -> tuple[float, float, float, int]:
    """Pooled PSNR (mean over bands of ``10 log10(range^2 / MSE)`` with the MSE pooled over all
    pairs and the range = the HR's valid span per band over all pairs), pixel-weighted mean SSIM,
    the mean range and the number of scored pixels. Metrics come from :mod:`domainsr.audit.metrics`."""
    masks = [_border(p, scale) for p in pairs]
    keep = [i for i, m in enumerate(masks) if m.any()]
    if not keep:
        raise ConfigError("no valid pixel is left to score in the held-out region; check data.background")
    outputs, pairs, masks = [outputs[i] for i in keep], [pairs[i] for i in keep], [masks[i] for i in keep]
    counts = np.array([m.sum() for m in masks], dtype=np.float64)
    lo = np.min([[np.min(b[m]) for b in p.hr] for p, m in zip(pairs, masks)], axis=0)
    hi = np.max([[np.max(b[m]) for b in p.hr] for p, m in zip(pairs, masks)], axis=0)
    rng = np.maximum(hi - lo, 1e-12)
    mse = np.sum([M.mse(o, p.hr, m) * n for o, p, m, n in zip(outputs, pairs, masks, counts)], axis=0) / counts.sum()
    psnr = 10.0 * np.log10(rng ** 2 / np.maximum(mse, 1e-300))
    ssim = np.sum([M.ssim(o, p.hr, m, rng) * n for o, p, m, n in zip(outputs, pairs, masks, counts)],
                  axis=0) / counts.sum()
    return float(np.mean(psnr)), float(np.mean(ssim)), float(np.mean(rng)), int(counts.sum())


def best_baseline(pairs: list[EvalPair], config: TrainConfig, channels: int) -> Baseline:
    """Score every interpolation of :data:`BASELINES` (registry models) and keep the best."""
    from domainsr.models import build_model

    best = None
    for name in BASELINES:
        net = build_model(name, spatial_dims=config.spatial_dims, in_channels=channels, scale=config.scale)
        psnr, ssim, _, _ = score([_predict(net, p, torch.device("cpu"), nullcontext) for p in pairs], pairs,
                                 config.scale)
        if best is None or psnr > best.psnr:
            best = Baseline(name, psnr, ssim)
    assert best is not None
    return best


def evaluate(net: nn.Module, pairs: list[EvalPair], baseline: Baseline, config: TrainConfig,
             region: str, device: torch.device, amp: Any) -> RegionMetrics:
    """Model vs the best interpolation on one held-out region, in the data's units."""
    was = net.training
    net.eval()
    outs = [_predict(net, p, device, amp) for p in pairs]
    net.train(was)
    psnr, ssim, rng, n = score(outs, pairs, config.scale)
    return RegionMetrics(region=region, psnr=psnr, ssim=ssim, baseline=baseline.name,
                         psnr_baseline=baseline.psnr, ssim_baseline=baseline.ssim,
                         gain_db=psnr - baseline.psnr, data_range=rng, n_pixels=n,
                         description=f"{len(pairs)} {'plane' if config.data.planes else 'region'}(s); valid "
                                     f"{'foreground ' if config.data.background is not None else ''}pixels "
                                     "without a 2 LR px border; PSNR pooled over pixels, mean over bands")


# ---------------------------------------------------------------------------------------------
# optimisation helpers


def ema_model(net: nn.Module, decay: float) -> AveragedModel:
    """EMA of the weights (and buffers) with a warm-up: ``d_t = min(decay, (1 + t) / (10 + t))``,
    so short runs are not dominated by the initial weights."""

    @torch.no_grad()
    def update(avg: list[torch.Tensor], cur: list[torch.Tensor], n: torch.Tensor) -> None:
        t = float(n)
        d = min(decay, (1.0 + t) / (10.0 + t))
        torch._foreach_lerp_(avg, cur, 1.0 - d)

    return AveragedModel(net, multi_avg_fn=update, use_buffers=True)


def lr_factor(progress: float, schedule: str, step: int, warmup: int) -> float:
    w = min(1.0, (step + 1) / warmup) if warmup else 1.0
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return w * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "step":
        return w * 0.5 ** sum(p >= m for m in (0.5, 0.75, 0.9))
    return w


def _device(config: TrainConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")


def _amp(config: TrainConfig, device: torch.device) -> tuple[Callable[[], Any], torch.dtype | None]:
    """Autocast on CUDA only (bf16 where supported, else fp16); float32 on CPU."""
    if device.type != "cuda" or config.amp == "off":
        return nullcontext, None
    dtype = torch.float16 if config.amp == "fp16" or (
        config.amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


def _threads(config: TrainConfig) -> int:
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 1
    n = config.threads or avail
    torch.set_num_threads(n)
    return n


def robust_range(values: np.ndarray) -> tuple[float, float]:
    """The card's expected input range: the 0.1-99.9 percentiles of the training values (never empty)."""
    lo, hi = float(np.percentile(values, 0.1)), float(np.percentile(values, 99.9))
    return (lo, hi) if hi > lo else (lo, lo + 1.0)


def _fingerprint(config: TrainConfig) -> str:
    """What must not change between a run and its resumption (budgets and cadences may)."""
    keep = config.model_dump(mode="json", exclude={"steps", "max_minutes", "val_every", "save_every",
                                                   "threads", "device", "amp", "card"})
    keep["gan"] = {k: v for k, v in keep["gan"].items() if k not in ("steps", "max_minutes")}
    if keep.get("guide") is None:  # unguided runs hash as before the guide option existed
        keep.pop("guide", None)
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()


def _batches(ds: PatchDataset, batch: int, first_step: int, last_step: int, offset: int,
             workers: int) -> Any:
    """Batches for steps ``first_step..last_step-1``; item ``i`` of step ``s`` is ``(s + offset) * B + i``."""
    idx = range((first_step + offset) * batch, (last_step + offset) * batch)
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=idx, num_workers=workers,
                                            drop_last=True))


# ---------------------------------------------------------------------------------------------
# the run


class _Run:
    """Mutable state of one training run (what ``state.pt`` holds)."""

    def __init__(self, config: TrainConfig, net: nn.Module, device: torch.device) -> None:
        self.config = config
        self.net = net
        self.ema = ema_model(net, config.ema_decay)
        self.opt = torch.optim.Adam(net.parameters(), lr=config.lr, betas=(0.9, 0.99),
                                    weight_decay=config.weight_decay)
        self.disc: nn.Module | None = None
        self.opt_d: torch.optim.Optimizer | None = None
        self.stage = "psnr"
        self.step = 0
        self.gan_step = 0
        self.elapsed = {"psnr": 0.0, "gan": 0.0}
        self.stopped_by = {"psnr": "", "gan": ""}
        self.losses: list[tuple[int, float]] = []
        self.val_history: list[dict[str, Any]] = []
        self.device = device

    def state(self) -> dict[str, Any]:
        s = {"fingerprint": _fingerprint(self.config), "stage": self.stage, "step": self.step,
             "gan_step": self.gan_step, "elapsed": dict(self.elapsed), "stopped_by": dict(self.stopped_by),
             "net": self.net.state_dict(), "ema": self.ema.state_dict(), "opt": self.opt.state_dict(),
             "losses": [list(t) for t in self.losses], "val_history": json.dumps(self.val_history)}
        if self.disc is not None and self.opt_d is not None:
            s["disc"] = self.disc.state_dict()
            s["opt_d"] = self.opt_d.state_dict()
        return s

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            torch.save(self.state(), tmp)

    def load(self, path: Path) -> None:
        s = torch.load(path, map_location=self.device, weights_only=True)
        if s["fingerprint"] != _fingerprint(self.config):
            raise ConfigError("the run state was made with a different config (model, data, degradation, "
                              "patches or losses); start a new run or restore that config", path)
        self.stage, self.step, self.gan_step = s["stage"], int(s["step"]), int(s["gan_step"])
        self.elapsed, self.stopped_by = dict(s["elapsed"]), dict(s["stopped_by"])
        self.losses = [(int(a), float(b)) for a, b in s["losses"]]
        self.val_history = json.loads(s["val_history"])
        if self.stage == "gan":
            self.start_gan(init=False)
            assert self.disc is not None and self.opt_d is not None
            self.disc.load_state_dict(s["disc"])
            self.opt_d.load_state_dict(s["opt_d"])
        self.net.load_state_dict(s["net"])
        self.ema.load_state_dict(s["ema"])
        self.opt.load_state_dict(s["opt"])

    def start_gan(self, init: bool = True) -> None:
        """Generator from the PSNR stage's EMA weights, fresh EMA, Adam, and the discriminator."""
        from domainsr.models import build_model

        g = self.config.gan
        if init:
            self.net.load_state_dict(self.ema.module.state_dict())
        self.ema = ema_model(self.net, self.config.ema_decay)
        self.opt = torch.optim.Adam(self.net.parameters(), lr=g.lr_g, betas=(0.9, 0.99))
        c = self.net.in_channels
        self.disc = build_model(g.discriminator.name, spatial_dims=self.config.spatial_dims, in_channels=c,
                                **g.discriminator.kwargs).to(self.device)
        self.opt_d = torch.optim.Adam(self.disc.parameters(), lr=g.lr_d, betas=(0.9, 0.99))
        self.stage = "gan"


def train(config: TrainConfig, *, resume: bool = False, image: SpatialImage | None = None,
          on_step: Callback | None = None) -> TrainResult:
    """Train, validate, test and save a model as ``config`` says (see the module docstring).

    ``image`` replaces ``config.data.source`` (already read, e.g. by a flow); ``on_step`` gets a
    dict after every step and every validation (progress reporting; raising stops the run, and
    the last saved state can be resumed).
    """
    from domainsr.degrade import build_degradation
    from domainsr.models import build_model

    if config.guide is not None:  # two-grid (guided) training: its own data and card, this loop
        from domainsr.train.guided import train_guided

        return train_guided(config, resume=resume, image=image, on_step=on_step)
    threads = _threads(config)
    device = _device(config)
    amp, amp_dtype = _amp(config, device)
    torch.manual_seed(config.seed)
    img = image if image is not None else load_source(config)
    if img.domain != config.domain:
        raise ConfigError(f"config is for {config.domain} but the source is {img.domain}", img.source or None)
    degradation = build_degradation(config.degradation)
    factors = getattr(degradation, "factors", None)
    if factors is not None and tuple(factors(config.spatial_dims)) != tuple(config.scale):
        raise ConfigError(f"the degradation reduces by {tuple(factors(config.spatial_dims))} per axis but "
                          f"scale is {tuple(config.scale)}")
    try:
        net = build_model(config.model.name, spatial_dims=config.spatial_dims, in_channels=img.channels,
                          scale=config.scale, **config.model.kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot build model {config.model.name!r}: {exc}") from exc
    if config.init_from:
        _init_from(net, config, img.channels)
    rr = tuple(int(r) for r in np.broadcast_to(np.asarray(net.receptive_radius), (config.spatial_dims,)))
    data = prepare_data(config, img, degradation, rr)
    net.to(device)
    run = _Run(config, net, device)
    run_dir = Path(config.output.run_dir) / config.output.name
    state_path = run_dir / "state.pt"
    if resume and state_path.exists():
        run.load(state_path)
        log.info("resumed %s after %d PSNR and %d GAN steps", config.output.name, run.step, run.gan_step)
    elif resume:
        log.info("no state at %s: starting afresh", state_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    baselines = {r: best_baseline(getattr(data, r), config, img.channels) for r in ("val", "test")}
    log.info("training %s: %s on %s (%s), regions %s, gap %d px, %d threads, device %s%s",
             config.output.name, config.model.name, img.source or "image", list(img.band_names),
             {k: (v.start, v.stop) for k, v in data.regions.items()}, data.gap, threads, device,
             f", autocast {amp_dtype}" if amp_dtype else "")

    validate = validator(run, lambda: evaluate(run.ema.module, data.val, baselines["val"], config, "val", device,
                                               amp), on_step)
    if run.stage == "psnr":
        _psnr_stage(run, data, config, amp, amp_dtype, state_path, validate, on_step)
        if config.gan.enabled:
            run.start_gan()
            run.save(state_path)
    if config.gan.enabled and run.stage == "gan":
        _gan_stage(run, data, config, amp, amp_dtype, state_path, validate, on_step)

    val = evaluate(run.ema.module, data.val, baselines["val"], config, "val", device, amp)
    test = evaluate(run.ema.module, data.test, baselines["test"], config, "test", device, amp)
    log.info("test region: PSNR %.2f dB vs %s %.2f (gain %+.2f), SSIM %.4f vs %.4f", test.psnr,
             test.baseline, test.psnr_baseline, test.gain_db, test.ssim, test.ssim_baseline)
    final = copy.deepcopy(run.ema.module).cpu().eval()
    card = _card(config, data, final, rr, val, test, run, device, threads, degradation.describe())
    out_dir = Path(config.output.dir) / config.output.name
    path = save_checkpoint(final, card, out_dir)
    log.info("saved %s", path)
    seconds = run.elapsed["psnr"] + run.elapsed["gan"]
    stopped = run.stopped_by["gan"] or run.stopped_by["psnr"]
    return TrainResult(checkpoint=path, card=read_card(path),
                       run_dir=run_dir, steps=run.step, gan_steps=run.gan_step, seconds=seconds,
                       stopped_by=stopped, losses=run.losses, val_history=run.val_history, val=val, test=test)


def _init_from(net: nn.Module, config: TrainConfig, channels: int) -> None:
    from domainsr.models.checkpoints import load_checkpoint

    assert config.init_from is not None
    model, card = load_checkpoint(config.init_from)
    want = (config.model.name, config.model.kwargs, tuple(config.scale), channels)
    got = (card.architecture.name, card.architecture.kwargs, tuple(card.scale), card.in_channels)
    if want != got:
        raise ConfigError(f"init_from {config.init_from!r} is {got[0]} {got[1]} x{got[2]} with {got[3]} channels; "
                          f"this run builds {want[0]} {want[1]} x{want[2]} with {want[3]}")
    net.load_state_dict(model.net.state_dict())
    log.info("initialised from %s (sha256 %s)", config.init_from, card.weights_sha256[:12])


def _log_every(steps: int) -> int:
    return max(1, min(50, steps // 20 or 1))


def _loop(run: _Run, data: _Data, config: TrainConfig, stage: str, total: int, minutes: float,
          offset: int, one_step: Callable[[torch.Tensor, torch.Tensor, float], float], base_lrs: list[float],
          state_path: Path, validate: Callable[[str, int], RegionMetrics], on_step: Callback | None) -> None:
    """Shared step loop: batches, LR schedule, budgets, EMA, logging, validation and state saves."""
    start = run.step if stage == "psnr" else run.gan_step
    if start >= total:
        run.stopped_by[stage] = run.stopped_by[stage] or "steps"
        return
    budget = minutes * 60.0
    if run.elapsed[stage] >= budget:
        run.stopped_by[stage] = "time"
        return
    batches = _batches(data.train, config.batch_size, start, total, offset, workers=0)
    t0, e0 = time.perf_counter(), run.elapsed[stage]
    window: list[float] = []
    run.stopped_by[stage] = "steps"
    every = _log_every(total)
    for step in range(start, total):
        elapsed = e0 + time.perf_counter() - t0
        if elapsed >= budget:
            run.stopped_by[stage] = "time"
            break
        progress = max(step / total, elapsed / budget)
        f = lr_factor(progress, config.schedule if stage == "psnr" else "step", step, config.warmup_steps)
        for g, base in zip(run.opt.param_groups, base_lrs):
            g["lr"] = base * f
        lr_t, hr_t = next(batches)
        loss = one_step(lr_t.to(run.device, non_blocking=True), hr_t.to(run.device, non_blocking=True), f)
        if not math.isfinite(loss):
            raise ModelError(f"{stage} loss became {loss} at step {step + 1}; lower the learning rate")
        run.ema.update_parameters(run.net)
        if stage == "psnr":
            run.step = step + 1
        else:
            run.gan_step = step + 1
        done = step + 1
        run.elapsed[stage] = e0 + time.perf_counter() - t0
        window.append(loss)
        if done % every == 0 or done == total:
            run.losses.append((done if stage == "psnr" else run.step + done, float(np.mean(window))))
            log.info("%s step %d/%d: loss %.5f, lr %.2e, %.1f s", stage, done, total, np.mean(window),
                     base_lrs[0] * f, run.elapsed[stage])
            window = []
        if done % config.val_every == 0 and done < total:
            validate(stage, done)
        if done % config.save_every == 0 and done < total:
            run.save(state_path)
        if on_step:
            on_step({"event": "step", "stage": stage, "step": done, "loss": loss, "lr": base_lrs[0] * f,
                     "elapsed": run.elapsed[stage]})
    if window:
        run.losses.append((run.step if stage == "psnr" else run.step + run.gan_step, float(np.mean(window))))
    run.save(state_path)


def validator(run: _Run, evaluate_val: Callable[[], RegionMetrics], on_step: Callback | None
              ) -> Callable[[str, int], RegionMetrics]:
    """The ``validate(stage, step)`` the stages call: score the validation region with
    ``evaluate_val``, record it in the run's history, log it and tell ``on_step``."""
    def validate(stage: str, step: int) -> RegionMetrics:
        m = evaluate_val()
        entry = {"stage": stage, "step": step, **m.model_dump(include={"psnr", "ssim", "psnr_baseline",
                                                                      "ssim_baseline", "gain_db"})}
        run.val_history.append(entry)
        log.info("%s step %d: val PSNR %.2f dB (%s %.2f, gain %+.2f), SSIM %.4f (%.4f)", stage, step,
                 m.psnr, m.baseline, m.psnr_baseline, m.gain_db, m.ssim, m.ssim_baseline)
        if on_step:
            on_step({"event": "validation", **entry})
        return m

    return validate


def _psnr_stage(run: _Run, data: _Data, config: TrainConfig, amp: Any, amp_dtype: torch.dtype | None,
                state_path: Path, validate: Callable[[str, int], RegionMetrics], on_step: Callback | None) -> None:
    criterion = PixelLoss(config.loss, config.spatial_dims)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net, opt = run.net, run.opt
    net.train()

    def one_step(lr_t: torch.Tensor, hr_t: torch.Tensor, _: float) -> float:
        opt.zero_grad(set_to_none=True)
        with amp():
            loss = criterion(net(lr_t).float(), hr_t)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    _loop(run, data, config, "psnr", config.steps, config.max_minutes, 0, one_step, [config.lr],
          state_path, validate, on_step)


def _gan_stage(run: _Run, data: _Data, config: TrainConfig, amp: Any, amp_dtype: torch.dtype | None,
               state_path: Path, validate: Callable[[str, int], RegionMetrics], on_step: Callback | None) -> None:
    g = config.gan
    assert run.disc is not None and run.opt_d is not None
    net, disc, opt, opt_d = run.net, run.disc, run.opt, run.opt_d
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net.train()
    disc.train()

    def one_step(lr_t: torch.Tensor, hr_t: torch.Tensor, f: float) -> float:
        for group in opt_d.param_groups:
            group["lr"] = g.lr_d * f
        # D(real) once: its graph serves the D loss, its detached value the generator's
        disc.requires_grad_(True)
        with amp():
            real = disc(hr_t).float()
            sr = net(lr_t).float()
        disc.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
        with amp():
            fake = disc(sr).float()
            loss_g = (g.pixel * l1(sr, hr_t) + g.gradient * gradient_l1(sr, hr_t)
                      + g.frequency * frequency_l1(sr, hr_t) + g.adversarial * ragan_g_loss(real.detach(), fake))
        scaler.scale(loss_g).backward()
        scaler.step(opt)
        # discriminator
        disc.requires_grad_(True)
        opt_d.zero_grad(set_to_none=True)
        with amp():
            loss_d = ragan_d_loss(real, disc(sr.detach()).float())
        scaler.scale(loss_d).backward()
        scaler.step(opt_d)
        scaler.update()
        return float(loss_g.detach())

    _loop(run, data, config, "gan", g.steps, g.max_minutes, config.steps, one_step, [g.lr_g], state_path,
          validate, on_step)


def _card(config: TrainConfig, data: _Data, net: nn.Module, rr: tuple[int, ...], val: RegionMetrics,
          test: RegionMetrics, run: _Run, device: torch.device, threads: int,
          degradation: dict[str, Any]) -> ModelCard:
    img = data.image
    c = config.card
    generic = all(b == f"band{i + 1}" for i, b in enumerate(img.band_names))
    bands = list(config.data.bands) or ([] if generic else list(img.band_names))
    if isinstance(config.normalization, FixedNormSpec):
        norm: FixedNormalization | PercentileNormalization = FixedNormalization(
            offset=[float(v) for v in data.norm.offset], scale=[float(v) for v in data.norm.scale])
    else:
        norm = PercentileNormalization(low=config.normalization.low, high=config.normalization.high)
    if c.input_range is not None:
        in_range = c.input_range
    else:
        box = data.regions["train"].slices(img.spatial_shape)
        in_range = robust_range(np.asarray(img.data, np.float32)[(slice(None), *box)][:, data.valid[box]])
    split = {"axis": config.data.split.axis, "order": list(config.data.split.order), "gap_px": data.gap,
             "regions": {k: [v.start, v.stop] for k, v in data.regions.items()},
             "units": "source pixels along the axis (end exclusive)",
             "note": "train patches (with their degradation margin) lie inside the train region; val/test "
                     "are degraded as wholes, so no val/test pixel is seen in training; the gap is at "
                     "least the receptive radius plus the patch extent along the axis"}
    if config.data.planes:
        split["planes"] = [list(p) for p in config.data.planes]
    desc = (f"{img.source or 'image'} ({img.domain}, shape {list(img.data.shape)}, units "
            f"{img.units or DEFAULT_UNITS[config.domain]}); pairs made on the fly with the degradation below")
    application = "slicewise" if config.data.planes else "direct"
    return ModelCard(
        name=config.output.name, version=c.version,
        architecture=Architecture(name=config.model.name, kwargs=config.model.kwargs),
        domain=config.domain, spatial_dims=config.spatial_dims, scale=tuple(config.scale),
        in_channels=int(net.in_channels), out_channels=int(net.out_channels), bands=bands,
        channel_meaning=c.channel_meaning, units=c.units or img.units or DEFAULT_UNITS[config.domain],
        input_range=in_range, normalization=norm, receptive_radius=rr, application=application,
        degradation=degradation,
        training_data=TrainingData(source=config.data.source, files=_source_files(img, bands), bands=bands,
                                   split=split, description=desc),
        training=training_settings(config, run, device, threads),
        metrics={"val": val, "test": test},
        license=c.license, intended_use=c.intended_use, limitations=c.limitations)


def training_settings(config: TrainConfig, run: _Run, device: torch.device, threads: int) -> TrainingSettings:
    """What the card records about how the weights were trained (shared with guided training)."""
    return TrainingSettings(
        steps=run.step, gan_steps=run.gan_step, seconds=round(run.elapsed["psnr"] + run.elapsed["gan"], 1),
        device=f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()})",
        threads=threads, seed=config.seed, batch_size=config.batch_size, patch_size=list(config.patch_size),
        lr=config.lr, loss=config.loss.pixel + "".join(
            f" + {w:g} {k}" for k, w in (("ssim", config.loss.ssim), ("frequency", config.loss.frequency),
                                         ("gradient", config.loss.gradient)) if w),
        stopped_by=run.stopped_by["gan"] or run.stopped_by["psnr"],
        extra={"ema_decay": config.ema_decay, "schedule": config.schedule,
               "gan": config.gan.model_dump(mode="json") if config.gan.enabled else None,
               "torch": torch.__version__})
