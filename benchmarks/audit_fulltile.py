"""The whole-scene audit of a full Sentinel-2 tile: region count, verdict, time and peak memory.

The tile is a mirror mosaic of the real sample scene (B02/B03/B04/B08, 10 m) to 10980 x 10980 px,
enhanced x2 with the shipped ``sentinel2-rgbn-x2`` (streamed, ``--no-audit``), then audited
without a reference by ``domainsr.audit.audit_files``: every window of the 21960^2 px output,
against the LR input re-degraded by the model card's own operator (no test-time augmentation: it
would re-run the model four times). Prints one markdown table.

    python benchmarks/audit_fulltile.py [--side 10980] [--work DIR] [--tta]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sentinel2-rgbn-x2"


def mirror_mosaic(out: Path, side: int) -> Path:
    """The sample scene mirrored (reflect) to ``side`` x ``side`` px, a tiled GeoTIFF written in strips."""
    import rasterio
    from rasterio.windows import Window

    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image

    if out.exists():
        return out
    img = read_image(fetch_sample_data()["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    data = np.asarray(img.data)
    c, h, w = data.shape

    def reflect(n: int, length: int) -> np.ndarray:
        i = np.arange(n) % (2 * length)
        return np.where(i < length, i, 2 * length - 1 - i)

    rows, cols = reflect(side, h), reflect(side, w)
    profile = {"driver": "GTiff", "width": side, "height": side, "count": c, "dtype": str(data.dtype),
               "crs": img.geometry.crs, "transform": img.geometry.transform, "tiled": True, "blockxsize": 512,
               "blockysize": 512, "compress": "deflate", "nodata": 0, "BIGTIFF": "YES"}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".partial.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for b, name in enumerate(img.band_names):
            dst.set_band_description(b + 1, name)
        for r0 in range(0, side, 512):
            r1 = min(side, r0 + 512)
            dst.write(data[:, rows[r0:r1]][:, :, cols], window=Window(0, r0, side, r1 - r0))
    tmp.replace(out)
    return out


def enhanced(lr: Path, work: Path) -> Path:
    sr = work / "out" / f"{lr.stem}_sr.tif"
    if not sr.exists():
        subprocess.run([sys.executable, "-m", "domainsr.cli", "enhance", str(lr), "--model", MODEL, "--out",
                        str(sr.parent), "--no-audit"], check=True)
    return sr


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--side", type=int, default=10980)
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "domainsr" / "bench")
    ap.add_argument("--tta", action="store_true", help="also run the model under flips (4x the model time)")
    args = ap.parse_args()

    from domainsr.app.audits import consistency_operator
    from domainsr.app.models import model_identity
    from domainsr.audit import AuditThresholds, audit_files
    from domainsr.config import ModelRef

    lr = mirror_mosaic(args.work / ("s2_fulltile.tif" if args.side == 10980 else f"s2_{args.side}.tif"), args.side)
    sr = enhanced(lr, args.work)
    operator = consistency_operator(model_identity(ModelRef(name=MODEL)), (2, 2), 4)
    th = AuditThresholds(tta="flips" if args.tta else "off")
    model = None
    if args.tta:
        from domainsr.models.checkpoints import load_checkpoint

        model, _ = load_checkpoint(MODEL)
    t0 = time.perf_counter()
    result = audit_files(sr, lr, degradation=operator, thresholds=th, model=model,
                         risk_map_path=args.work / "out" / "fulltile_risk.tif")
    wall = time.perf_counter() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    s = result.summary()
    verdicts = {v: sum(r.verdict == v for r in result.regions) for v in ("pass", "review", "fail")}
    kinds: dict[str, int] = {}
    for r in result.regions:
        kinds[r.kind] = kinds.get(r.kind, 0) + 1
    cov = s.coverage
    row = {"lr": f"{args.side}x{args.side}x4", "sr_mpx": round(4 * args.side ** 2 / 1e6, 1),
           "scene_fraction": None if cov is None else cov.scene_fraction,
           "windows": None if cov is None else cov.windows, "verdict": result.verdict, "regions": len(result.regions),
           **{f"regions_{k}": v for k, v in verdicts.items()}, "kinds": kinds, "audit_s": round(wall, 1),
           "peak_rss_gb": round(peak_gb, 2), "tta": args.tta}
    print("| LR | SR Mpx | covered | windows | verdict | regions (pass/review/fail) | audit s | peak RSS GB |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['lr']} | {row['sr_mpx']} | {row['scene_fraction']} | {row['windows']} | {row['verdict']} | "
          f"{row['regions']} ({verdicts['pass']}/{verdicts['review']}/{verdicts['fail']}) | {row['audit_s']} | "
          f"{row['peak_rss_gb']} |")
    out = ROOT / "benchmarks" / "results" / "audit_fulltile.json"
    out.write_text(json.dumps(row, indent=2) + "\n", encoding="utf-8")
    print(f"kinds: {kinds}; reasons: {result.reasons}")


if __name__ == "__main__":
    main()
