"""Enhance a raster file of any size with bounded memory: read LR windows (with halo) through
rasterio, infer, and write HR windows as they are finished into a COG
(:class:`~domainsr.io.raster.RasterWindowWriter`).

Peak memory depends on the tile and batch size, not on the raster: in halo mode (the default)
each tile's core goes straight to the writer; in blend mode one band of output rows (one tile
row high, the raster wide) is accumulated and written as soon as no later tile touches it.
Writes cover whole output blocks (cores aligned to the block grid), and GDAL's block cache is
capped (``cache_mb``), so neither grows with the raster.

Windows are read by :class:`~domainsr.io.raster.RasterWindowReader`, the reader of
:func:`~domainsr.io.raster.read_raster`, so masks follow it (a pixel is valid where every selected
band is valid: nodata, mask bands, NaN/Inf), and streaming and
``write_raster(enhance_image(read_raster()))`` give the same file.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio

from domainsr.engine.inferer import PatchInferer
from domainsr.engine.sources import upsample_nearest
from domainsr.engine.tiling import TilePlan
from domainsr.errors import InputError, ModelCardMismatch
from domainsr.image import now_iso
from domainsr.io.raster import RasterWindowReader, RasterWindowWriter, common_units


class RasterSource:
    """The patch engine's tile source over a :class:`RasterWindowReader`: float32 windows and
    their invalid mask (per channel)."""

    def __init__(self, reader: RasterWindowReader) -> None:
        self.reader = reader
        self.channels = reader.channels
        self.shape = reader.shape

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        """Pixels of ``(rows, cols)`` slices as float32 ``(C, h, w)``, and where they are invalid."""
        rows, cols = slices
        data, valid = self.reader.read(((rows.start, rows.stop), (cols.start, cols.stop)))
        x = data.astype(np.float32, copy=False)
        invalid = None if valid is None else np.broadcast_to(~valid, x.shape).copy()
        return x, invalid


class _RowBand:
    """Output rows ``[top, top + rows)`` over the full width, blended in place, written when final
    in strips of whole blocks (``block`` rows)."""

    def __init__(self, channels: int, rows: int, cols: int, block: int) -> None:
        # ``block`` is a multiple of the LR->HR row factor, so flushed rows map to whole LR rows
        self.buf = np.zeros((channels, rows + block, cols), dtype=np.float32)
        self.top = 0
        self.block = block

    def view(self, out: tuple[slice, slice]) -> np.ndarray:
        r, c = out
        return self.buf[:, r.start - self.top:r.stop - self.top, c]

    def flush(self, upto: int, writer: RasterWindowWriter, source: RasterSource, plan: TilePlan) -> None:
        if upto < plan.out_shape[0]:  # keep a partial block row for the next flush
            upto = upto // self.block * self.block
        n = upto - self.top
        if n <= 0:
            return
        fr = plan.scale[0]
        lr = (slice(self.top // fr, upto // fr), slice(0, source.shape[1]))
        _, invalid = source.read(lr)
        rows = self.buf[:, :n]
        valid = None if invalid is None else ~upsample_nearest(invalid[0], plan.scale)
        writer.write(rows, self.top, 0, mask=valid)
        rest = self.buf.shape[1] - n
        self.buf[:, :rest] = self.buf[:, n:]
        self.buf[:, rest:] = 0.0
        self.top = upto


#: the output COG's block size (pixels per side) unless a caller asks for another
COG_BLOCKSIZE = 512


def enhance_raster_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], inferer: PatchInferer, *,
                        bands: Sequence[int | str] | None = None, dtype: str | None = None,
                        cache_mb: int = 64, blocksize: int = COG_BLOCKSIZE, overviews: bool = True,
                        model_info: Mapping[str, Any] | None = None,
                        band_names: Sequence[str] | None = None) -> Path:
    """Enhance raster ``src`` into the COG ``dst`` (written atomically) and return ``dst``.

    ``bands`` (1-based indexes or names) selects the input bands; ``dtype`` is the storage type
    (default: the source's, rounded and clipped); nodata and masks carry over. ``cache_mb`` caps
    GDAL's block cache; GDAL compresses with all CPUs unless ``GDAL_NUM_THREADS`` says otherwise.
    The COG is tagged as AI-derived (:func:`~domainsr.io.raster.derived_tags`) by ``model_info``
    (the app's model identity), default the inferer's model descriptor's record.
    ``band_names`` names the selected bands (e.g. from a ``--band-map``) instead of the source's.
    """
    src, dst = Path(src), Path(dst)
    with rasterio.Env(GDAL_CACHEMAX=int(cache_mb)):
        with RasterWindowReader(src, bands) as reader:
            n = reader.channels
            storage = dtype or reader.dtype
            geometry = reader.geometry
            if inferer.spatial_dims not in (None, 2):
                raise ModelCardMismatch(f"model is {inferer.spatial_dims}D but a raster has 2 spatial axes",
                                        src)
            if inferer.in_channels is not None and inferer.in_channels != n:
                raise ModelCardMismatch(f"model expects {inferer.in_channels} channels, {n} bands selected", src)
            source = RasterSource(reader)
            # cores on whole output blocks: every block is written once, whole, so GDAL's cache
            # never has to hold (or evict and re-read) a half-written block
            scale = inferer.scale_for(2)
            align = [blocksize // f if blocksize % f == 0 else 1 for f in scale]
            plan = inferer.plan(geometry.shape, channels=n, align=align)
            c_out = int(inferer.descriptor.out_channels or n)
            meta = reader.meta(storage)
            names = list(reader.band_names) if band_names is None else list(band_names)
            if c_out != n:
                names = None
            elif len(names) != n:
                raise InputError(f"{len(band_names or [])} band names for {n} selected bands", src)
            model = dict(model_info) if model_info else inferer.descriptor.record()
            meta["tags"] = {**meta["tags"], "DOMAINSR_ENHANCE": json.dumps({
                "time": now_iso(), "source": src.name, "model": model.get("name"),
                "model_checksum": model.get("sha256"), "scale": list(plan.scale),
                "tile": list(plan.window), "halo": list(plan.halo), "overlap": list(plan.overlap)})}
            if c_out != n:
                meta = {k: v for k, v in meta.items() if k == "tags"}
            writer = RasterWindowWriter(
                dst, geometry.scaled(plan.scale), c_out, storage, nodata=reader.nodata,
                masked=reader.nodata is None and reader.may_be_invalid,
                band_names=names, units=common_units(meta.get("units", [])), raster_meta=meta,
                blocksize=blocksize, overviews=overviews, model=model)
            writer.__enter__()
            try:
                if plan.blended:
                    _write_blended(plan, inferer, source, writer, c_out)
                else:
                    _write_cores(plan, inferer, source, writer, c_out)
            except BaseException as exc:
                writer.__exit__(type(exc), exc, exc.__traceback__)
                raise
        # COG conversion with multi-threaded compression (x2 faster on 2 cores); not during the
        # window writes, where GDAL's compression threads would hold many blocks in memory
        t0 = time.perf_counter()
        with rasterio.Env(GDAL_NUM_THREADS=os.environ.get("GDAL_NUM_THREADS", "ALL_CPUS")):
            writer.close()
        inferer.stats.write_seconds += time.perf_counter() - t0
    return dst


def _write_cores(plan: TilePlan, inferer: PatchInferer, source: RasterSource, writer: RasterWindowWriter,
                 c_out: int) -> None:
    for tile, y, invalid in inferer.tiles(plan, source):
        t0 = time.perf_counter()
        _write_core(plan, tile, y, invalid, writer, c_out)
        inferer.stats.write_seconds += time.perf_counter() - t0


def _write_core(plan: TilePlan, tile: Any, y: np.ndarray | None, invalid: np.ndarray | None,
                writer: RasterWindowWriter, c_out: int) -> None:
    r, c = tile.out
    if y is None:  # all invalid: write nodata without computing
        writer.write(np.zeros((c_out, r.stop - r.start, c.stop - c.start), np.float32), r.start, c.start,
                     mask=np.zeros((r.stop - r.start, c.stop - c.start), bool))
        return
    valid = None if invalid is None else ~upsample_nearest(invalid.any(axis=0), plan.scale)
    writer.write(y, r.start, c.start, mask=valid)


def _write_blended(plan: TilePlan, inferer: PatchInferer, source: RasterSource, writer: RasterWindowWriter,
                   c_out: int) -> None:
    rows = max(hi - lo for lo, hi in zip(plan.axes[0].lo, plan.axes[0].hi)) * plan.scale[0]
    band = _RowBand(c_out, rows, plan.out_shape[1], math.lcm(writer.blocksize, plan.scale[0]))
    row_index = -1
    for tile, y, _ in inferer.tiles(plan, source):
        if tile.index[0] != row_index:  # rows above this tile row's extent are final
            row_index = tile.index[0]
            t0 = time.perf_counter()
            band.flush(tile.out[0].start, writer, source, plan)
            inferer.stats.write_seconds += time.perf_counter() - t0
        if y is None:
            continue
        view = band.view(tile.out)
        view += plan.running_alpha(tile) * (y - view)
    t0 = time.perf_counter()
    band.flush(plan.out_shape[0], writer, source, plan)
    inferer.stats.write_seconds += time.perf_counter() - t0

