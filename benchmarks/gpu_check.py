"""The CUDA path end to end, in a few minutes (issue 17): run it whenever a GPU machine is there.

    bash benchmarks/gpu_check.sh            # or: python benchmarks/gpu_check.py [--size 2048] [--quick]

Checks, each a row of one table (device, what, result, time, throughput, memory):

1. the device and its bf16 support;
2. the shipped ``sentinel2-rgbn-x2`` on a real-data mosaic (the sample scene mirrored to
   ``--size``^2) with the engine's defaults (``amp="auto"``: bf16 or fp16 autocast on CUDA, pinned
   host buffers, non-blocking copies), in float32, and on the CPU in float32 as the reference: the
   PSNR of each output against the CPU float32 one (the precision's error, not quality) and the
   throughput ratio;
3. OOM-adaptive tiles: the same with the allowed device memory cut (``torch.cuda.
   set_per_process_memory_fraction``) and one huge window asked for; the engine must recover
   (``stats.oom_events`` > 0) and give the same pixels;
4. the 3D model ``mri-t1-x2`` on the MNI152 volume (auto precision) against CPU float32.

Without CUDA every row runs on the CPU (the fallback users get), the OOM row is simulated (a
model that raises ``torch.OutOfMemoryError`` above a size) and the table says so; the exit code
is 0 when every check passes.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from domainsr.engine import PatchInferer
from domainsr.models.checkpoints import load_checkpoint

ROWS: list[dict[str, Any]] = []


def _psnr(a: np.ndarray, ref: np.ndarray) -> float:
    ok = np.isfinite(a) & np.isfinite(ref)
    rng = float(np.ptp(ref[ok])) or 1.0
    mse = float(np.mean((a[ok].astype(np.float64) - ref[ok]) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(rng**2 / mse)


def _mem() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB peak"
    import psutil

    return f"{psutil.Process().memory_info().rss / 2**30:.2f} GiB RSS"


def _row(device: str, what: str, ok: bool, seconds: float | None, detail: str) -> None:
    ROWS.append({"device": device, "what": what, "ok": ok, "seconds": seconds, "detail": detail, "memory": _mem()})


def _timed(fn: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def s2_mosaic(size: int) -> np.ndarray:
    """The real sample scene's B02/B03/B04/B08 mirrored to ``size`` x ``size`` (float32 DN)."""
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    img = read_image(fetch_sample_data()["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    data = np.asarray(img.data, np.float32)
    reps = [math.ceil(size / n) for n in data.shape[1:]]
    tiled = np.pad(data, [(0, 0), *((0, (r - 1) * n) for r, n in zip(reps, data.shape[1:]))], mode="symmetric")
    return np.ascontiguousarray(tiled[:, :size, :size])


def check_model(name: str, x: np.ndarray, device: str, prepare: Any = None) -> None:
    module, _ = load_checkpoint(name)
    if prepare is not None:
        module.prepare(prepare)
    cpu = PatchInferer(module, device="cpu", amp="off")
    ref, t_cpu = _timed(lambda: cpu.run(x))
    px = math.prod(x.shape[1:]) / 1e6
    _row("cpu", f"{name} float32 (reference)", bool(np.isfinite(ref).any()), t_cpu, f"{px / t_cpu:.3f} LR Mpx/s")
    if device == "cpu":
        auto = PatchInferer(module, device="cpu")
        out, t = _timed(lambda: auto.run(x))
        p = _psnr(out, ref)
        _row("cpu", f"{name} amp=auto ({auto.amp}; no CUDA: CPU fallback)", p > 45, t,
             f"{px / t:.3f} LR Mpx/s, {t_cpu / t:.2f}x fp32, PSNR vs fp32 {p:.1f} dB")
        return
    for amp in ("auto", "off"):
        inf = PatchInferer(module, device="cuda", amp=amp)
        inf.run(np.ascontiguousarray(x[(slice(None), *(slice(0, 64) for _ in x.shape[1:]))]))  # warm-up
        out, t = _timed(lambda inf=inf: inf.run(x))
        p = _psnr(out, ref)
        _row("cuda", f"{name} amp={amp} ({inf.amp}), pinned, batch {inf.stats.plan.get('batch_size')}, "
             f"tile {inf.stats.plan.get('tile')}", p > (45 if inf.amp != "off" else 60), t,
             f"{px / t:.3f} LR Mpx/s, {t_cpu / t:.1f}x CPU fp32, PSNR vs CPU fp32 {p:.1f} dB")


def check_oom(device: str, x: np.ndarray) -> None:
    module, _ = load_checkpoint("sentinel2-rgbn-x2")
    small = np.ascontiguousarray(x[:, :512, :512])
    ref = PatchInferer(module, device=device, amp="off", tile=512).run(small)
    if device == "cuda":
        torch.cuda.empty_cache()
        _, total = torch.cuda.mem_get_info()
        torch.cuda.set_per_process_memory_fraction(min(1.0, 0.4 * 2**30 / total))  # ~0.4 GiB for this process
        try:
            inf = PatchInferer(module, device="cuda", amp="off", tile=4096, batch_size=1)
            out, t = _timed(lambda: inf.run(np.ascontiguousarray(x[:, :2048, :2048])))
            part = out[:, :1024, :1024]
        finally:
            torch.cuda.set_per_process_memory_fraction(1.0)
        what = "OOM-adaptive: 4096 px window under a 0.4 GiB cap"
    else:
        class Tight(torch.nn.Module):  # out of memory above 256^2 LR px per pass (simulated)
            def __init__(self, m: torch.nn.Module) -> None:
                super().__init__()
                self.m = m
                for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius", "card"):
                    if hasattr(m, k):
                        setattr(self, k, getattr(m, k))

            def forward(self, t: torch.Tensor) -> torch.Tensor:
                if t.shape[0] * t.shape[2:].numel() > 256 * 256:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
                return self.m(t)

        inf = PatchInferer(Tight(module), device="cpu", amp="off", tile=512, batch_size=1)
        out, t = _timed(lambda: inf.run(small))
        part = out
        what = "OOM-adaptive (simulated on the CPU: no CUDA)"
    p = _psnr(part, ref[:, : part.shape[1], : part.shape[2]])
    _row(device, what, inf.stats.oom_events > 0 and p > 60, t,
         f"{inf.stats.oom_events} recoveries, window now {list(inf._oom_window or [])}, PSNR vs untiled {p:.1f} dB")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048, help="side of the S2 mosaic (LR px)")
    ap.add_argument("--quick", action="store_true", help="small inputs (a CI smoke run)")
    args = ap.parse_args()
    size = 256 if args.quick else args.size
    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name(0) if device == "cuda" else "no CUDA device: CPU fallback"
    bf16 = torch.cuda.is_bf16_supported() if device == "cuda" else False
    _row(device, f"device: {name}", True, None, f"torch {torch.__version__}, CUDA bf16: {bf16}")
    x = s2_mosaic(size)
    check_model("sentinel2-rgbn-x2", x, device)
    check_oom(device, s2_mosaic(max(size, 512)))
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    vol = read_image(fetch_sample_data()["mni152"])
    data = np.asarray(vol.data, np.float32)
    if args.quick:
        data = np.ascontiguousarray(data[:, 60:92, 80:112, 60:92])
    check_model("mri-t1-x2", data, device, prepare=vol)
    print("| device | check | ok | s | result | memory |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        secs = "-" if r["seconds"] is None else f"{r['seconds']:.2f}"
        print(f"| {r['device']} | {r['what']} | {'PASS' if r['ok'] else 'FAIL'} | {secs} | {r['detail']} | "
              f"{r['memory']} |")
    return 0 if all(r["ok"] for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
