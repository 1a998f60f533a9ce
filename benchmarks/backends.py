"""Faster backends against float32 (issue 17): PSNR lost and throughput gained on each shipped
model's held-out set, measured side by side in one run.

    .venv/bin/python benchmarks/backends.py                       # every shipped model, full held-out sets
    .venv/bin/python benchmarks/backends.py --models sentinel2-rgbn-x2 --quick
    .venv/bin/python benchmarks/backends.py --write-cards         # record bf16 in the shipped cards

Rows per model (the held-out case of ``benchmarks/quality.py``: same pairs, same scoring):

* ``float32``: the reference (the engine on CPU, 2 threads).
* ``bf16``: the engine's CPU bf16 path (``amp="bf16"``: oneDNN bf16 convolutions, the interpolation
  base and the output in float32; native on CPUs with AVX512-BF16 or AMX).
* ``int8``: post-training static quantisation (``torch.ao`` FX graph mode, x86 backend, per-channel
  weights) of every ``rescnn``'s residual branch (the interpolation base and the output stay float32),
  calibrated on the first window (of at least 48 px per axis) it runs on: the held-out input itself,
  the most favourable choice.
  Measured, not offered: it loses far more than 0.05 dB (see the table).
* ``onnx``: the network exported to ONNX (``torch.onnx.export``, TorchScript path, opset 17, dynamic
  spatial axes) and run by ONNX Runtime's CPU provider with the same 2 threads, when ``onnxruntime``
  and ``onnx`` are installed (``pip install onnxruntime onnx``; not a dependency): the normalisation
  and the engine around it are unchanged. 2D networks only (the TorchScript exporter refuses the 3D
  networks' memory-format call).
* ``student``: a distilled student checkpoint (``<name>-fast``, trained by ``domainsr train`` with
  ``distill.teacher``), when one is shipped.

``loss`` = PSNR(float32) - PSNR(row) on the scored pixels (positive: worse); ``speed`` = LR
megapixels per second of the whole held-out input (the fastest of ``--repeat`` runs, the rows of a
model alternating so load changes hit each of them); ``x fp32`` = its ratio to the float32 row.
A backend passes at ``loss <= 0.05 dB``. ``--write-cards`` writes each model's bf16 figures into its
card (``precision.bf16``): ``amp="auto"`` then uses bf16 on CPUs with native bf16 when the loss
is within ``domainsr.engine.inferer.CPU_BF16_MAX_LOSS_DB``.

Results: printed, and written to ``benchmarks/results/backends.{json,md}``.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from collections.abc import Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality

from domainsr.engine.resources import cpu_bf16_native
from domainsr.io.atomic import atomic_path
from domainsr.models.card import PrecisionCheck
from domainsr.models.checkpoints import read_card, resolve_checkpoint
from domainsr.models.guided import is_guided
from domainsr.train.scoring import score

log = logging.getLogger("benchmarks.backends")
MAX_LOSS_DB = 0.05
MODELS = ("sentinel2-rgbn-x2", "sentinel2-20m-guided", "landsat8-pan-guided", "mri-t1-x2", "mri-slices-x4",
          "ct-slices-x4")


class LazyInt8(nn.Module):
    """A ``rescnn`` whose residual branch is quantised to int8 on its first call (calibrated there)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.inner, self.q = net, None
        for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
            setattr(self, k, getattr(net, k))

    def _branch(self, x: torch.Tensor) -> torch.Tensor:
        f = self.inner.head(x)
        return self.inner.tail(self.inner.body(f) + f)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch.ao.quantization import get_default_qconfig_mapping
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

        from domainsr.models.layers import pixel_shuffle_nd

        x = x.contiguous()
        if self.q is None and min(x.shape[2:]) < 48:  # a warm-up corner: no calibration on it
            return self.inner(x)
        if self.q is None:
            torch.backends.quantized.engine = "x86"
            branch = _Branch(self.inner).eval()
            prepared = prepare_fx(branch, get_default_qconfig_mapping("x86"), (x,))
            prepared(x)  # calibration: activation ranges of this window
            self.q = convert_fx(prepared)
        r = pixel_shuffle_nd(self.q(x), self.inner.scale)
        return r.float().add_(self.inner.base(x.float()))


