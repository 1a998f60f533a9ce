"""The one training loop: PSNR stage, optional GAN stage, EMA, validation, resume, checkpoint.

:func:`fit` runs any :class:`~domainsr.train.pairing.Pairing`: the strategy supplies the network,
the batches ``(model input, target)`` and the held-out scoring; everything here is shared. The
PSNR stage optimises the pixel loss (L1/Charbonnier + optional SSIM, frequency and gradient
terms) with Adam; the GAN stage starts the generator from the PSNR stage's EMA weights and adds a
relativistic-average GAN term against a registry discriminator. EMA weights are validated every
``val_every`` steps against the best interpolation on the val region, tested once on the test
region, and saved with their card.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from domainsr.errors import ConfigError, ModelError
from domainsr.models.checkpoints import ModelCard, RegionMetrics, TrainingSettings, read_card, save_checkpoint
from domainsr.train.config import TrainConfig
from domainsr.train.losses import PixelLoss, frequency_l1, gradient_l1, l1, ragan_d_loss, ragan_g_loss
from domainsr.train.pairing import Autocast, Pairing
from domainsr.train.state import RunState

log = logging.getLogger("domainsr.train")

#: ``on_step(event)``: called after every step and every validation (raising stops the run)
Callback = Callable[[dict[str, Any]], None]
#: ``validate(stage, step)``: score the validation region, record and report it
Validate = Callable[[str, int], RegionMetrics]


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
    holdout: dict[str, RegionMetrics] = field(default_factory=dict)


def fit(config: TrainConfig, pairing: Pairing, *, resume: bool = False,
        on_step: Callback | None = None) -> TrainResult:
    """Train, validate, test and save the model ``config`` describes, with ``pairing``'s data.

    ``resume`` continues from ``<run_dir>/<name>/state.pt`` when it exists; ``on_step`` gets a dict
    after every step and every validation."""
    threads = set_threads(config)
    device = pick_device(config)
    amp, amp_dtype = autocast(config, device)
    torch.manual_seed(config.seed)
    pairing.load()
    net = pairing.build_net()
    rr = tuple(int(r) for r in np.broadcast_to(np.asarray(net.receptive_radius), (config.spatial_dims,)))
    pairing.prepare(rr)
    run = RunState(config, pairing.trainable(net).to(device), device)
    run_dir = Path(config.output.run_dir) / config.output.name
    state_path = run_dir / "state.pt"
    if resume and state_path.exists():
        run.load(state_path)
        log.info("resumed %s after %d PSNR and %d GAN steps", config.output.name, run.step, run.gan_step)
    elif resume:
        log.info("no state at %s: starting afresh", state_path)
    run_dir.mkdir(parents=True, exist_ok=True)
    baselines = {r: pairing.baseline(r) for r in ("val", "test")}
    log.info("training %s: %s on %s, regions %s, gap %d px, %d threads, device %s%s", config.output.name,
             config.model.name, pairing.describe(), {k: (v.start, v.stop) for k, v in pairing.data.regions.items()},
             pairing.data.gap, threads, device, f", autocast {amp_dtype}" if amp_dtype else "")

    def evaluate(region: str) -> RegionMetrics:
        return pairing.evaluate(run.ema.module, region, baselines[region], device, amp)

    validate = validator(run, lambda: evaluate("val"), on_step)
    train_set = pairing.data.train
    if run.stage == "psnr":
        psnr_stage(run, train_set, config, amp, amp_dtype, state_path, validate, on_step, pairing.teacher())
        if config.gan.enabled:
            run.start_gan()
            run.save(state_path)
    if config.gan.enabled and run.stage == "gan":
        gan_stage(run, train_set, config, amp, amp_dtype, state_path, validate, on_step)

    val, test = evaluate("val"), evaluate("test")
    log.info("test region: PSNR %.2f dB vs %s %.2f (gain %+.2f), SSIM %.4f vs %.4f", test.psnr,
             test.baseline, test.psnr_baseline, test.gain_db, test.ssim, test.ssim_baseline)
    kept = {}
    for region in pairing.holdout_regions():
        kept[region] = pairing.evaluate(run.ema.module, region, pairing.baseline(region), device, amp)
        log.info("%s: PSNR %.2f dB vs %s %.2f (gain %+.2f, %.0f %% of the test gain)", region, kept[region].psnr,
                 kept[region].baseline, kept[region].psnr_baseline, kept[region].gain_db,
                 100 * kept[region].gain_db / test.gain_db if test.gain_db else float("nan"))
    final = pairing.network(copy.deepcopy(run.ema.module).cpu().eval())
    card = pairing.card(final, rr, val, test, training_settings(config, run, device, threads))
    if kept:
        card = card.model_copy(update={"metrics": {**card.metrics, **kept}})
    path = save_checkpoint(final, card, Path(config.output.dir) / config.output.name)
    log.info("saved %s", path)
    return TrainResult(checkpoint=path, card=read_card(path), run_dir=run_dir, steps=run.step,
                       gan_steps=run.gan_step, seconds=run.elapsed["psnr"] + run.elapsed["gan"],
                       stopped_by=run.stopped_by["gan"] or run.stopped_by["psnr"], losses=run.losses,
                       val_history=run.val_history, val=val, test=test, holdout=kept)


# ---------------------------------------------------------------------------------------------
# stages


def psnr_stage(run: RunState, train_set: torch.utils.data.Dataset, config: TrainConfig, amp: Autocast,
               amp_dtype: torch.dtype | None, state_path: Path, validate: Validate,
               on_step: Callback | None, teacher: nn.Module | None = None) -> None:
    """The pixel-loss stage: ``config.steps`` steps or ``config.max_minutes``, cosine/step schedule;
    with a ``teacher`` (``config.distill``) the loss adds ``distill.weight`` x L1 to its output."""
    criterion = PixelLoss(config.loss, config.spatial_dims, tuple(config.scale))
    if teacher is not None:
        teacher = teacher.to(run.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net, opt = run.net, run.opt
    net.train()

    def one_step(x: torch.Tensor, target: torch.Tensor, _: float) -> float:
        opt.zero_grad(set_to_none=True)
        with amp():
            y = net(x).float()
            loss = criterion(y, target, x if config.loss.range else None)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x).float()
                loss = loss + config.distill.weight * l1(y, t)
        scaler.scale(loss).backward()
        if config.grad_clip:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        scaler.step(opt)
        scaler.update()
        return float(loss.detach())

    _loop(run, train_set, config, "psnr", config.steps, config.max_minutes, 0, one_step, [config.lr],
          state_path, validate, on_step)


def gan_stage(run: RunState, train_set: torch.utils.data.Dataset, config: TrainConfig, amp: Autocast,
              amp_dtype: torch.dtype | None, state_path: Path, validate: Validate,
              on_step: Callback | None) -> None:
    """The GAN stage (after :meth:`RunState.start_gan`): pixel, gradient, frequency and RaGAN terms."""
    g = config.gan
    assert run.disc is not None and run.opt_d is not None
    net, disc, opt, opt_d = run.net, run.disc, run.opt, run.opt_d
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    net.train()
    disc.train()

    def one_step(x: torch.Tensor, target: torch.Tensor, f: float) -> float:
        for group in opt_d.param_groups:
            group["lr"] = g.lr_d * f
        # D(real) once: its graph serves the D loss, its detached value the generator's
        disc.requires_grad_(True)
        with amp():
            real = disc(target).float()
            sr = net(x).float()
        disc.requires_grad_(False)
        opt.zero_grad(set_to_none=True)
        with amp():
            fake = disc(sr).float()
            loss_g = (g.pixel * l1(sr, target) + g.gradient * gradient_l1(sr, target)
                      + g.frequency * frequency_l1(sr, target) + g.adversarial * ragan_g_loss(real.detach(), fake))
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

    _loop(run, train_set, config, "gan", g.steps, g.max_minutes, config.steps, one_step, [g.lr_g], state_path,
          validate, on_step)


def _loop(run: RunState, train_set: torch.utils.data.Dataset, config: TrainConfig, stage: str, total: int,
          minutes: float, offset: int, one_step: Callable[[torch.Tensor, torch.Tensor, float], float],
          base_lrs: list[float], state_path: Path, validate: Validate, on_step: Callback | None) -> None:
    """The step loop of a stage: batches, LR schedule, budgets, EMA, logging, validation and state saves."""
    start = run.step if stage == "psnr" else run.gan_step
    if start >= total:
        run.stopped_by[stage] = run.stopped_by[stage] or "steps"
        return
    budget = minutes * 60.0
    if run.elapsed[stage] >= budget:
        run.stopped_by[stage] = "time"
        return
    batches = _batches(train_set, config.batch_size, start, total, offset)
    t0, e0 = time.perf_counter(), run.elapsed[stage]
    window: list[float] = []
    run.stopped_by[stage] = "steps"
    every = max(1, min(50, total // 20 or 1))
    for step in range(start, total):
        elapsed = e0 + time.perf_counter() - t0
        if elapsed >= budget:
            run.stopped_by[stage] = "time"
            break
        progress = max(step / total, elapsed / budget)
        f = lr_factor(progress, config.schedule if stage == "psnr" else "step", step, config.warmup_steps)
        for g, base in zip(run.opt.param_groups, base_lrs):
            g["lr"] = base * f
        x, target = next(batches)
        loss = one_step(x.to(run.device, non_blocking=True), target.to(run.device, non_blocking=True), f)
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


def _batches(ds: torch.utils.data.Dataset, batch: int, first_step: int, last_step: int,
             offset: int) -> Iterator[Any]:
    """Batches for steps ``first_step..last_step-1``; item ``i`` of step ``s`` is ``(s + offset) * B + i``."""
    idx = range((first_step + offset) * batch, (last_step + offset) * batch)
    return iter(torch.utils.data.DataLoader(ds, batch_size=batch, sampler=idx, num_workers=0, drop_last=True))


def validator(run: RunState, evaluate_val: Callable[[], RegionMetrics], on_step: Callback | None) -> Validate:
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


# ---------------------------------------------------------------------------------------------
# settings


def lr_factor(progress: float, schedule: str, step: int, warmup: int) -> float:
    """The learning-rate multiplier at ``progress`` (0..1, the larger of the step and time
    fractions) after a linear warm-up of ``warmup`` steps."""
    w = min(1.0, (step + 1) / warmup) if warmup else 1.0
    p = min(max(progress, 0.0), 1.0)
    if schedule == "cosine":
        return w * (0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * p)))
    if schedule == "step":
        return w * 0.5 ** sum(p >= m for m in (0.5, 0.75, 0.9))
    return w


def pick_device(config: TrainConfig) -> torch.device:
    """CUDA when available and not refused by ``config.device``; CPU otherwise."""
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available")
    return torch.device("cuda" if config.device != "cpu" and torch.cuda.is_available() else "cpu")


def autocast(config: TrainConfig, device: torch.device) -> tuple[Autocast, torch.dtype | None]:
    """Autocast on CUDA only (bf16 where supported, else fp16); float32 on CPU."""
    if device.type != "cuda" or config.amp == "off":
        return nullcontext, None
    dtype = torch.float16 if config.amp == "fp16" or (
        config.amp == "auto" and not torch.cuda.is_bf16_supported()) else torch.bfloat16
    return (lambda: torch.autocast("cuda", dtype=dtype)), dtype


def set_threads(config: TrainConfig) -> int:
    """Set torch's CPU threads to ``config.threads`` (default: the CPUs this process may use)."""
    try:
        avail = len(os.sched_getaffinity(0))
    except AttributeError:
        avail = os.cpu_count() or 1
    n = config.threads or avail
    torch.set_num_threads(n)
    return n


