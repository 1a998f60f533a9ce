"""Peak memory and time of the whole-scene windowed audit (``audit_files``) on real Sentinel-2 data.

``make SIZE DIR``: an LR GeoTIFF of the sample's 10 m bands B02 B03 B04 B08 (a central crop, or for
scenes larger than the sample, the sample mirror-tiled) and its x2 cubic SR (``SIZE`` x ``SIZE``
SR pixels), written strip by strip. ``audit DIR``: the reference-free audit with the risk map;
prints time, windows, regions and the peak RSS (``ru_maxrss``). Run it under ``/usr/bin/time -v``
to see the same peak from outside::

    python benchmarks/audit_memory.py make 2048 /tmp/s2_2048
    /usr/bin/time -v python benchmarks/audit_memory.py audit /tmp/s2_2048
"""
from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _mirror(n: int, size: int) -> np.ndarray:
    """Indices ``0..n-1`` of a mirror-tiled axis of ``size`` samples (``a b c c b a a b c ...``)."""
    i = np.arange(size) % (2 * n)
    return np.where(i < n, i, 2 * n - 1 - i)


def make(size: int, out: Path) -> None:
    from domainsr.audit import interpolation_enhancer
    from domainsr.data import fetch_sample_data
    from domainsr.io import read_image
    from domainsr.io.raster import RasterWindowWriter

    img = read_image(fetch_sample_data()["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    n = size // 2
    rows, cols = img.spatial_shape
    if n <= min(rows, cols):
        r0, c0 = (rows - n) // 2, (cols - n) // 2
        data = np.ascontiguousarray(img.data[:, r0:r0 + n, c0:c0 + n])
    else:
        data = img.data[:, _mirror(rows, n)][:, :, _mirror(cols, n)]
    geom = img.geometry.cropped((0, 0), (n, n))
    out.mkdir(parents=True, exist_ok=True)
    lr = img.derive(data, geometry=geom, mask=None)
    cubic = interpolation_enhancer("cubic", 4, (2, 2))
    with RasterWindowWriter(out / "lr.tif", geom, 4, "uint16", band_names=lr.band_names) as w:
        w.write(data, 0, 0)
    strip, halo = 256, 4
    with RasterWindowWriter(out / "sr.tif", geom.scaled((2, 2)), 4, "uint16", band_names=lr.band_names) as w:
        for r in range(0, n, strip):
            a, b = max(0, r - halo), min(n, r + strip + halo)
            part = lr.derive(data[:, a:b], geometry=geom.cropped((a, 0), (b - a, n)))
            sr = np.asarray(cubic(part).data)[:, 2 * (r - a):2 * (r - a + min(strip, n - r))]
            w.write(np.clip(np.round(sr), 0, 65535).astype(np.uint16), 2 * r, 0)


def audit(folder: Path) -> dict[str, object]:
    from domainsr.audit import AuditThresholds
    from domainsr.audit.protocol import audit_files

    t0 = time.perf_counter()
    res = audit_files(folder / "sr.tif", folder / "lr.tif", thresholds=AuditThresholds(tta="off"),
                      risk_map_path=folder / "risk.tif")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    verdicts = {v: sum(r.verdict == v for r in res.regions) for v in ("pass", "review", "fail")}
    return {"sr_shape": res.coverage_shape(), "seconds": round(time.perf_counter() - t0, 1),
            "windows": res.coverage.windows if res.coverage else None, "stride": res.stride,
            "regions": len(res.regions), "verdicts": verdicts, "verdict": res.verdict,
            "peak_rss_mb": round(rss, 1), "timings_s": res.timings}


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(int(sys.argv[2]), Path(sys.argv[3]))
    else:
        print(json.dumps(audit(Path(sys.argv[2])), indent=1))
