"""One raster's tile plan split into bands of whole tile rows, computed apart and replayed into
one COG with pixels identical to a single-machine streamed run.

Why bands of the engine's own tile rows: each band computes exactly the tiles (same windows,
same halo = the receptive radius, same batches) that :func:`~domainsr.engine.streaming.enhance_raster_file`
would, so no output pixel changes; windows cut on any other grid (``dask.array.map_overlap``
chunks, each with a tile plan of its own) agree only to float rounding.

* :func:`split_rows` cuts a halo-mode plan into ``parts`` contiguous ranges of tile rows;
* :func:`compute_band` runs the model over one range and keeps its outputs in a part (float32
  outputs and the LR invalid mask as ``.npy`` files, written atomically in a shared folder);
* :class:`ReplayInferer` yields the parts' tiles in plan order, so ``enhance_raster_file``
  writes the one COG exactly as it would have (same writes, tags, masks, overviews).

Memory of a band: one batch of tiles (the part is a memory map on disk). Disk: the parts hold
the float32 output, about the size of the single-machine run's work file.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.engine.sources import Source
from domainsr.engine.tiling import AxisPlan, Tile, TilePlan
from domainsr.errors import ConfigError, OutputError

PART_META = "part.json"


class SplitUnavailable(ConfigError):
    """The plan cannot be split without changing pixels (blended tiles); stream it on one machine."""


def split_rows(plan: TilePlan, parts: int) -> list[tuple[int, int]]:
    """``parts`` (at most one per tile row) contiguous ``[first, stop)`` ranges of tile rows,
    balanced by count. ConfigError for a blended plan (a tile's output overlaps its neighbours')."""
    if plan.blended:
        raise SplitUnavailable("only a halo-mode tile plan (a model with a known receptive radius, overlap 0) "
                          "can be split across workers without changing pixels")
    rows = plan.axes[0].count
    n = max(1, min(int(parts), rows))
    cuts = [round(i * rows / n) for i in range(n + 1)]
    return [(a, b) for a, b in itertools.pairwise(cuts) if b > a]


def band_plan(plan: TilePlan, first: int, stop: int) -> TilePlan:
    """``plan`` restricted to tile rows ``[first, stop)`` (image coordinates unchanged)."""
    a = plan.axes[0]
    if not 0 <= first < stop <= a.count:
        raise ConfigError(f"tile rows {first}:{stop} are outside the plan's {a.count}")
    sub = AxisPlan(a.length, a.window, a.starts[first:stop], a.lo[first:stop], a.hi[first:stop])
    return dataclasses.replace(plan, axes=(sub, *plan.axes[1:]))


def band_out_rows(plan: TilePlan, first: int, stop: int) -> tuple[int, int]:
    """The output (HR) rows ``[top, bottom)`` that tile rows ``[first, stop)`` write."""
    a, f = plan.axes[0], plan.scale[0]
    return a.lo[first] * f, a.hi[stop - 1] * f


def compute_band(inferer: Any, plan: TilePlan, source: Source, first: int, stop: int,
                 part: str | os.PathLike[str], c_out: int) -> Path:
    """Run ``inferer`` over tile rows ``[first, stop)`` of ``plan`` and store them in the folder
    ``part`` (``y.npy``: float32 ``(c_out, rows, cols)`` output rows; ``invalid.npy``: the LR
    invalid pixels of the band; ``part.json``: which tiles were computed). The folder appears
    complete or not at all (a temporary sibling, renamed)."""
    final = Path(part)
    tmp = final.with_name(f".{final.name}.partial-{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    sub = band_plan(plan, first, stop)
    top, bottom = band_out_rows(plan, first, stop)
    f0 = plan.scale[0]
    lr_top, lr_bottom = top // f0, bottom // f0
    y_all = np.lib.format.open_memmap(tmp / "y.npy", mode="w+", dtype=np.float32,
                                      shape=(c_out, bottom - top, plan.out_shape[1]))
    invalid_all = np.zeros((lr_bottom - lr_top, plan.shape[1]), dtype=bool)
    skipped: list[list[int]] = []
    for tile, y, invalid in inferer.tiles(sub, source):
        r, c = tile.out
        if y is None:
            skipped.append([tile.index[0] + first, tile.index[1]])
        else:
            y_all[:, r.start - top:r.stop - top, c] = y
        if invalid is not None:
            lr_r, lr_c = tile.region
            invalid_all[lr_r.start - lr_top:lr_r.stop - lr_top, lr_c] = invalid.any(axis=0)
    y_all.flush()
    del y_all
    np.save(tmp / "invalid.npy", invalid_all)
    (tmp / PART_META).write_text(json.dumps({"rows": [first, stop], "out_rows": [top, bottom],
                                             "skipped": skipped, "stats": _stats(inferer)}), encoding="utf-8")
    if final.exists():  # an earlier attempt (a worker lost after the rename): same content
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return final
    os.replace(tmp, final)
    return final


def part_stats(part: str | os.PathLike[str]) -> dict[str, float]:
    """The tile counts and times a part records."""
    return dict(_read_part(Path(part))["stats"])


def _stats(inferer: Any) -> dict[str, float]:
    st = inferer.stats
    return {k: float(getattr(st, k, 0) or 0) for k in ("computed", "skipped", "read_seconds", "infer_seconds")}


class ReplayInferer:
    """Stands in for a :class:`~domainsr.engine.inferer.PatchInferer` in
    :func:`~domainsr.engine.streaming.enhance_raster_file`: its plan is the split plan and its
    tiles come from the parts (every other attribute is the real inferer's)."""

    def __init__(self, inferer: Any, plan: TilePlan, parts: Sequence[str | os.PathLike[str]]) -> None:
        self._inferer, self._plan = inferer, plan
        self._parts = sorted((_read_part(Path(p)) for p in parts), key=lambda m: m["rows"][0])
        rows = [m["rows"] for m in self._parts]
        expected = [r[0] for r in rows[1:]] == [r[1] for r in rows[:-1]] and rows and rows[0][0] == 0 \
            and rows[-1][1] == plan.axes[0].count
        if not expected:
            raise OutputError(f"the parts cover tile rows {rows}, not 0:{plan.axes[0].count}")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inferer, name)

    def plan(self, shape: Sequence[int], *, channels: int | None = None, align: Any = 1) -> TilePlan:
        if tuple(shape) != self._plan.shape:
            raise OutputError(f"the split plan is for {self._plan.shape}, the raster is {tuple(shape)}")
        return self._plan

    def tiles(self, plan: TilePlan, source: Source) -> Iterator[tuple[Tile, np.ndarray | None, np.ndarray | None]]:
        """The parts' tiles in plan order: ``(tile, y over tile.out, LR invalid over tile.region)``."""
        f0 = plan.scale[0]
        for meta in self._parts:
            first, stop = meta["rows"]
            top = meta["out_rows"][0]
            y_all = np.load(meta["dir"] / "y.npy", mmap_mode="r")
            invalid_all = np.load(meta["dir"] / "invalid.npy")
            skipped = {tuple(t) for t in meta["skipped"]}
            for i in range(first, stop):
                for j in range(plan.axes[1].count):
                    tile = plan.tile((i, j))
                    lr_r, lr_c = tile.region
                    inv = invalid_all[lr_r.start - top // f0:lr_r.stop - top // f0, lr_c]
                    invalid = inv[None] if inv.any() else None
                    if (i, j) in skipped:
                        yield tile, None, invalid
                        continue
                    r, c = tile.out
                    yield tile, np.array(y_all[:, r.start - top:r.stop - top, c]), invalid
            del y_all


def _read_part(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / PART_META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OutputError(f"part {path.name} is missing or incomplete ({exc})", path) from exc
    meta["dir"] = path
    return meta
