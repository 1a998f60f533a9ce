"""Batched patch inference of any SR module over arrays and SpatialImages.

:class:`PatchInferer` wraps a ``torch.nn.Module`` mapping ``(B, C, *window)`` float32 to
``(B, C_out, *window * scale)``. Scale and receptive radius come from the module's ``scale`` and
``receptive_radius`` attributes (as registry models expose them) or from explicit arguments.
Tiles are planned by :class:`~domainsr.engine.tiling.TilePlan`; the output is assembled in one
float32 buffer (no weight buffer, see ``TilePlan.running_alpha``).

Invalid input (mask ``False`` or non-finite values) never poisons a tile: before inference each
invalid pixel is filled with its nearest valid neighbour in the window, and afterwards the
output is set to ``fill`` over the (nearest-upsampled) invalid pixels. Tiles whose region holds
no valid pixel are not computed.
"""
from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import torch

from domainsr.engine.progress import Progress
from domainsr.engine.tiling import Blend, Border, Tile, TilePlan, per_axis
from domainsr.errors import ConfigError, ModelCardMismatch, ModelError
from domainsr.image import SpatialImage

log = logging.getLogger(__name__)

Amp = Literal["auto", "bf16", "fp16", "off"]

#: Default windows (LR px per axis) stay within these bounds; inside them the largest window the
#: memory budget allows is used. Larger windows recompute less halo, and per pixel they run as
#: fast as small ones on CPU (measured: EDSR-baseline from 256 to 1024 px), and faster when the
#: machine is shared (fewer, longer parallel regions for preempted threads to stall).
WINDOW_BOUNDS = {2: (64, 1536), 3: (24, 192)}
#: Peak memory of one tile ~ LIVE_ACTIVATIONS x its largest activation; a batch of tiles may take
#: MEMORY_FRACTION of the free memory (RAM on CPU, device memory on CUDA).
LIVE_ACTIVATIONS = 3
MEMORY_FRACTION = 0.25
#: LR pixels per forward pass that the automatic batch size aims for (on CPU one tile is best).
BATCH_PIXELS = {"cpu": 2**16, "cuda": 2**21}


def activation_bytes(model: torch.nn.Module, nd: int, channels: int) -> float | None:
    """Bytes (float32) of the model's largest activation per LR input pixel, measured by running
    it once on a 16^2 / 8^3 zero input with hooks; ``None`` if the model rejects the probe."""
    size = 16 if nd == 2 else 8
    outs: list[int] = []

    def hook(mod: torch.nn.Module, inp: Any, out: Any) -> None:
        if isinstance(out, torch.Tensor):
            outs.append(out.numel())

    param = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = param.device if param is not None else torch.device("cpu")
    hooks = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.inference_mode():
            model.eval()(torch.zeros(1, channels, *(size,) * nd, device=device))
    except Exception:  # noqa: BLE001 - any model that rejects the probe (size rules) just gets no estimate
        return None
    finally:
        for h in hooks:
            h.remove()
    return 4.0 * max(outs, default=channels * size**nd) / size**nd


class Source(Protocol):
    """Where tiles are read from: ``read(slices)`` returns float32 data ``(C, *window)`` and the
    invalid pixels ``(C, *window)`` (or ``None`` when all are valid)."""

    channels: int
    shape: tuple[int, ...]

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]: ...


class ArraySource:
    """Reads tiles from an in-memory ``(C, *spatial)`` array with an optional valid mask
    (``(*spatial)`` or ``(C, *spatial)``, ``True`` = valid)."""

    def __init__(self, array: np.ndarray, mask: np.ndarray | None = None) -> None:
        self.array = array
        self.channels = int(array.shape[0])
        self.shape = tuple(int(s) for s in array.shape[1:])
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape not in (self.shape, array.shape):
                raise ConfigError(f"mask shape {mask.shape} fits neither {self.shape} nor {array.shape}")
        self.mask = mask

    def read(self, slices: tuple[slice, ...]) -> tuple[np.ndarray, np.ndarray | None]:
        x = np.array(self.array[(slice(None), *slices)], dtype=np.float32)  # always a fresh copy
        invalid = None
        if self.mask is not None:
            m = self.mask[slices] if self.mask.ndim == len(self.shape) else self.mask[(slice(None), *slices)]
            if not m.all():
                invalid = np.broadcast_to(~m, x.shape).copy()
        if self.array.dtype.kind in "fc":
            bad = ~np.isfinite(x)
            if bad.any():
                invalid = bad if invalid is None else invalid | bad
        return x, invalid


