"""One large raster enhanced on several Dask workers and assembled into one COG whose pixels
equal the single-machine streamed run's (``domainsr enhance`` of a raster above
``tiling.stream_above_mpx`` or the memory budget).

The coordinator (:func:`enhance_raster_split`) checks the model on the central probe window as
the streamed strategy does, plans the tiles once, cuts the plan into bands of whole tile rows
(:func:`~domainsr.engine.split.split_rows`) and submits one Dask task per band. Each worker gets
the same model (normalised on the same probe) and the same plan, reads its band's windows with
the model's halo (its receptive radius) from the file, and writes a part into a work folder
beside the output (a folder every worker can reach: loopback, or a shared file system). A lost
worker's band is rerun by Dask elsewhere (parts are renamed into place when complete). The
parts are then replayed through the single-machine writer, so the COG is written exactly as it
would have been, atomically (temporary file, then rename).

Measured (benchmarks/cluster.py, results/cluster.md) against ``dask.array.map_overlap`` with
``depth`` = the receptive radius: see the module docstring of :mod:`domainsr.engine.split`
for why bands of the engine's own tile rows keep pixels identical.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainsr.app.enhance import Enhanced, RasterProbe, Streamed, enhance_item, patch_inferer, probe_raster
from domainsr.app.runs import ItemResult, RunSpec
from domainsr.engine.streaming import COG_BLOCKSIZE as BLOCKSIZE
from domainsr.errors import ConfigError, DomainSRError
from domainsr.stores.base import Item, Store


@dataclass
class SplitResult:
    """The written COG, the bands (tile rows) it was cut into and the time of each step."""

    output: Path
    bands: list[tuple[int, int]]
    workers: int
    where: dict[str, int] = field(default_factory=dict)  #: bands computed per worker address
    seconds: dict[str, float] = field(default_factory=dict)
    raster: RasterProbe | None = None  #: the central window the model was checked on, and the model
    stats: dict[str, Any] = field(default_factory=dict)  #: tiles computed/skipped, precision, device


def enhance_raster_split(src: str | os.PathLike[str], dst: str | os.PathLike[str], spec: RunSpec, client: Any,
                         parts: int | None = None) -> SplitResult:
    """Enhance raster ``src`` into the COG ``dst`` with ``spec``'s model and tiling, one band of
    tile rows per Dask task on ``client``'s cluster (``parts`` bands; default twice the workers,
    so a lost worker costs a small band). ConfigError when the model's plan cannot be split
    (no known receptive radius: blended tiles)."""
    import torch

    from domainsr.engine.split import ReplayInferer, split_rows
    from domainsr.engine.streaming import enhance_raster_file

    t0 = time.perf_counter()
    src, dst = Path(src), Path(dst)
    cfg = spec.config
    p = probe_raster(src, cfg, spec.model, Item(id=src.stem, kind="raster", uri=str(src)))
    inferer = patch_inferer(p.module, cfg, None)
    scale = inferer.scale_for(2)
    plan = inferer.plan((p.rows, p.cols), channels=p.probe.channels,
                        align=[BLOCKSIZE // f if BLOCKSIZE % f == 0 else 1 for f in scale])
    addrs = sorted(client.scheduler_info(n_workers=-1)["workers"])
    workers = len(addrs)
    if workers < 1:
        raise DomainSRError("the Dask cluster has no workers", str(src))
    ranges = split_rows(plan, parts or 2 * workers)
    c_out = int(inferer.descriptor.out_channels or p.probe.channels)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.split-{os.getpid()}"
    work.mkdir(exist_ok=True)
    t_plan = time.perf_counter()
    try:
        model_f = client.scatter(p.module, broadcast=True)
        # round robin over the workers (the scheduler may otherwise keep short bands on one);
        # a lost worker's band goes to any other
        futures = [client.submit(_band_job, str(src), p.bands, model_f, cfg, plan, a, b, str(work / f"rows-{a:05d}"),
                                 c_out, key=f"domainsr-band-{dst.name}-{a}-{b}-{os.getpid()}", retries=1, pure=False,
                                 workers=[addrs[k % workers]], allow_other_workers=True)
                   for k, (a, b) in enumerate(ranges)]
        results = client.gather(futures)
        done = [part for part, _ in results]
        where: dict[str, int] = {}
        for holders in client.who_has(futures).values():
            for addr in holders[:1]:
                where[addr] = where.get(addr, 0) + 1
        t_bands = time.perf_counter()
        with torch.inference_mode():
            enhance_raster_file(src, dst, ReplayInferer(inferer, plan, done), bands=p.bands, model_info=p.info,
                                band_names=p.probe.band_names, blocksize=BLOCKSIZE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    t_end = time.perf_counter()
    secs = {"plan": round(t_plan - t0, 2), "bands": round(t_bands - t_plan, 2), "assemble": round(t_end - t_bands, 2),
            "total": round(t_end - t0, 2)}
    stats = {"computed": sum(int(st["computed"]) for _, st in results),
             "skipped": sum(int(st["skipped"]) for _, st in results), "precision": inferer.amp,
             "device": inferer.device.type, "scale": list(scale)}
    return SplitResult(dst, ranges, workers, where, secs, p, stats)



def _band_job(src: str, bands: list[int] | None, module: Any, cfg: Any, plan: Any, first: int, stop: int,
              part: str, c_out: int) -> tuple[str, dict[str, float]]:
    """On a worker: tile rows ``[first, stop)`` of ``plan`` into the part folder ``part``; the
    part and its tile counts."""
    import rasterio
    import torch

    from domainsr.engine.split import compute_band, part_stats
    from domainsr.engine.streaming import RasterSource
    from domainsr.io.raster import RasterWindowReader

    if Path(part).exists():  # done by an attempt whose result was lost with its worker
        return part, part_stats(part)
    inferer = patch_inferer(module, cfg, None)
    if not Path(src).exists():
        raise ConfigError(f"this worker cannot read {Path(src).name}: the input and the output folder must be "
                          "on a file system every worker reaches", src)
    with rasterio.Env(GDAL_CACHEMAX=64), RasterWindowReader(src, bands) as reader, torch.inference_mode():
        done = compute_band(inferer, plan, RasterSource(reader), first, stop, part, c_out)
    return str(done), part_stats(done)


class SplitStreamed(Streamed):
    """:class:`~domainsr.app.enhance.Streamed` with the enhancement split across the workers of
    ``client`` (:func:`enhance_raster_split`); the audit and the write are the streamed ones."""

    def __init__(self, client: Any, parts: int | None = None) -> None:
        super().__init__()
        self.client, self.parts = client, parts

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Any) -> Enhanced:
        path = str(item.meta.get("path", item.uri))
        self.out = store.open_output(item)
        res = enhance_raster_split(path, self.out, spec, self.client, self.parts)
        split = {"bands": len(res.bands), "workers": res.workers}
        history = {"tiles": {"computed": res.stats["computed"], "skipped": res.stats["skipped"]}, "split": split,
                   "seconds": res.seconds, "precision": res.stats["precision"], "device": res.stats["device"]}
        return self.enhanced(path, res.raster, res.stats["scale"], spec.config, "enhance (streamed, split)", history,
                             {"streamed": True, "split": len(res.bands)},
                             f"streamed, split in {len(res.bands)} bands over {res.workers} workers")


def enhance_item_split(store: Store, item: Item, spec: RunSpec, client: Any, parts: int | None = None) -> ItemResult:
    """:func:`~domainsr.app.enhance.enhance_item` for a large single-file raster, its enhancement
    split across ``client``'s workers (the same audit, write and result)."""
    return enhance_item(store, item, spec, SplitStreamed(client, parts))