class _Branch(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.head, self.body, self.tail = net.head, net.body, net.tail

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.head(x)
        return self.tail(self.body(f) + f)


class LazyOnnx(nn.Module):
    """A network run by ONNX Runtime: exported on its first call (dynamic spatial axes), then each
    call is one ``InferenceSession.run`` on CPU with :data:`quality.THREADS` threads."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.inner, self.session = net, None
        for k in ("scale", "spatial_dims", "in_channels", "out_channels", "receptive_radius"):
            setattr(self, k, getattr(net, k))

    def _export(self, x: torch.Tensor) -> Any:
        import tempfile

        import onnxruntime as ort

        axes = {d: f"s{d}" for d in (0, *range(2, x.ndim))}
        with tempfile.TemporaryDirectory(prefix="domainsr-onnx-") as tmp:
            path = Path(tmp) / "net.onnx"
            torch.onnx.export(self.inner, (x,), str(path), input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": axes, "y": {d: f"o{d}" for d in axes}}, opset_version=17,
                              dynamo=False)
            opts = ort.SessionOptions()
            opts.intra_op_num_threads, opts.inter_op_num_threads = quality.THREADS, 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().contiguous()
        if self.session is None:
            self.session = self._export(x)
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])


def onnx_network(module: nn.Module) -> nn.Module:
    """``module`` (a checkpoint's CardModel) with its network run by ONNX Runtime (in place)."""
    module.net = LazyOnnx(module.net)
    return module


def onnx_available() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))


def int8_rescnn(module: nn.Module) -> nn.Module:
    """``module`` with every ``rescnn`` inside it replaced by a :class:`LazyInt8` (in place)."""
    from domainsr.models.rescnn import ResCNN

    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ResCNN):
                setattr(parent, name, LazyInt8(child))
    return module


def _case(name: str, path: Path, quick: bool, engine: dict[str, Any],
          module: Callable[[torch.nn.Module], torch.nn.Module] | None = None) -> quality.Case:
    """The quality benchmark's held-out case with these engine options (and module transform)."""
    old = dict(quality.ENGINE), quality.MODULE
    quality.ENGINE.clear()
    quality.ENGINE.update(engine)
    quality.MODULE = module
    try:
        return quality.model_case(name, path, quick)
    finally:
        quality.ENGINE.clear()
        quality.ENGINE.update(old[0])
        quality.MODULE = old[1]


def _timed(case: quality.Case) -> tuple[list[np.ndarray], float]:
    warm = case.pairs[0].lr
    case.run(np.ascontiguousarray(warm[(slice(None), *(slice(0, min(n, 24)) for n in warm.shape[1:]))]))
    t0 = time.perf_counter()
    outs = [case.run(p.lr) for p in case.pairs]
    return outs, time.perf_counter() - t0


