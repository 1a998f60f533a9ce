"""Engine benchmark: throughput, peak memory and useful GFLOP/s of the patch engine against MONAI's
SlidingWindowInferer and one whole-image forward pass, and peak RSS of raster streaming at two
raster sizes.

    .venv/bin/python benchmarks/engine.py            # full run (several minutes on 2 cores)
    .venv/bin/python benchmarks/engine.py --quick    # smaller images and rasters

Every configuration runs in its own subprocess, so each peak RSS (``ru_maxrss``) is that
configuration's alone; ``base`` is the RSS of the same process after imports, model and input.
Throughput is output megapixels per second (4 bands, x2). ``px ratio`` is model input pixels per
image pixel (the recomputation cost of halo/overlap). GFLOP/s is *useful* work: the model's conv
FLOPs (2 x MACs, counted by hooks) for ONE pass over the image divided by the wall time, so halo,
overlap and blending count as overhead. The matmul peak is float32 ``torch.mm`` of 2048^2 matrices
measured in the same run. "ours, default" uses the engine's defaults (halo = the model's
receptive radius, windows as large as the memory budget allows); "ours, 512 px tiles" the same
with 512 px windows (exact halo tiling at MONAI's patch size); "ours, 512 px, 25 % overlap" uses
MONAI's window and overlap (halo capped at 1/8 of the window, the rest blended with a Gaussian
profile). MONAI's SlidingWindowInferer gets the same 512 px patches and batch size.
``--repeat N`` keeps each configuration's fastest of N runs (the machine may be shared).
Every configuration runs with the engine's glibc malloc tuning (:mod:`domainsr.malloc`: freed
activations are reused instead of re-faulted), so the ratios compare tiling and batching alone;
the ``stock malloc`` rows run the same without it (``DOMAINSR_MALLOC_TUNING=0``), as MONAI or a
bare forward pass runs by default.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODELS = {  # key: (registry name, kwargs, label)
    "edsr": ("edsr", {}, "EDSR-baseline 16x64"),
    "light": ("rescnn", {}, "ResCNN 8x32 (light)"),
}
SIZES = {"full": {"edsr": 1024, "light": 2048, "stream": (2048, 8192)},
         "quick": {"edsr": 512, "light": 1024, "stream": (1024, 4096)}}
BANDS, SCALE = 4, 2


# ------------------------------------------------------------------------------------------ worker

def _build(key: str):
    import torch

    from domainsr.models.registry import build_model

    name, kw, _ = MODELS[key]
    torch.manual_seed(0)
    model = build_model(name, spatial_dims=2, in_channels=BANDS, scale=SCALE, **kw)
    for p in model.parameters():  # trained-like, non-zero weights everywhere (rescnn's tail starts at 0)
        p.data.normal_(0.0, 0.02)
    return model.eval()


def conv_flops_per_px(model, channels: int = BANDS, size: int = 64) -> float:
    """FLOPs (2 x MACs of every conv / transposed conv / linear layer) per LR pixel."""
    import torch

    macs = [0]

    def hook(mod, inp, out):
        if isinstance(mod, (torch.nn.Conv2d, torch.nn.Conv3d)):
            k = math.prod(mod.kernel_size) * mod.in_channels // mod.groups
            macs[0] += out.numel() * k
        elif isinstance(mod, (torch.nn.ConvTranspose2d, torch.nn.ConvTranspose3d)):
            macs[0] += inp[0].numel() * mod.out_channels // mod.groups * math.prod(mod.kernel_size)
        elif isinstance(mod, torch.nn.Linear):
            macs[0] += out.numel() * mod.in_features

    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.inference_mode():
        model(torch.zeros(1, channels, size, size))
    for h in hooks:
        h.remove()
    return 2.0 * macs[0] / size**2


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak() -> int:
    """Peak RSS of this process in bytes (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _worker(cfg: dict) -> dict:
    import numpy as np
    import torch

    from domainsr.engine import PatchInferer
    from domainsr.engine.inferer import physical_cores
    from domainsr.malloc import tune_malloc

    tune_malloc()  # a no-op with DOMAINSR_MALLOC_TUNING=0 (the "_stock" rows)
    threads = physical_cores()
    torch.set_num_threads(threads)
    kind = cfg["kind"].removesuffix("_stock")
    if kind == "matmul":
        a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
        torch.mm(a, b)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            torch.mm(a, b)
            n += 1
        return {"gflops": 2 * 2048**3 * n / (time.perf_counter() - t0) / 1e9, "threads": threads}
    if kind == "stream":
        from domainsr.engine import enhance_raster_file

        model = _build_cheap()
        base = _rss()
        t0 = time.perf_counter()
        inferer = PatchInferer(model)
        enhance_raster_file(cfg["src"], cfg["dst"], inferer)
        dt = time.perf_counter() - t0
        return {"seconds": dt, "base": base, "peak": _peak(), "plan": inferer.stats.plan}

    model = _build(cfg["model"])
    n = cfg["size"]
    x = np.random.default_rng(0).random((BANDS, n, n), dtype=np.float32)
    cl = kind.endswith("_cl")
    if cl:
        model = model.to(memory_format=torch.channels_last)
    with torch.inference_mode():  # warm-up: library initialisation, not per-shape work
        model(torch.from_numpy(x[None, :, :64, :64].copy()))
    base = _rss()
    info: dict = {}
    c0 = time.process_time()
    t0 = time.perf_counter()
    if kind in ("whole", "whole_cl"):
        with torch.inference_mode():
            t = torch.from_numpy(x)[None]
            if cl:
                t = t.contiguous(memory_format=torch.channels_last)
            y = model(t)
        info["model_px"] = n * n
    elif kind in ("ours", "ours_tile", "ours_eq"):
        kw: dict = {}
        if kind == "ours_tile":
            kw = {"tile": cfg["tile"]}
        elif kind == "ours_eq":
            kw = {"tile": cfg["tile"], "halo": cfg["halo"], "overlap": cfg["overlap"], "blend": "gaussian"}
        inf = PatchInferer(model, **kw)
        y = inf.run(x)
        info.update(inf.stats.plan)
        info["model_px"] = inf.stats.computed * math.prod(inf.stats.plan["tile"])
    elif kind in ("monai", "monai_cl"):
        from monai.inferers import SlidingWindowInferer

        roi = cfg["tile"]
        swi = SlidingWindowInferer(roi_size=(roi, roi), sw_batch_size=cfg["batch"], overlap=0.25,
                                   mode="gaussian")
        if cl:
            def net(t):
                return model(t.contiguous(memory_format=torch.channels_last))
        else:
            net = model
        with torch.inference_mode():
            y = swi(torch.from_numpy(x)[None], net)
        step = int(roi * 0.75)
        per_axis = 1 if n <= roi else math.ceil((n - roi) / step) + 1
        info.update(tile=[roi, roi], batch_size=cfg["batch"])
        info["model_px"] = per_axis**2 * roi * roi
    else:
        raise SystemExit(f"unknown kind {kind}")
    dt = time.perf_counter() - t0
    info["cpu_seconds"] = time.process_time() - c0
    assert tuple(y.shape[-2:]) == (SCALE * n, SCALE * n), y.shape
    peak = _peak()
    return {"seconds": dt, "base": base, "peak": peak, "flops_px": conv_flops_per_px(_build(cfg["model"])),
            "threads": threads, **info}


def _build_cheap():
    from domainsr.models.registry import build_model

    return build_model("linear", spatial_dims=2, in_channels=BANDS, scale=SCALE)


# ------------------------------------------------------------------------------------------ parent

def _run(cfg: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env["DOMAINSR_MALLOC_TUNING"] = "0" if cfg["kind"].endswith("_stock") else "1"
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(cfg)], capture_output=True,
                          text=True, env=env, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"worker {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _synthetic_raster(path: Path, size: int) -> None:
    """A smooth-plus-noise uint16 4-band scene, written in strips (never held whole)."""
    import numpy as np
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    rng = np.random.default_rng(size)
    with rasterio.open(path, "w", driver="GTiff", width=size, height=size, count=BANDS, dtype="uint16",
                       crs="EPSG:32618", transform=from_origin(300000, 5000000, 10, 10), nodata=0,
                       tiled=True, blockxsize=512, blockysize=512) as ds:
        cols = np.arange(size, dtype=np.float32)
        for r0 in range(0, size, 512):
            rows = np.arange(r0, r0 + 512, dtype=np.float32)[:, None]
            base = 1500 + 800 * np.sin(rows / 97.0) * np.cos(cols / 131.0)
            strip = base[None] + rng.normal(0, 50, (BANDS, 512, size)).astype(np.float32)
            ds.write(np.clip(strip, 1, 65535).astype(np.uint16), window=Window(0, r0, size, 512))


def _fmt_mb(b: float) -> str:
    return f"{b / 2**20:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller images and rasters")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--skip-stream", action="store_true", help="skip the streaming memory check")
    ap.add_argument("--repeat", type=int, default=1, help="runs per configuration; the fastest is kept")
    ap.add_argument("--tile", type=int, default=512, help="patch size of the fixed-tile rows and of MONAI")
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return

    from rich.console import Console
    from rich.table import Table

    from domainsr.engine import PatchInferer

    sizes = SIZES["quick" if args.quick else "full"]
    console = Console(width=200)
    console.print(f"load average before: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", highlight=False)
    mm = max((_run({"kind": "matmul"}) for _ in range(2)), key=lambda v: v["gflops"])
    console.print(f"matmul peak (float32 torch.mm 2048^2, {mm['threads']} threads): "
                  f"{mm['gflops']:.1f} GFLOP/s", highlight=False)

    table = Table(title=f"Patch inference, {BANDS} bands x{SCALE}, CPU ({mm['threads']} threads)")
    for col in ("model", "image", "method", "tile / overlap", "px ratio", "s", "CPU s", "out Mpx/s",
                "vs whole", "vs MONAI", "peak RSS MB (base)", "GFLOP/s", "% matmul"):
        table.add_column(col, justify="left" if col in ("model", "method", "tile / overlap") else "right")
    summary = []
    for key in ("light", "edsr"):
        n = sizes[key]
        roi = args.tile
        radius = PatchInferer(_build(key)).plan((n, n)).halo[0]
        halo = min(radius, roi // 8)
        eq = {"tile": roi, "halo": halo, "overlap": roi // 4 - 2 * halo}
        batch = PatchInferer(_build(key)).auto_batch(PatchInferer(_build(key), tile=roi).plan((n, n)))
        kinds = (("whole", "whole-image pass"), ("whole_cl", "whole pass, channels-last"),
                 ("ours", "ours, default"), ("ours_stock", "ours, default, stock malloc"),
                 ("ours_tile", f"ours, {roi} px tiles"),
                 ("ours_eq", f"ours, {roi} px, 25 % overlap"), ("monai", f"MONAI {roi} px, 25 % gaussian"),
                 ("monai_cl", f"MONAI {roi} px, channels-last"),
                 ("monai_stock", f"MONAI {roi} px, 25 % gaussian, stock malloc"))
        runs: dict[str, list[dict]] = {kind: [] for kind, _ in kinds}
        for _ in range(max(1, args.repeat)):  # round-robin, so load changes hit every configuration
            for kind, _label in kinds:
                runs[kind].append(_run({"kind": kind, "model": key, "size": n, "batch": batch, **eq}))
                console.print(f"  {key} {kind}: {runs[kind][-1]['seconds']:.1f} s", highlight=False)
        rows = {}
        for kind, label in kinds:
            r = min(runs[kind], key=lambda v: v["seconds"])
            r["peak"] = max(v["peak"] for v in runs[kind])
            rows[kind] = (label, r)
        out_mpx = SCALE**2 * n * n / 1e6
        for kind, (label, r) in rows.items():
            thr = out_mpx / r["seconds"]
            gf = r["flops_px"] * n * n / r["seconds"] / 1e9
            vs_whole = rows["whole"][1]["seconds"] / r["seconds"]
            vs_monai = rows["monai"][1]["seconds"] / r["seconds"]
            base = kind.removesuffix("_stock")
            if base.startswith("ours"):
                tile = f"{r['tile'][0]} / halo {r['halo'][0]}"
                tile += f" + {r['overlap'][0]} blend" if r["blended"] else ""
            elif base.startswith("monai"):
                tile = f"{r['tile'][0]} / 25 %"
            else:
                tile = "-"
            table.add_row(MODELS[key][2], f"{n}²", label, tile, f"{r['model_px'] / n**2:.2f}",
                          f"{r['seconds']:.1f}", f"{r['cpu_seconds']:.1f}", f"{thr:.3f}", f"{vs_whole:.2f}x",
                          f"{vs_monai:.2f}x",
                          f"{_fmt_mb(r['peak'])} ({_fmt_mb(r['base'])})", f"{gf:.1f}",
                          f"{100 * gf / mm['gflops']:.0f} %")
            if kind in ("ours", "ours_tile"):
                ratio = {k: rows[k][1]["seconds"] / r["seconds"] for k in rows}
                cpu = {k: rows[k][1]["cpu_seconds"] / r["cpu_seconds"] for k in rows}
                summary.append((f"{MODELS[key][2]}, {label}", ratio, cpu))
    console.print(table)
    console.print(f"load average after: {os.getloadavg()[0]:.1f}", highlight=False)
    for name, ratio, cpu in summary:
        model, label = name.split(", ", 1)
        goal = " (goal >= 0.9)" if label == "ours, default" else ""
        console.print(f"{model}: {label}: {ratio['whole']:.2f}x the throughput of a whole-image pass{goal}; "
                      f"{ratio['monai']:.2f}x the throughput of MONAI's SlidingWindowInferer"
                      f"{' (goal >= 2)' if goal else ''}. Channels-last references: {ratio['whole_cl']:.2f}x a "
                      f"whole pass, {ratio['monai_cl']:.2f}x MONAI. By CPU seconds: {cpu['whole']:.2f}x / "
                      f"{cpu['whole_cl']:.2f}x whole, {cpu['monai']:.2f}x / {cpu['monai_cl']:.2f}x MONAI. "
                      f"Malloc tuning: {ratio['ours_stock']:.2f}x faster than ours with stock malloc; "
                      f"{ratio['monai_stock']:.2f}x MONAI as it runs by default (stock malloc).",
                      highlight=False)

    if args.skip_stream:
        return
    small, big = sizes["stream"]
    with tempfile.TemporaryDirectory(prefix="domainsr-bench-") as tmp:
        res = {}
        for size in (small, big):
            src = Path(tmp) / f"scene{size}.tif"
            _synthetic_raster(src, size)
            res[size] = _run({"kind": "stream", "src": str(src), "dst": str(Path(tmp) / f"sr{size}.tif")})
            src.unlink()
            (Path(tmp) / f"sr{size}.tif").unlink()
    mt = Table(title="Streaming GeoTIFF -> COG (uint16, 4 bands, x2, linear baseline), peak RSS per process")
    for col in ("raster", "tile plan", "s", "LR Mpx/s", "peak RSS MB", "base RSS MB"):
        mt.add_column(col, justify="right")
    for size, r in res.items():
        mt.add_row(f"{size}x{size}x{BANDS}", f"{r['plan']['tile']} halo {r['plan']['halo']}",
                   f"{r['seconds']:.1f}",
                   f"{size * size / 1e6 / r['seconds']:.2f}", _fmt_mb(r["peak"]), _fmt_mb(r["base"]))
    console.print(mt)
    ratio = res[big]["peak"] / res[small]["peak"]
    console.print(f"peak RSS {big}^2 / {small}^2 = {ratio:.2f} (goal <= 1.5; the raster is "
                  f"{(big / small) ** 2:.0f}x "
                  f"larger)", highlight=False)


if __name__ == "__main__":
    main()
