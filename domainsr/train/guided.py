"""Guided (DSen2-style) training: two-grid pairs by Wald's protocol, the trainer's PSNR loop.

A config with ``guide:`` (see :class:`~domainsr.train.config.GuideSpec`) trains ``guided_rescnn``
to super-resolve ``data.bands`` with ``guide.bands`` of the same scene on a grid ``scale`` times
finer (Sentinel-2: B05-B07, B8A, B11, B12 at 20 m guided by B02-B04, B08 at 10 m). Training pairs
are made one level down (Lanaras et al. 2018): *all* bands are degraded by ``scale`` with their own
sensor PSF, and the net learns ``(target at 40 m, guide at 20 m) -> target at 20 m``; inference
applies it one level up, ``(target at 20 m, guide at 10 m) -> target at 10 m``
(:mod:`domainsr.engine.guided`). Scale invariance of the mapping is the method's assumption.

Everything else is the trainer's (:mod:`domainsr.train.trainer`): the spatial split with its gap
(rows: train on top, then val, test at the bottom; the test region is never trained on), fixed
per-band normalisation measured on the train region, the PSNR stage with EMA, budgets, resume and
validation against the best interpolation of the target bands. Batches carry the two grids packed
into one LR-grid tensor (:func:`domainsr.models.guided.pack`), so the trainer's loop runs unchanged
on a :class:`~domainsr.models.guided.PackedGuided` view of the net.
"""
from __future__ import annotations

import copy
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from domainsr.errors import ConfigError, ModelError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.models.checkpoints import (
    Architecture,
    FixedNormalization,
    InputNormalization,
    ModelCard,
    RegionMetrics,
    TrainingData,
    read_card,
    save_checkpoint,
)
from domainsr.models.guided import PackedGuided, pack
from domainsr.train.config import FixedNormSpec, TrainConfig
from domainsr.train.datasets import Degradation, PatchDataset, Region, denormalize, normalize, split_regions
from domainsr.train.trainer import (
    BASELINES,
    DEFAULT_UNITS,
    Baseline,
    Callback,
    TrainResult,
    _amp,
    _device,
    _fixed_norm,
    _foreground,
    _psnr_stage,
    _Run,
    _source_files,
    _threads,
    robust_range,
    score,
    source_path,
    training_settings,
    validator,
)

log = logging.getLogger("domainsr.train")


def load_guided_source(config: TrainConfig) -> tuple[SpatialImage, SpatialImage]:
    """``(target, guide)``: ``data.bands`` and ``guide.bands`` of the band set ``data.source``,
    cropped to nested grids (``guide.geometry == target.geometry.scaled(scale)``)."""
    from domainsr.io import read_image

    path = source_path(config)
    img = read_image(path)
    if not isinstance(img, MultiResolutionImage):
        raise ConfigError("guided training needs a band set with bands at two resolutions "
                          "(a Sentinel-2 or Landsat 8 folder)", path)
    return _two_grid(img, config)


def _two_grid(img: MultiResolutionImage, config: TrainConfig) -> tuple[SpatialImage, SpatialImage]:
    from domainsr.engine.guided import guided_inputs

    assert config.guide is not None
    missing = [b for b in (*config.data.bands, *config.guide.bands) if b not in img.band_names]
    if missing or not config.data.bands:
        raise ConfigError(f"bands {missing or 'data.bands'} not in {list(img.band_names)}",
                          img.provenance.get("source") or None)
    return guided_inputs(img, config.data.bands, config.guide.bands, config.scale, resample=True)


# ---------------------------------------------------------------------------------------------
# pairs


def _hr_box(box: tuple[slice, ...], scale: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(b.start * f, b.stop * f) for b, f in zip(box, scale))