def fill_invalid(x: np.ndarray, invalid: np.ndarray | None) -> np.ndarray:
    """Replace invalid pixels of each channel by the nearest valid pixel of that channel (in
    place); a channel without any valid pixel becomes 0. Channels that share an invalid pattern
    share one distance transform."""
    if invalid is None:
        return x
    from scipy.ndimage import distance_transform_edt

    cached_mask, cached_idx = None, None
    for c in range(x.shape[0]):
        inv = invalid[c]
        if not inv.any():
            continue
        if inv.all():
            x[c] = 0.0
            continue
        if cached_mask is None or not np.array_equal(inv, cached_mask):
            cached_idx = distance_transform_edt(inv, return_distances=False, return_indices=True)
            cached_mask = inv
        x[c][inv] = x[c][tuple(i[inv] for i in cached_idx)]
    return x


def upsample_nearest(a: np.ndarray, scale: Sequence[int]) -> np.ndarray:
    """Nearest-neighbour upsampling of the trailing ``len(scale)`` axes by integer factors."""
    lead = a.ndim - len(scale)
    for ax, f in enumerate(scale):
        if f > 1:
            a = np.repeat(a, f, axis=lead + ax)
    return a


def mask_output(y: np.ndarray, invalid: np.ndarray | None, scale: Sequence[int], fill: float) -> None:
    """Set ``y`` (``(C_out, *hr)``) to ``fill`` where the LR ``invalid`` (``(C_in, *lr)``) is set:
    per channel when ``C_out == C_in``, else where any input channel is invalid."""
    if invalid is None or not invalid.any():
        return
    m = invalid if invalid.shape[0] == y.shape[0] else invalid.any(axis=0, keepdims=True)
    np.copyto(y, np.float32(fill), where=upsample_nearest(m, scale))


def physical_cores() -> int:
    """Physical cores this process may run on."""
    import psutil

    avail = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(psutil.cpu_count(logical=False) or avail, avail))


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != old:
            torch.set_num_threads(old)


def _halo_of(model: torch.nn.Module, nd: int) -> tuple[int, ...] | None:
    r = getattr(model, "receptive_radius", None)
    if r is None:
        return None
    vals = per_axis(r, nd, "receptive_radius")
    if any(not math.isfinite(float(v)) for v in vals):
        return None
    return tuple(math.ceil(float(v)) for v in vals)


@dataclass
class RunStats:
    """What the last run did (for logs, provenance and tests)."""

    tiles: int = 0
    computed: int = 0
    skipped: int = 0
    batches: int = 0
    seconds: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)


