"""A full Sentinel-2 tile end to end (issue 17): wall time, peak memory and where the time goes.

The tile is a mirror mosaic of the real sample scene (B02/B03/B04/B08, 10 m) to 10980 x 10980 px
(``audit_fulltile.mirror_mosaic``). It is enhanced x2 by the command a user runs,
``domainsr enhance TILE --model sentinel2-rgbn-x2 --out OUT``, in a subprocess: streamed window by
window into a COG, then audited without a reference over the whole scene (every window of the
21960^2 px output), with the default settings (the engine's ``amp="auto"``: bf16 on a CPU with
native bf16 when the model card vouches for it; ``--precision off`` forces float32 for comparison).

Reported: wall time of the command; peak RSS of the whole process tree (sampled every 0.2 s: the CLI
and the Prefect server it starts) and of the largest single process (``ru_maxrss`` of the
children), and when the tree's peak came (``peak_at_s``, to place it in the split); the split from the output's provenance (``run.seconds``: enhance and audit; the streamed
step's ``seconds``: read, infer and write, the write including the COG conversion); the rest is
start-up (imports, Prefect, model loading) and the report. Goal: <= 10 min and <= 3 GB on 2 cores.

    python benchmarks/fulltile.py [--side 10980] [--precision auto|off|bf16] [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from audit_fulltile import mirror_mosaic

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentinel2-rgbn-x2"
GOAL_S, GOAL_GB = 600.0, 3.0


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_enhance(lr: Path, out: Path, precision: str) -> dict[str, Any]:
    """``domainsr enhance`` of ``lr`` in a subprocess: wall time, peak tree RSS, peak process RSS."""
    cmd = [sys.executable, "-m", "domainsr.cli", "enhance", str(lr), "--out", str(out), "--force", "--no-progress"]
    cfg = None
    if precision == "auto":
        cmd += ["--model", MODEL]
    else:  # the same model through a config that sets the engine's precision
        cfg = Path(tempfile.mkstemp(suffix=".yaml", prefix="fulltile-")[1])
        cfg.write_text(f"name: fulltile\ndomain: optical\nmodel: {{name: {MODEL}}}\n"
                       f"tiling: {{amp: {precision}}}\n", encoding="utf-8")
        cmd += ["--config", str(cfg)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, peak_at = psutil.Process(proc.pid), 0, 0.0
    while proc.poll() is None:
        rss = _tree_rss(ps)
        if rss > peak:
            peak, peak_at = rss, time.perf_counter() - t0
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log = proc.stdout.read() if proc.stdout else ""
    if cfg is not None:
        cfg.unlink()
    if proc.returncode not in (0, 4):  # 4: an audit verdict is FAIL (the outputs are written)
        raise SystemExit(f"enhance failed (exit {proc.returncode}):\n{log[-3000:]}")
    child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return {"wall_s": wall, "peak_tree_gb": peak / 2**30, "peak_process_gb": child_peak / 2**30,
            "peak_at_s": peak_at, "exit": proc.returncode, "log": log}


def split_of(sr: Path) -> dict[str, Any]:
    """The time split and the audit's outcome from the output's provenance and report."""
    record = json.loads(Path(f"{sr}.provenance.json").read_text())
    prov = record.get("provenance", record)  # the output's record wraps the image's provenance
    run = prov.get("run", {})
    step = next((h for h in prov.get("history", []) if h.get("step") == "enhance (streamed)"), {})
    secs = step.get("seconds", {})
    report_path = sr.with_name(sr.name.replace(".tif", ".audit.json"))
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    cov = report.get("coverage") or {}
    return {"enhance_s": run.get("seconds", {}).get("enhance"), "audit_s": run.get("seconds", {}).get("audit"),
            "read_s": secs.get("read"), "infer_s": secs.get("infer"), "write_s": secs.get("write"),
            "precision": step.get("precision"), "verdict": run.get("audit", {}).get("verdict"),
            "regions": len(report.get("regions", [])), "scene_fraction": cov.get("scene_fraction"),
            "report": str(report_path)}


def _cell(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=10980)
    ap.add_argument("--precision", default="auto", choices=("auto", "off", "bf16"))
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "domainsr" / "bench")
    args = ap.parse_args()
    lr = mirror_mosaic(args.work / ("s2_fulltile.tif" if args.side == 10980 else f"s2_{args.side}.tif"), args.side)
    out = args.work / f"fulltile_out_{args.precision}"
    r = run_enhance(lr, out, args.precision)
    sr = out / f"{lr.stem}_sr.tif"
    s = split_of(sr)
    known = sum(v for v in (s["enhance_s"], s["audit_s"]) if v is not None)
    row = {"lr": f"{args.side}x{args.side}x4", "sr_mpx": round(4 * args.side**2 / 1e6, 1), "cpus": os.cpu_count(),
           "precision_asked": args.precision, **{k: v for k, v in r.items() if k != "log"}, **s,
           "other_s": r["wall_s"] - known, "goal": {"wall_s": GOAL_S, "peak_gb": GOAL_GB},
           "pass": r["wall_s"] <= GOAL_S * args.side**2 / 10980**2 and r["peak_tree_gb"] <= GOAL_GB}
    print(f"peak tree RSS at {r['peak_at_s']:.0f} s of {r['wall_s']:.0f} (enhance ends about "
          f"{_cell(row['other_s'] + (s['enhance_s'] or 0))} s in)")
    print("| LR | precision | wall s | read s | infer s | write s | audit s | other s | peak RSS GB (tree / "
          "largest process) | verdict | regions | goal (<= 10 min, <= 3 GB) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| {row['lr']} | {s['precision'] or args.precision} | {r['wall_s']:.0f} | {_cell(s['read_s'])} | "
          f"{_cell(s['infer_s'])} | {_cell(s['write_s'])} | {_cell(s['audit_s'])} | {row['other_s']:.0f} | "
          f"{r['peak_tree_gb']:.2f} / {r['peak_process_gb']:.2f} | {s['verdict']} | {s['regions']} | "
          f"{'PASS' if row['pass'] else 'FAIL'} |")
    if args.side == 10980:
        dst = ROOT / "benchmarks" / "results" / f"fulltile_{args.precision}.json"
        dst.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
        print(f"written {dst}")


if __name__ == "__main__":
    main()
