"""One file in seconds: end-to-end wall time of a one-file ``domainsr enhance`` (a fresh process,
``time.perf_counter`` around the subprocess) for each way its Prefect flow finds an API
(:mod:`domainsr.orchestration`), with ``domainsr info`` on the same file as the floor.

    .venv/bin/python benchmarks/onefile.py            # 3 runs per row, median
    .venv/bin/python benchmarks/onefile.py --runs 5

The input is a real 64x64 window of the Sentinel-2 sample's 10 m bands (B02, B03, B04, B08, uint16
DN), written as a GeoTIFF; rows run interleaved (run 1 of every row, then run 2, ...) against one
temporary PREFECT_HOME whose database a warm-up run has created, so load on a shared machine
spreads over all rows. Prints a markdown table and writes it to benchmarks/results/onefile.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "onefile.md"
TIMEOUT_S = 300


def _tiny_tif(path: Path) -> Path:
    import numpy as np

    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    s2 = read_image(fetch_sample_data()["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    start, shape = (900, 900), (64, 64)
    window = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, shape))
    mask = None if s2.mask is None else s2.mask[window[1:]]
    return write_raster(s2.derive(np.ascontiguousarray(s2.data[window]), geometry=s2.geometry.cropped(start, shape),
                                  mask=mask), path)


def _run(args: list[str], env: dict[str, str]) -> float:
    """Seconds for ``python -m domainsr.cli ARGS`` (it must exit 0)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "domainsr.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT_S, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"`domainsr {' '.join(args)}` exited {done.returncode}: {done.stderr[-800:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="domainsr-onefile-") as tmp:
        work = Path(tmp)
        tif = _tiny_tif(work / "tiny.tif")
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINSR_PREFECT", "DOMAINSR_WARM"))}
        base.update(PREFECT_HOME=str(work / "prefect-home"))

        def enhance(model: str, extra: list[str]) -> list[str]:
            return ["enhance", str(tif), "--model", model, *extra, "--out", str(work / "out"), "--no-audit",
                    "--force", "--no-progress"]

        cubic = enhance("cubic", ["--scale", "2"])
        rows = {  # label: (args, extra environment)
            "`domainsr info tiny.tif` (floor: no flow)": (["info", str(tif)], {}),
            "enhance cubic x2, Prefect's stock ephemeral server (`DOMAINSR_PREFECT_SERVER=prefect`)":
                (cubic, {"DOMAINSR_PREFECT_SERVER": "prefect"}),
            "enhance cubic x2, optimised ephemeral server (`DOMAINSR_PREFECT_SERVER=ephemeral`)":
                (cubic, {"DOMAINSR_PREFECT_SERVER": "ephemeral"}),
            "enhance cubic x2, reusing the managed server, no warm runner (`DOMAINSR_WARM_RUNNER=0`)":
                (cubic, {"DOMAINSR_WARM_RUNNER": "0"}),
            "enhance cubic x2, the managed server's warm runner (`domainsr server start`; the default)": (cubic, {}),
            "enhance sentinel2-rgbn-x2 (shipped checkpoint), the warm runner": (enhance("sentinel2-rgbn-x2", []), {}),
            "enhance sentinel2-rgbn-x2 with its audit, the warm runner":
                ([a for a in enhance("sentinel2-rgbn-x2", []) if a != "--no-audit"], {}),
        }
        _run(cubic, {**base, "DOMAINSR_PREFECT_SERVER": "ephemeral"})  # warm-up: creates the database
        times: dict[str, list[float]] = {label: [] for label in rows}
        server = json.loads(subprocess.run([sys.executable, "-m", "domainsr.cli", "server", "start", "--json"],
                                           env=base, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                                           check=True).stdout)
        try:
            for _ in range(opts.runs):
                for label, (args, extra) in rows.items():
                    times[label].append(_run(args, {**base, **extra}))
        finally:
            subprocess.run([sys.executable, "-m", "domainsr.cli", "server", "stop"], env=base, cwd=ROOT,
                           capture_output=True, timeout=60, check=False)
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    lines = [
        (f"One-file enhance, end to end (a fresh `python -m domainsr.cli` process; {opts.runs} runs per row, "
         f"median; {os.cpu_count()} CPUs, load average {load} at the end; managed server {server['url']})."),
        "",
        "| what | median s | runs s |",
        "|---|---:|---|",
        *(f"| {label} | {statistics.median(ts):.2f} | {', '.join(f'{t:.2f}' for t in ts)} |"
          for label, ts in times.items()),
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("# benchmarks/onefile.py\n\n" + text, encoding="utf-8")


if __name__ == "__main__":
    main()