class PatchInferer:
    """Tiled, batched inference of an SR module.

    Args:
        model: any module ``(B, C, *w) -> (B, C_out, *w * scale)``; put in eval mode and moved to
            the device (and to channels-last where used) in place.
        scale: integer factor per spatial axis (default ``model.scale``).
        halo: LR context per axis cropped from each tile (default ``ceil(model.receptive_radius)``;
            unknown or infinite radius -> ``tile // 16`` with ``overlap = tile // 8`` blending).
        tile: largest LR window per axis; the plan uses the fewest windows of at most this size
            and shrinks them to just cover the image. Default: the largest within
            ``WINDOW_BOUNDS`` whose activations (measured by a tiny probe) fit ``MEMORY_FRACTION``
            of the free memory.
        overlap: extra LR overlap blended between tiles beyond the halo (0 = halo mode: exact).
        batch_size: tiles per forward pass (default from ``BATCH_PIXELS``).
        device: ``"auto"`` (CUDA if available, else CPU), or any torch device.
        amp: ``"auto"`` (bf16 where supported else fp16 on CUDA; float32 on CPU), ``"bf16"``,
            ``"fp16"`` or ``"off"``.
        blend: window profile over the overlap, ``"cosine"`` or ``"gaussian"``.
        border: ``"model"`` (windows stay inside the image; tiled == one whole-image pass) or
            ``"reflect"`` (windows reach ``halo`` past the border, reflect-padded).
        threads: torch CPU threads during a run (default: physical cores).
        channels_last: memory format (default: on for 2D/3D convs on CPU and CUDA; it is
            ~1.7x faster for EDSR-style nets on CPU with oneDNN).
        progress: ``progress(done_tiles, total_tiles)`` callback.
    """

    def __init__(self, model: torch.nn.Module, *, scale: int | Sequence[int] | None = None,
                 halo: int | Sequence[int] | None = None, tile: int | Sequence[int] | None = None,
                 overlap: int | Sequence[int] = 0, batch_size: int | None = None,
                 device: str | torch.device = "auto", amp: Amp = "auto", blend: Blend = "cosine",
                 border: Border = "model", threads: int | None = None,
                 channels_last: bool | None = None, progress: Progress | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise ModelError(f"expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.spatial_dims: int | None = getattr(model, "spatial_dims", None)
        self._scale = scale if scale is not None else getattr(model, "scale", None)
        if self._scale is None:
            raise ConfigError(f"model {type(model).__name__} has no 'scale'; pass scale=")
        self._halo = halo
        self._tile = tile
        self._overlap = overlap
        self.batch_size = batch_size
        self.blend: Blend = blend
        self.border: Border = border
        self.progress = progress
        self.threads = threads if threads is not None else physical_cores()
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        cuda = self.device.type == "cuda"
        if amp == "auto":
            amp = ("bf16" if torch.cuda.is_bf16_supported() else "fp16") if cuda else "off"
        if amp not in ("bf16", "fp16", "off"):
            raise ConfigError(f"unknown amp setting {amp!r}; expected auto, bf16, fp16 or off")
        self.amp: str = amp
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[amp]
        self.channels_last = True if channels_last is None else channels_last
        self.in_channels: int | None = getattr(model, "in_channels", None)
        self.stats = RunStats()
        self._prepared_format: torch.memory_format | None = None
        self._act: dict[tuple[int, int], float | None] = {}

    # ---- planning -----------------------------------------------------------------------------
    def scale_for(self, nd: int) -> tuple[int, ...]:
        s = per_axis(self._scale, nd, "scale")
        if any(float(f) != int(f) or f < 1 for f in s):
            raise ConfigError(f"patch inference needs whole scale factors >= 1, got {s}")
        return tuple(int(f) for f in s)

    def plan(self, shape: Sequence[int], *, channels: int | None = None,
             align: int | Sequence[int] = 1) -> TilePlan:
        """The tile plan this inferer uses for an LR grid of ``shape`` with ``channels`` input
        channels (default ``model.in_channels``); ``align``: see :meth:`TilePlan.build`
        (streaming aligns cores to the output blocks)."""
        nd = len(shape)
        if self.spatial_dims is not None and self.spatial_dims != nd:
            raise ModelCardMismatch(f"model is {self.spatial_dims}D but the image has {nd} spatial axes")
        channels = channels or self.in_channels
        overlap = per_axis(self._overlap, nd, "overlap")
        halo = per_axis(self._halo, nd, "halo") if self._halo is not None else _halo_of(self.model, nd)
        if halo is None:  # unknown/global receptive field: crop a margin and blend the rest
            if self._tile is not None:
                tile = per_axis(self._tile, nd, "tile")
            else:
                auto = self._auto_window(nd, (0,) * nd, channels)
                tile = tuple(min(w, 512 if nd == 2 else 96) for w in auto)
            halo = tuple(t // 16 for t in tile)
            if not any(overlap):
                overlap = tuple(max(1, t // 8) for t in tile)
        elif self._tile is not None:
            tile = per_axis(self._tile, nd, "tile")
        else:
            tile = self._auto_window(nd, tuple(2 * h + o for h, o in zip(halo, overlap)), channels)
        plan = TilePlan.build(shape, scale=self.scale_for(nd), window=tile, halo=halo, overlap=overlap,
                              border=self.border, blend=self.blend, align=align)
        if plan.redundancy() > 4:
            log.warning("the tiles recompute %.1fx the image: a halo of %s px (the model's receptive radius) "
                        "in windows of %s px; pass a smaller halo= with overlap= blending, or a larger tile=",
                        plan.redundancy(), list(plan.halo), list(plan.window))
        return plan

    def _act_bytes(self, nd: int, channels: int | None) -> float | None:
        if not channels:
            return None
        key = (nd, channels)
        if key not in self._act:
            self._act[key] = activation_bytes(self.model, nd, channels)
        return self._act[key]

    def _free_memory(self) -> int:
        if self.device.type == "cuda":
            return int(torch.cuda.mem_get_info(self.device)[0])
        import psutil

        return int(psutil.virtual_memory().available)

    def _auto_window(self, nd: int, extra: tuple[int, ...], channels: int | None) -> tuple[int, ...]:
        """Default window ``core + extra`` per axis (``extra`` = 2 x halo + overlap): the largest
        within ``WINDOW_BOUNDS`` whose activations fit the memory budget."""
        lo, hi = WINDOW_BOUNDS.get(nd, (16, 256))

        def windows(b: int) -> tuple[int, ...]:
            return tuple(min(hi, max(lo, b + e)) for e in extra)

        act = self._act_bytes(nd, channels)
        if act is None:
            return windows(hi)
        limit = MEMORY_FRACTION * self._free_memory() / (LIVE_ACTIVATIONS * act)
        b_lo, b_hi = 1, hi  # largest core b whose windows fit the budget (at least 1)
        while b_lo < b_hi:
            mid = (b_lo + b_hi + 1) // 2
            b_lo, b_hi = (mid, b_hi) if math.prod(windows(mid)) <= limit else (b_lo, mid - 1)
        return windows(b_lo)

    def auto_batch(self, plan: TilePlan, channels: int | None = None) -> int:
        """Tiles per forward pass: ``batch_size``, else ``BATCH_PIXELS`` worth of tiles, no more
        than the memory budget holds."""
        if self.batch_size is not None:
            return max(1, min(len(plan), int(self.batch_size)))
        px = math.prod(plan.window)
        n = BATCH_PIXELS.get(self.device.type, BATCH_PIXELS["cpu"]) // px
        act = self._act_bytes(len(plan.shape), channels or self.in_channels)
        if act is not None:
            n = min(n, int(MEMORY_FRACTION * self._free_memory() // (LIVE_ACTIVATIONS * act * px)))
        return max(1, min(len(plan), n))

    # ---- model ----------------------------------------------------------------------------------
    def _memory_format(self, nd: int) -> torch.memory_format | None:
        if not self.channels_last:
            return None
        return {2: torch.channels_last, 3: torch.channels_last_3d}.get(nd)

    def _prepare(self, nd: int) -> None:
        fmt = self._memory_format(nd) or torch.contiguous_format
        self.model.eval()
        if self._prepared_format != fmt:
            self.model.to(device=self.device, memory_format=fmt)
            self._prepared_format = fmt

    @contextmanager
    def _session(self, nd: int) -> Iterator[None]:
        """inference mode, threads, and deterministic kernels for the length of a run."""
        cudnn = torch.backends.cudnn
        old = (cudnn.deterministic, cudnn.benchmark)
        try:
            with _torch_threads(self.threads), torch.inference_mode():
                cudnn.deterministic, cudnn.benchmark = True, False
                self._prepare(nd)
                yield
        finally:
            cudnn.deterministic, cudnn.benchmark = old

    def forward(self, batch: np.ndarray | torch.Tensor,
                out_window: Sequence[int] | None = None) -> np.ndarray:
        """One forward pass of a ``(B, C, *w)`` float32 batch; returns float32 numpy on the CPU."""
        x = torch.as_tensor(batch)
        nd = x.ndim - 2
        if self.device.type == "cuda":
            x = (x if x.is_pinned() else x.pin_memory()).to(self.device, non_blocking=True)
        fmt = self._memory_format(nd)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        amp = (torch.autocast(self.device.type, dtype=self._amp_dtype) if self._amp_dtype is not None
               else nullcontext())
        with amp:
            y = self.model(x)
        if not isinstance(y, torch.Tensor) or y.ndim != x.ndim or y.shape[0] != x.shape[0]:
            raise ModelError(f"model {type(self.model).__name__} returned "
                             f"{getattr(y, 'shape', type(y).__name__)} for input {tuple(x.shape)}")
        if out_window is not None and tuple(y.shape[2:]) != tuple(out_window):
            raise ModelError(f"model {type(self.model).__name__} returned spatial shape "
                             f"{tuple(y.shape[2:])} for input {tuple(x.shape[2:])}; expected "
                             f"{tuple(out_window)} (scale {self._scale})")
        return y.float().cpu().numpy()

    # ---- tile stream ------------------------------------------------------------------------------
    def _read(self, source: Source, tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
        x, invalid = source.read(tile.src)
        if any(p != (0, 0) for p in tile.pad):
            pads = ((0, 0), *tile.pad)
            x = np.pad(x, pads, mode="reflect")
            if invalid is not None:
                invalid = np.pad(invalid, pads, mode="reflect")
        return x, invalid

    def tiles(self, plan: TilePlan,
              source: Source) -> Iterator[tuple[Tile, np.ndarray | None, np.ndarray | None]]:
        """Run the model over ``plan`` and yield, in plan order, ``(tile, y, invalid)``: ``y`` is
        the output over ``tile.out`` (``None`` for a skipped all-invalid tile) and ``invalid`` the
        LR invalid pixels over ``tile.region`` (``None`` when all valid)."""
        if self.in_channels is not None and source.channels != self.in_channels:
            raise ModelCardMismatch(f"model expects {self.in_channels} channels, input has {source.channels}")
        nd = len(plan.shape)
        bsize = self.auto_batch(plan, source.channels)
        total, done = len(plan), 0
        self.stats = RunStats(tiles=total, plan={
            "grid": list(plan.grid), "tile": list(plan.window), "halo": list(plan.halo),
            "overlap": list(plan.overlap), "border": plan.border, "blended": plan.blended,
            "batch_size": bsize, "redundancy": round(plan.redundancy(), 4)})
        t0 = time.perf_counter()
        pending: list[tuple[Tile, np.ndarray | None, bool]] = []  # (tile, invalid in region, computed)
        shape = (bsize, source.channels, *plan.window)
        # the batch is assembled in place; on CUDA in pinned memory, for asynchronous copies
        buf = (torch.empty(shape, pin_memory=True).numpy() if self.device.type == "cuda"
               else np.empty(shape, dtype=np.float32))
        n_in = 0

        def flush() -> Iterator[tuple[Tile, np.ndarray | None, np.ndarray | None]]:
            nonlocal n_in, done
            y = self.forward(buf[:n_in], plan.out_window) if n_in else None
            if n_in:
                self.stats.batches += 1
                self.stats.computed += n_in
            k = 0
            for tile, reg_invalid, computed in pending:
                if computed:
                    yield tile, y[k][(slice(None), *tile.crop)], reg_invalid
                    k += 1
                else:
                    yield tile, None, reg_invalid
            done += len(pending)
            pending.clear()
            n_in = 0
            if self.progress is not None:
                self.progress(done, total)

        with self._session(nd):
            for tile in plan:
                x, invalid = self._read(source, tile)
                reg_invalid = None
                if invalid is not None:
                    in_region = tuple(slice(r.start - s.start + p[0], r.stop - s.start + p[0])
                                      for r, s, p in zip(tile.region, tile.src, tile.pad))
                    reg_invalid = invalid[(slice(None), *in_region)]
                    if reg_invalid.all():  # nothing valid to write: not computed
                        self.stats.skipped += 1
                        pending.append((tile, reg_invalid, False))
                        continue
                    fill_invalid(x, invalid)
                buf[n_in] = x
                n_in += 1
                pending.append((tile, reg_invalid, True))
                if n_in == bsize:
                    yield from flush()
            if pending:
                yield from flush()
        self.stats.seconds = time.perf_counter() - t0

    # ---- in-memory ---------------------------------------------------------------------------------
    def run(self, array: np.ndarray, mask: np.ndarray | None = None, *, fill: float = np.nan) -> np.ndarray:
        """Enhance a ``(C, *spatial)`` array; returns ``(C_out, *spatial * scale)`` float32.

        ``mask`` marks valid pixels (spatial or per channel); output pixels over invalid or
        non-finite input are set to ``fill``. Peak memory: the output plus one batch of tiles.
        """
        if array.ndim < 3:
            raise ConfigError(f"expected a (C, *spatial) array with 2 or 3 spatial axes, got {array.shape}")
        source = ArraySource(array, mask)
        plan = self.plan(source.shape, channels=source.channels)
        out: np.ndarray | None = None
        init = 0.0 if plan.blended else fill  # skipped tiles keep it; blended pixels are masked below

        def alloc(c_out: int) -> np.ndarray:
            return np.full((c_out, *plan.out_shape), init, dtype=np.float32)

        for tile, y, invalid in self.tiles(plan, source):
            if y is None:
                continue
            if out is None:  # the first computed tile tells the output channel count
                out = alloc(y.shape[0])
            view = out[(slice(None), *tile.out)]
            if plan.blended:
                view += plan.running_alpha(tile) * (y - view)
            else:
                mask_output(y, invalid, plan.scale, fill)
                view[...] = y
        if out is None:  # nothing valid at all
            c_out = int(getattr(self.model, "out_channels", None) or source.channels)
            return np.full((c_out, *plan.out_shape), fill, dtype=np.float32)
        if plan.blended:  # blended pixels are final only now: mask in slabs along the first axis
            step = max(1, 2**20 // max(1, math.prod(plan.shape[1:])))
            for a in range(0, plan.shape[0], step):
                lr = (slice(a, min(a + step, plan.shape[0])), *(slice(0, n) for n in plan.shape[1:]))
                _, invalid = source.read(lr)
                hr = tuple(slice(s.start * f, s.stop * f) for s, f in zip(lr, plan.scale))
                mask_output(out[(slice(None), *hr)], invalid, plan.scale, fill)
        return out


def enhance_image(img: SpatialImage, inferer: PatchInferer) -> SpatialImage:
    """Enhance a :class:`SpatialImage`: float32 data on ``img.geometry.scaled(scale)``, the valid
    mask upsampled (nearest; non-finite input pixels become invalid), ``nodata`` (or NaN) over
    invalid pixels, ``meta["storage_dtype"]`` kept so writers round and clip to the source dtype,
    and a provenance step naming the model and the tiling."""
    nd = img.spatial_dims
    if inferer.spatial_dims is not None and inferer.spatial_dims != nd:
        raise ModelCardMismatch(f"model is {inferer.spatial_dims}D but the image has {nd} spatial axes",
                                img.source or None)
    if inferer.in_channels is not None and inferer.in_channels != img.channels:
        raise ModelCardMismatch(f"model expects {inferer.in_channels} channels ({img.channels} given: "
                                f"{', '.join(img.band_names)})", img.source or None)
    scale = inferer.scale_for(nd)
    fill = float(img.nodata) if img.nodata is not None else float("nan")
    out = inferer.run(img.data, mask=img.mask, fill=fill)
    valid = img.valid_mask()
    if img.data.dtype.kind in "fc":
        valid = valid & np.all(np.isfinite(img.data), axis=0)
    mask = None if img.mask is None and valid.all() else upsample_nearest(valid, scale)
    model = inferer.model
    step = {
        "step": "enhance",
        "model": getattr(model, "name", type(model).__name__),
        "model_checksum": getattr(model, "checksum", None),
        "scale": list(scale),
        "device": str(inferer.device),
        "amp": inferer.amp,
        "tiles": {"computed": inferer.stats.computed, "skipped": inferer.stats.skipped,
                  **inferer.stats.plan},
    }
    names = (img.band_names if out.shape[0] == img.channels
             else tuple(f"band{i + 1}" for i in range(out.shape[0])))
    new = img.derive(out, geometry=img.geometry.scaled(scale), mask=mask, step=step, band_names=names)
    new.meta["storage_dtype"] = img.meta.get("storage_dtype", str(img.data.dtype))
    return new