class GuidedPatchDataset(PatchDataset):
    """Random training pairs ``(packed input, target)`` from the train region of two grids.

    Boxes are drawn on the target grid exactly as :class:`PatchDataset` draws them (foreground,
    margin, seeds); the guide's box covers the same ground. Both are flipped/rotated alike, the
    target is degraded by ``scale`` with ``degradation`` and the guide with ``guide_degradation``
    (one level down), margins are cropped, and the item is ``pack(lr, guide)`` ``(Ct + Cg * prod(s),
    *patch // s)`` with the target patch ``(Ct, *patch)``, normalised with ``norm``/``guide_norm``.
    """

    def __init__(self, data: np.ndarray, guide: np.ndarray, region: Region, *, scale: tuple[int, ...],
                 patch: tuple[int, ...], degradation: Degradation, guide_degradation: Degradation,
                 norm: InputNormalization, guide_norm: InputNormalization,
                 foreground: np.ndarray | None = None, min_foreground: float = 0.5, margin: int = 4,
                 augment: bool = True, seed: int = 0,
                 length: int = 2**62, source: str = "") -> None:
        super().__init__(data, region, scale=scale, patch=patch, degradation=degradation, norm=norm,
                         foreground=foreground, min_foreground=min_foreground, margin=margin, augment=augment,
                         seed=seed, length=length, source=source)
        want = tuple(n * f for n, f in zip(data.shape[1:], self.scale))
        if tuple(guide.shape[1:]) != want:
            raise ConfigError(f"guide shape {guide.shape[1:]} is not the target's {data.shape[1:]} "
                              f"x {self.scale}", source or None)
        self.guide = guide
        self.guide_degradation = guide_degradation
        self.guide_norm = guide_norm

    def guide_box(self, index: int) -> tuple[slice, ...]:
        """Guide index box (margin included) that item ``index`` reads: for leakage checks."""
        return _hr_box(self.sample_box(index), self.scale)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng((self.seed, int(index)))
        _, box = self._draw(rng)
        hr = self.data[(slice(None), *box)]
        g = self.guide[(slice(None), *_hr_box(box, self.scale))]
        if self.augment:
            for a in range(hr.ndim - 1):
                if rng.random() < 0.5:
                    hr, g = np.flip(hr, axis=a + 1), np.flip(g, axis=a + 1)
            for i, j in self.rot_axes:
                k = int(rng.integers(4))
                hr, g = np.rot90(hr, k=k, axes=(i + 1, j + 1)), np.rot90(g, k=k, axes=(i + 1, j + 1))
        hr = np.ascontiguousarray(hr, dtype=np.float32)
        g = np.ascontiguousarray(g, dtype=np.float32)
        lr = np.asarray(self.degradation(hr, rng), dtype=np.float32)
        gd = np.asarray(self.guide_degradation(g, rng), dtype=np.float32)
        want = tuple(f // s for f, s in zip(self.full, self.scale))
        if lr.shape[1:] != want or gd.shape[1:] != hr.shape[1:]:
            raise ConfigError(f"degradations returned {lr.shape[1:]} (target) and {gd.shape[1:]} (guide) for "
                              f"{hr.shape[1:]} and {g.shape[1:]}, expected {want} and {hr.shape[1:]}")
        m = self.margin
        if m:
            lr = lr[(slice(None), *[slice(m, n - m) for n in want])]
            core = (slice(None), *[slice(m * s, n - m * s) for n, s in zip(self.full, self.scale)])
            hr, gd = hr[core], gd[core]
        x = pack(torch.from_numpy(normalize(lr, self.norm))[None],
                 torch.from_numpy(normalize(gd, self.guide_norm))[None], self.scale)[0]
        return x, torch.from_numpy(normalize(hr, self.norm))


@dataclass
class GuidedEvalPair:
    """A held-out region: target ``hr``, its degraded ``lr``, the degraded ``guide`` (on the hr
    grid) and the valid mask over ``hr`` (``score`` reads ``hr`` and ``valid``)."""

    hr: np.ndarray
    lr: np.ndarray
    guide: np.ndarray
    valid: np.ndarray


def guided_eval_pair(data: np.ndarray, guide: np.ndarray, region: Region, *, scale: tuple[int, ...],
                     degradation: Degradation, guide_degradation: Degradation, valid: np.ndarray,
                     seed: int) -> GuidedEvalPair:
    """Degrade a whole held-out region once (deterministic ``seed``)."""
    box = region.slices(data.shape[1:])
    box = tuple(slice(b.start, b.start + ((b.stop - b.start) // f) * f) for b, f in zip(box, scale))
    rng = np.random.default_rng((seed, 0x5EED))
    hr = np.ascontiguousarray(data[(slice(None), *box)], dtype=np.float32)
    g = np.ascontiguousarray(guide[(slice(None), *_hr_box(box, scale))], dtype=np.float32)
    return GuidedEvalPair(hr, np.asarray(degradation(hr, rng), np.float32),
                          np.asarray(guide_degradation(g, rng), np.float32), np.ascontiguousarray(valid[box]))


@dataclass
class GuidedData:
    """Both grids, the split, the train dataset, the held-out pairs and the normalisations."""

    target: SpatialImage
    guide: SpatialImage
    regions: dict[str, Region]
    gap: int
    train: GuidedPatchDataset
    val: list[GuidedEvalPair]
    test: list[GuidedEvalPair]
    norm: InputNormalization
    guide_norm: InputNormalization
    valid: np.ndarray


def _on_lr_grid(mask: np.ndarray, scale: tuple[int, ...]) -> np.ndarray:
    """Per coarse pixel: all of its ``scale`` block of fine pixels set."""
    shape = [v for n, f in zip(mask.shape, scale) for v in (n // f, f)]
    return mask.reshape(shape).all(axis=tuple(range(1, 2 * len(scale), 2)))


def _on_hr_grid(mask: np.ndarray, scale: tuple[int, ...]) -> np.ndarray:
    """Nearest upsampling of a coarse mask onto the fine grid."""
    for a, f in enumerate(scale):
        mask = np.repeat(mask, f, axis=a)
    return mask


def prepare_guided_data(config: TrainConfig, target: SpatialImage, guide: SpatialImage,
                        degradation: Degradation, guide_degradation: Degradation,
                        receptive_radius: tuple[int, ...]) -> GuidedData:
    """Split the target grid along ``data.split.axis`` with the trainer's gap rule (receptive
    radius plus patch extent), fix both normalisations on the train region and make the pairs."""
    d, s = config.data, tuple(config.scale)
    data = np.ascontiguousarray(target.data, dtype=np.float32)
    gdata = np.ascontiguousarray(guide.data, dtype=np.float32)
    nested = tuple(gdata.shape[1:]) == tuple(n * f for n, f in zip(data.shape[1:], s))
    if data.ndim - 1 != config.spatial_dims or not nested:
        raise ConfigError(f"target {data.shape[1:]} and guide {gdata.shape[1:]} are not nested grids at "
                          f"scale {s}", target.source or None)
    valid_t, fg_t = _foreground(target, data, d.background)
    valid_g, _ = _foreground(guide, gdata, None)
    g_ok = _on_lr_grid(valid_g, s)
    valid, fg = valid_t & g_ok, fg_t & g_ok
    axis = d.split.axis
    if not 0 <= axis < config.spatial_dims:
        raise ConfigError(f"data.split.axis {axis} not in 0..{config.spatial_dims - 1}",
                          target.source or None)
    full = [p + 2 * d.margin * f for p, f in zip(config.patch_size, s)]
    gap = max(d.split.gap or 0, receptive_radius[axis] * s[axis] + full[axis])  # trainer.prepare_data's rule
    fr = {"train": d.split.train, "val": d.split.val, "test": d.split.test}
    regions = split_regions(data.shape[1 + axis], axis=axis, fractions=fr, order=d.split.order, gap=gap,
                            min_sizes={"train": full[axis], "val": 4 * max(s), "test": 4 * max(s)},
                            source=target.source)
    spec = config.normalization
    assert isinstance(spec, FixedNormSpec)
    ct = data.shape[0]

    def part(v: list[float] | None, sl: slice) -> list[float] | None:
        return None if v is None else v[sl]

    n_all = ct + gdata.shape[0]
    for name, v in (("offsets", spec.offset), ("scales", spec.scale)):
        if v is not None and len(v) != n_all:
            raise ConfigError(f"normalization needs {n_all} {name} (target bands, then guide bands)")
    train = regions["train"]
    norm = _fixed_norm(FixedNormSpec(offset=part(spec.offset, slice(0, ct)),
                                     scale=part(spec.scale, slice(0, ct))), data, fg, train, target.source)
    g_region = Region("train", axis, train.start * s[axis], train.stop * s[axis])
    g_fg = valid_g & _on_hr_grid(fg, s)
    guide_norm = _fixed_norm(FixedNormSpec(offset=part(spec.offset, slice(ct, None)),
                                           scale=part(spec.scale, slice(ct, None))), gdata, g_fg, g_region,
                             guide.source)
    ds = GuidedPatchDataset(data, gdata, train, scale=s, patch=tuple(config.patch_size),
                            degradation=degradation, guide_degradation=guide_degradation, norm=norm,
                            guide_norm=guide_norm, foreground=fg, min_foreground=d.min_foreground,
                            margin=d.margin, augment=d.augment, seed=config.seed, source=target.source)
    held = {name: [guided_eval_pair(data, gdata, regions[name], scale=s, degradation=degradation,
                                    guide_degradation=guide_degradation, valid=fg,
                                    seed=config.seed + (1 if name == "val" else 2))]
            for name in ("val", "test")}
    return GuidedData(target, guide, regions, gap, ds, held["val"], held["test"], norm, guide_norm, valid)


# ---------------------------------------------------------------------------------------------
# evaluation


def predict_guided(net: nn.Module, pair: GuidedEvalPair, data: GuidedData, device: torch.device,
                   amp: Any = nullcontext) -> np.ndarray:
    """A :class:`PackedGuided` net's output for a held-out pair, in the data's units."""
    x = pack(torch.from_numpy(normalize(pair.lr, data.norm))[None],
             torch.from_numpy(normalize(pair.guide, data.guide_norm))[None], net.scale)
    with torch.no_grad(), amp():
        y = net(x.to(device)).float()[0].cpu().numpy()
    return denormalize(y, data.norm)


def best_baseline_guided(pairs: list[GuidedEvalPair], config: TrainConfig) -> Baseline:
    """The best interpolation of the target bands alone (by PSNR) on held-out ``pairs``."""
    from domainsr.models import build_model

    best = None
    for name in BASELINES:
        net = build_model(name, spatial_dims=config.spatial_dims, in_channels=pairs[0].lr.shape[0],
                          scale=config.scale)
        with torch.no_grad():
            outs = [net(torch.from_numpy(p.lr)[None])[0].numpy() for p in pairs]
        psnr, ssim, _, _ = score(outs, pairs, tuple(config.scale))
        if best is None or psnr > best.psnr:
            best = Baseline(name, psnr, ssim)
    assert best is not None
    return best


def evaluate_guided(net: nn.Module, data: GuidedData, region: str, baseline: Baseline, config: TrainConfig,
                    device: torch.device, amp: Any = nullcontext) -> RegionMetrics:
    """Model vs the best interpolation of the target bands on one held-out region."""
    pairs = getattr(data, region)
    was = net.training
    net.eval()
    outs = [predict_guided(net, p, data, device, amp) for p in pairs]
    net.train(was)
    psnr, ssim, rng, n = score(outs, pairs, tuple(config.scale))
    return RegionMetrics(region=region, psnr=psnr, ssim=ssim, baseline=baseline.name,
                         psnr_baseline=baseline.psnr, ssim_baseline=baseline.ssim,
                         gain_db=psnr - baseline.psnr, data_range=rng, n_pixels=n,
                         description="whole region, Wald's protocol (all bands degraded by the scale); "
                                     "valid pixels without a 2 LR px border; PSNR per band on its true "
                                     "range, pooled over pixels, mean over bands; baseline: interpolation "
                                     "of the target bands")


# ---------------------------------------------------------------------------------------------
# the run


def train_guided(config: TrainConfig, *, resume: bool = False, image: MultiResolutionImage | None = None,
                 on_step: Callback | None = None) -> TrainResult:
    """Train, validate, test and save a guided model as ``config`` says (``image``: the band set
    to use instead of ``data.source``). Called by :func:`domainsr.train.trainer.train`."""
    from domainsr.degrade import build_degradation
    from domainsr.models import build_model

    if config.guide is None:
        raise ConfigError("guided training needs a guide: section")
    threads = _threads(config)
    device = _device(config)
    amp, amp_dtype = _amp(config, device)
    torch.manual_seed(config.seed)
    if image is not None and not isinstance(image, MultiResolutionImage):
        raise ConfigError("guided training takes a band set (MultiResolutionImage) as image")
    target, guide = _two_grid(image, config) if image is not None else load_guided_source(config)
    if target.domain != config.domain:
        raise ConfigError(f"config is for {config.domain} but the source is {target.domain}",
                          target.source or None)
    degradation = build_degradation(config.degradation)
    guide_degradation = build_degradation(config.guide.degradation)
    for name, deg in (("degradation", degradation), ("guide.degradation", guide_degradation)):
        factors = getattr(deg, "factors", None)
        if factors is not None and tuple(factors(config.spatial_dims)) != tuple(config.scale):
            raise ConfigError(f"{name} reduces by {tuple(factors(config.spatial_dims))} per axis but scale "
                              f"is {tuple(config.scale)} (Wald's protocol degrades every band by the scale)")
    kwargs = {**config.model.kwargs, "guide_channels": guide.channels}
    if config.model.kwargs.get("guide_channels", guide.channels) != guide.channels:
        raise ConfigError(f"model.kwargs.guide_channels differs from the {guide.channels} guide bands")
    try:
        net = build_model(config.model.name, spatial_dims=config.spatial_dims,
                          in_channels=target.channels + guide.channels, scale=config.scale, **kwargs)
    except ModelError:
        raise
    except Exception as exc:
        raise ConfigError(f"cannot build model {config.model.name!r}: {exc}") from exc
    if not hasattr(net, "guide_channels"):
        raise ConfigError(f"model {config.model.name!r} is not a guided model (use guided_rescnn)")
    bands = [*target.band_names, *guide.band_names]
    if config.init_from:
        _init_from(net, config, kwargs, bands)
    rr = tuple(int(r) for r in net.receptive_radius)
    data = prepare_guided_data(config, target, guide, degradation, guide_degradation, rr)
    packed = PackedGuided(net).to(device)
    run = _Run(config, packed, device)
    run_dir = Path(config.output.run_dir) / config.output.name
    state_path = run_dir / "state.pt"
    if resume and state_path.exists():
        run.load(state_path)
        log.info("resumed %s after %d steps", config.output.name, run.step)
    elif resume:
        log.info("no state at %s: starting afresh", state_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    baselines = {r: best_baseline_guided(getattr(data, r), config) for r in ("val", "test")}
    log.info("training %s: %s on %s, target %s guided by %s, regions %s, gap %d px, %d threads, device %s",
             config.output.name, config.model.name, target.source or "band set", list(target.band_names),
             list(guide.band_names), {k: (v.start, v.stop) for k, v in data.regions.items()}, data.gap,
             threads, device)

    validate = validator(run, lambda: evaluate_guided(run.ema.module, data, "val", baselines["val"], config, device,
                                                      amp), on_step)
    _psnr_stage(run, data, config, amp, amp_dtype, state_path, validate, on_step)  # type: ignore[arg-type]
    val = evaluate_guided(run.ema.module, data, "val", baselines["val"], config, device, amp)
    test = evaluate_guided(run.ema.module, data, "test", baselines["test"], config, device, amp)
    log.info("test region: PSNR %.2f dB vs %s %.2f (gain %+.2f), SSIM %.4f vs %.4f", test.psnr,
             test.baseline, test.psnr_baseline, test.gain_db, test.ssim, test.ssim_baseline)
    final = copy.deepcopy(run.ema.module).cpu().eval()
    card = _guided_card(config, data, kwargs, rr, val, test, run, device, threads,
                        degradation.describe(), guide_degradation.describe())
    path = save_checkpoint(final.net, card, Path(config.output.dir) / config.output.name)
    log.info("saved %s", path)
    return TrainResult(checkpoint=path, card=read_card(path), run_dir=run_dir, steps=run.step, gan_steps=0,
                       seconds=run.elapsed["psnr"], stopped_by=run.stopped_by["psnr"], losses=run.losses,
                       val_history=run.val_history, val=val, test=test)


def _init_from(net: nn.Module, config: TrainConfig, kwargs: dict[str, Any], bands: list[str]) -> None:
    from domainsr.models.guided import load_guided_checkpoint

    assert config.init_from is not None
    model, card = load_guided_checkpoint(config.init_from)
    want = (config.model.name, kwargs, tuple(config.scale), bands)
    got = (card.architecture.name, card.architecture.kwargs, tuple(card.scale), list(card.bands))
    if want != got:
        raise ConfigError(f"init_from {config.init_from!r} is {got[0]} {got[1]} x{got[2]} on bands {got[3]}; "
                          f"this run builds {want[0]} {want[1]} x{want[2]} on {want[3]}")
    net.load_state_dict(model.net.state_dict())
    log.info("initialised from %s (sha256 %s)", config.init_from, card.weights_sha256[:12])


def _guided_card(config: TrainConfig, data: GuidedData, kwargs: dict[str, Any], rr: tuple[int, ...],
                 val: RegionMetrics, test: RegionMetrics, run: _Run, device: torch.device, threads: int,
                 degradation: dict[str, Any], guide_degradation: dict[str, Any]) -> ModelCard:
    assert config.guide is not None
    t, g, c = data.target, data.guide, config.card
    target_bands, guide_bands = list(t.band_names), list(g.band_names)
    s = tuple(config.scale)
    norm = FixedNormalization(offset=[float(v) for v in (*data.norm.offset, *data.guide_norm.offset)],
                              scale=[float(v) for v in (*data.norm.scale, *data.guide_norm.scale)])
    if c.input_range is not None:
        in_range = c.input_range
    else:
        box = data.regions["train"].slices(t.spatial_shape)
        t_vals = np.asarray(t.data, np.float32)[(slice(None), *box)][:, data.valid[box]]
        g_box = (slice(None), *_hr_box(box, s))
        g_vals = np.asarray(g.data, np.float32)[g_box][:, _on_hr_grid(data.valid[box], s)]
        in_range = robust_range(np.concatenate([t_vals.ravel(), g_vals.ravel()]))
    split = {"axis": config.data.split.axis, "order": list(config.data.split.order), "gap_px": data.gap,
             "regions": {k: [v.start, v.stop] for k, v in data.regions.items()},
             "units": "target-grid pixels along the axis (end exclusive); guide rows are these x the scale",
             "note": "train patches (with their degradation margin) lie inside the train region on both "
                     "grids; val/test are degraded as wholes, so no val/test pixel is seen in training; the "
                     "gap is at least the receptive radius plus the patch extent along the axis"}
    units = c.units or t.units or DEFAULT_UNITS[config.domain]
    desc = (f"{t.source or 'band set'} ({t.domain}): target bands {target_bands} on {list(t.spatial_shape)}, "
            f"guide bands {guide_bands} on {list(g.spatial_shape)}, units {units}; pairs made on the fly by "
            "Wald's protocol (every band degraded by the scale with its own PSF, see degradation)")
    meaning = c.channel_meaning or (f"inputs: target bands {target_bands} (LR grid) then guide bands "
                                    f"{guide_bands} (grid x{list(s)} finer); outputs: {target_bands} on the "
                                    "guide grid")
    return ModelCard(
        name=config.output.name, version=c.version,
        architecture=Architecture(name=config.model.name, kwargs=kwargs),
        domain=config.domain, spatial_dims=config.spatial_dims, scale=s,
        in_channels=len(target_bands) + len(guide_bands), out_channels=len(target_bands),
        bands=target_bands + guide_bands, output_bands=target_bands, channel_meaning=meaning, units=units,
        input_range=in_range, normalization=norm, receptive_radius=rr, application="direct",
        degradation={"protocol": "Wald: train one level down, apply one level up", "target": degradation,
                     "guide": guide_degradation},
        training_data=TrainingData(source=config.data.source, bands=target_bands + guide_bands, split=split,
                                   files=_source_files(t, target_bands) + _source_files(g, guide_bands),
                                   description=desc),
        training=training_settings(config, run, device, threads),
        metrics={"val": val, "test": test},
        license=c.license, intended_use=c.intended_use, limitations=c.limitations)


__all__ = ["GuidedData", "GuidedEvalPair", "GuidedPatchDataset", "best_baseline_guided", "evaluate_guided",
           "guided_eval_pair", "load_guided_source", "predict_guided", "prepare_guided_data", "train_guided"]