def rows_for(name: str, quick: bool, repeat: int) -> list[dict[str, Any]]:
    """float32, bf16, int8 (a rescnn) and the student (if shipped) on ``name``'s held-out case."""
    path = resolve_checkpoint(name)
    card = read_card(path)
    variants: dict[str, tuple[Path, dict[str, Any], Callable[[torch.nn.Module], torch.nn.Module] | None]] = {
        "float32": (path, {"amp": "off"}, None), "bf16": (path, {"amp": "bf16"}, None)}
    if card.architecture.name == "rescnn":
        variants["int8"] = (path, {"amp": "off", "channels_last": False}, int8_rescnn)
    if onnx_available() and not is_guided(card) and card.spatial_dims == 2:  # 3D: the exporter refuses a
        # memory-format call in the 3D network ("onnx memory_format support is not implemented")
        variants["onnx"] = (path, {"amp": "off", "channels_last": False}, onnx_network)
    student = quality.shipped([f"{name}-fast"]).get(f"{name}-fast")
    if student is not None:
        variants["student"] = (student, {"amp": "off"}, None)
    cases = {k: _case(name if k != "student" else f"{name}-fast", p, quick, e, m)
             for k, (p, e, m) in variants.items()}
    runs: dict[str, list[tuple[list[np.ndarray], float]]] = {k: [] for k in cases}
    for _ in range(max(1, repeat)):
        for k, case in cases.items():
            runs[k].append(_timed(case))
    ref = cases["float32"]
    lr_px = sum(int(np.prod(p.lr.shape[1:])) for p in ref.pairs)
    out = []
    for k, case in cases.items():
        outs, seconds = min(runs[k], key=lambda r: r[1])
        psnr, _, _, n = score(outs, ref.pairs, ref.scale)
        out.append({"model": name, "backend": k, "psnr": psnr, "seconds": seconds, "lr_mpx_per_s": lr_px / seconds / 1e6,
                    "n_scored": n, "architecture": card.architecture.name,
                    "checkpoint": read_card(variants[k][0]).name})
    base = out[0]
    for r in out:
        r["loss_db"] = base["psnr"] - r["psnr"]
        r["speedup"] = base["seconds"] / r["seconds"]
        r["pass"] = r["loss_db"] <= MAX_LOSS_DB
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = [(f"# Backends against float32 ({report['mode']}; {report['machine']}, {quality.THREADS} threads, "
             f"native bf16: {report['bf16_native']})"), "",
             "| model | backend | checkpoint | PSNR dB | loss dB | LR Mpx/s | x fp32 | loss <= 0.05 dB |",
             "|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r.get('backend', '-')} | - | - | - | - | - | error: {r['error']} |")
            continue
        ok = "-" if r["backend"] == "float32" else ("PASS" if r["pass"] else "FAIL")
        lines.append(f"| {r['model']} | {r['backend']} | {r['checkpoint']} | {r['psnr']:.3f} | {r['loss_db']:+.3f} | "
                     f"{r['lr_mpx_per_s']:.3f} | {r['speedup']:.2f}x | {ok} |")
    return "\n".join(lines) + "\n"


def write_cards(rows: Sequence[dict[str, Any]], machine: str) -> list[str]:
    """Record each model's bf16 row in its shipped card (``precision.bf16``); the weights are untouched."""
    done = []
    for r in rows:
        if r.get("backend") != "bf16":
            continue
        path = resolve_checkpoint(r["model"])
        card = read_card(path)
        check = PrecisionCheck(psnr_loss_db=round(float(r["loss_db"]), 4), speedup=round(float(r["speedup"]), 2),
                               measured_on=f"held-out test region, benchmarks/backends.py, {date.today()}, {machine}")
        card = card.model_copy(update={"precision": {**card.precision, "bf16": check}})
        with atomic_path(path) as tmp:
            Path(tmp).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        done.append(r["model"])
    return done


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(MODELS))
    ap.add_argument("--quick", action="store_true", help="cropped held-out regions (quality.py --quick)")
    ap.add_argument("--repeat", type=int, default=2, help="runs per row; the fastest is kept")
    ap.add_argument("--write-cards", action="store_true", help="record the bf16 rows in the shipped cards")
    ap.add_argument("--out", type=Path, default=quality.RESULTS)
    args = ap.parse_args(argv)
    torch.set_num_threads(quality.THREADS)
    machine = f"{platform.machine()} {platform.processor() or ''}".strip()
    rows: list[dict[str, Any]] = []
    for name in args.models:
        log.info("backends of %s", name)
        try:
            rows += rows_for(name, args.quick, args.repeat)
        except Exception as exc:
            log.exception("%s failed", name)
            rows.append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
    report = {"mode": "quick (cropped held-out regions)" if args.quick else "full held-out regions",
              "machine": machine, "bf16_native": cpu_bf16_native(), "torch": torch.__version__, "rows": rows}
    md = markdown(report)
    print(md)
    if args.write_cards and not args.quick:
        print("cards updated:", ", ".join(write_cards(rows, machine)) or "none")
    quality.write_results(args.out, "backends", report, md)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    main()
