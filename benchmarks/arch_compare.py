"""Which architecture to ship per task (issue 16): held-out gain per CPU-second, side by side.

    .venv/bin/python benchmarks/arch_compare.py                         # S2 x2, rescnn vs span, 1500 steps each
    .venv/bin/python benchmarks/arch_compare.py --config configs/train/mri_slices_x4.yaml --steps 3000

Protocol: the task's own training config (data, split, degradation, loss, normalisation, batch,
patch, seed; ``init_from`` dropped) is run once per architecture for the same number of steps
(cosine over them), in this process, one after the other, on the same threads. Each run's EMA
weights are scored by the trainer on the card's held-out test region against the best
interpolation (``gain``). ``train CPU s`` is the process CPU time of the run (less sensitive to a
busy machine than wall time), so ``dB per train CPU-minute`` is the held-out gain per unit of
training compute. Inference throughput is the engine-free forward speed of the network on a batch
the size of a training batch's LR input (median of 5, after a warm-up). Rule (stated in the
README): ship the architecture with the larger gain per train CPU-minute unless the other's gain
is more than 0.1 dB larger, then weigh that gain against its inference cost.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from domainsr.io.atomic import atomic_path
from domainsr.models import build_model
from domainsr.train.config import TrainConfig
from domainsr.train.trainer import train

ROOT = Path(__file__).resolve().parent
ARCHS = {"rescnn": {"n_blocks": 8, "n_feats": 32}, "span": {"n_blocks": 6, "n_feats": 32}}


def forward_speed(name: str, kwargs: dict[str, Any], cfg: TrainConfig, channels: int) -> float:
    """LR megapixels per second of one forward pass (no grad) on a training-batch-sized input."""
    net = build_model(name, spatial_dims=cfg.spatial_dims, in_channels=channels, scale=cfg.scale, **kwargs).eval()
    lr = [p // s for p, s in zip(cfg.patch_size, cfg.scale)]
    x = torch.randn(cfg.batch_size, channels, *[max(n, 32) for n in lr])
    times = []
    with torch.inference_mode():
        net(x)
        for _ in range(5):
            t0 = time.perf_counter()
            net(x)
            times.append(time.perf_counter() - t0)
    times.sort()
    return x[:, 0].numel() / times[2] / 1e6


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=ROOT.parent / "configs" / "train" / "sentinel2_rgbn_x2.yaml")
    ap.add_argument("--steps", type=int, default=1500, help="training steps per architecture")
    ap.add_argument("--archs", nargs="*", default=list(ARCHS))
    ap.add_argument("--out", type=Path, default=ROOT / "results")
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="arch-compare-") as tmp:
        for name in args.archs:
            overrides = {"model": {"name": name, "kwargs": ARCHS[name]}, "steps": args.steps, "max_minutes": 60.0,
                         "val_every": 10**7, "save_every": 10**7, "init_from": None, "gan.enabled": False,
                         "output.dir": f"{tmp}/ckpt", "output.run_dir": f"{tmp}/runs", "output.name": f"cmp-{name}"}
            cfg = TrainConfig.from_yaml(args.config, overrides=overrides)
            t0, c0 = time.perf_counter(), time.process_time()
            res = train(cfg)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            params = sum(p.numel() for p in build_model(name, spatial_dims=cfg.spatial_dims,
                                                         in_channels=res.card.in_channels, scale=cfg.scale,
                                                         **ARCHS[name]).parameters())
            speed = forward_speed(name, ARCHS[name], cfg, res.card.in_channels)
            gain = res.test.gain_db if res.test else float("nan")
            rows.append({"arch": name, "kwargs": ARCHS[name], "params": params, "steps": res.steps,
                         "train_wall_s": round(wall, 1), "train_cpu_s": round(cpu, 1), "gain_db": gain,
                         "baseline": res.test.baseline if res.test else None, "lr_mpx_per_s": speed,
                         "db_per_train_cpu_min": gain / (cpu / 60.0)})
    by_rate = max(rows, key=lambda r: r["db_per_train_cpu_min"])
    by_gain = max(rows, key=lambda r: r["gain_db"])
    pick = by_gain if by_gain["gain_db"] - by_rate["gain_db"] > 0.1 else by_rate
    lines = [f"# Architecture comparison: {args.config.name}, {args.steps} steps each", "",
             "| arch | params | steps | train CPU s | held-out gain dB | dB per train CPU-minute | inference LR Mpx/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['arch']} {r['kwargs']} | {r['params']} | {r['steps']} | {r['train_cpu_s']:.0f} | "
                     f"{r['gain_db']:+.2f} ({r['baseline']}) | {r['db_per_train_cpu_min']:.3f} | {r['lr_mpx_per_s']:.3f} |")
    lines += ["", f"Pick (larger gain per train CPU-minute unless the other gains > 0.1 dB more): **{pick['arch']}**"]
    md = "\n".join(lines) + "\n"
    print(md)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"arch_compare_{args.config.stem}"
    with atomic_path(args.out / f"{stem}.json") as t:
        Path(t).write_text(json.dumps({"config": str(args.config), "steps": args.steps, "rows": rows,
                                       "pick": pick["arch"]}, indent=1))
    with atomic_path(args.out / f"{stem}.md") as t:
        Path(t).write_text(md)
    return {"rows": rows, "pick": pick["arch"]}


if __name__ == "__main__":
    main()