def training_settings(config: TrainConfig, run: RunState, device: torch.device, threads: int) -> TrainingSettings:
    """What the card records about how the weights were trained."""
    return TrainingSettings(
        steps=run.step, gan_steps=run.gan_step, seconds=round(run.elapsed["psnr"] + run.elapsed["gan"], 1),
        device=f"{device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()})",
        threads=threads, seed=config.seed, batch_size=config.batch_size, patch_size=list(config.patch_size),
        lr=config.lr, loss=config.loss.pixel + "".join(
            f" + {w:g} {k}" for k, w in (("ssim", config.loss.ssim), ("frequency", config.loss.frequency),
                                         ("gradient", config.loss.gradient), ("range", config.loss.range)) if w)
        + (f" + {config.distill.weight:g} L1 to teacher {config.distill.teacher}" if config.distill else ""),
        stopped_by=run.stopped_by["gan"] or run.stopped_by["psnr"],
        extra={"ema_decay": config.ema_decay, "schedule": config.schedule,
               "gan": config.gan.model_dump(mode="json") if config.gan.enabled else None,
               "torch": torch.__version__})


__all__ = ["Callback", "TrainResult", "autocast", "fit", "gan_stage", "lr_factor", "pick_device", "psnr_stage",
           "set_threads", "training_settings", "validator"]
