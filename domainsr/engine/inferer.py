"""Batched patch inference of any SR model over arrays and SpatialImages.

:class:`PatchInferer` runs a :class:`~domainsr.models.descriptor.ModelDescriptor` (a module
mapping ``(B, C, *window)`` float32 to ``(B, C_out, *window * scale)``, and what it is): scale,
receptive radius, channels, size rules, supported reduced precisions and tiling advice come from
the descriptor; a bare ``nn.Module`` is described by ``ModelDescriptor.wrap``. Tiles are planned
by :class:`~domainsr.engine.tiling.TilePlan`; the output is assembled in one float32 buffer (no
weight buffer, see ``TilePlan.running_alpha``). Provenance steps name the model as its
descriptor does (name, kind, checksum).

An optional data-consistency stage (:mod:`domainsr.engine.consistency`; per card, or the
``consistency`` argument) runs on each window right after the network, on the window's own LR
pixels; its halo is added to the network's, so tiled and streamed outputs still equal one
whole-image pass.

Invalid input (mask ``False`` or non-finite values) never poisons a tile: before inference each
invalid pixel is filled with its nearest valid neighbour in the window, and afterwards the
output is set to ``fill`` over the (nearest-upsampled) invalid pixels. Tiles whose region holds
no valid pixel are not computed.

Size: tile planning, batching, invalid-pixel filling and assembly into the one output buffer are
one loop over one plan; split, each part would need the others' state.
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from domainsr.engine.consistency import DataConsistency
from domainsr.engine.progress import Progress
from domainsr.engine.resources import activation_bytes, cpu_bf16_native, physical_cores, torch_threads
from domainsr.engine.sources import (
    ArraySource,
    Source,
    fill_invalid,
    mask_output,
    pad_window,
)
from domainsr.engine.tiling import Blend, Border, Tile, TilePlan, per_axis
from domainsr.errors import ConfigError, ModelCardMismatch, ModelError, ResourceLimitError
from domainsr.malloc import release_memory, tune_malloc
from domainsr.models.card import ConsistencySettings, ModelCard
from domainsr.models.descriptor import ModelDescriptor, as_descriptor

log = logging.getLogger(__name__)

Amp = Literal["auto", "bf16", "fp16", "off"]

#: Default windows (LR px per axis) stay within these bounds; inside them the largest window the
#: memory budget allows is used. Larger windows recompute less halo, and per pixel they run as
#: fast as small ones on CPU (measured: EDSR-baseline from 256 to 1024 px), and faster when the
#: machine is shared (fewer, longer parallel regions for preempted threads to stall). Beyond about
#: 1024 px they gain nothing but memory: the shipped light model (ResCNN 8x32, 4 bands, x2,
#: float32, 2 AVX2 cores) ran 0.516 core Mpx/s at 1060 px windows with a 1.22 GB peak and 0.508 at
#: 1572 px with 3.03 GB (0.473 at 548 px, 0.54 GB). 1088 takes a 1024 px core (the streamed COG's
#: 512 px output blocks) plus the model's halo.
WINDOW_BOUNDS = {2: (64, 1088), 3: (24, 192)}
#: Peak memory of one tile ~ LIVE_ACTIVATIONS x its largest activation (measured on the light model
#: above: 6.7x at 804 px, 7.4x at 1060 px, 8.7x at 1572 px: activations, the base interpolation,
#: normalised copies and the allocator's slack); a batch of tiles may take MEMORY_FRACTION of the
#: free memory (RAM on CPU, device memory on CUDA).
LIVE_ACTIVATIONS = 8
MEMORY_FRACTION = 0.25
#: LR pixels per forward pass that the automatic batch size aims for (on CPU one tile is best).
BATCH_PIXELS = {"cpu": 2**16, "cuda": 2**21}


def _halo_of(model: ModelDescriptor, nd: int) -> tuple[int, ...] | None:
    r = model.receptive_radius
    if r is None:
        return None
    return tuple(math.ceil(float(v)) for v in per_axis(r, nd, "receptive_radius"))


#: ``amp="auto"`` runs a model in bf16 on a CPU with native bf16 when its card records a bf16
#: held-out PSNR loss (``card.precision["bf16"]``, measured by ``benchmarks/backends.py``) of at
#: most this many dB; otherwise float32.
CPU_BF16_MAX_LOSS_DB = 0.05


def cpu_auto_precision(model: ModelDescriptor) -> str:
    """``"bf16"`` when the card vouches for it (see :data:`CPU_BF16_MAX_LOSS_DB`) and the CPU runs
    bf16 natively, else ``"off"`` (float32)."""
    card = model.card if isinstance(model.card, ModelCard) else None
    check = card.precision.get("bf16") if card is not None else None
    ok = check is not None and check.psnr_loss_db <= CPU_BF16_MAX_LOSS_DB and model.supports("bf16")
    return "bf16" if ok and cpu_bf16_native() else "off"


def _amp_for(model: ModelDescriptor, amp: str, cuda: bool) -> str:
    if amp == "auto":
        if not cuda:
            return cpu_auto_precision(model)
        order = ("bf16", "fp16") if torch.cuda.is_bf16_supported() else ("fp16",)
        return next((a for a in order if model.supports(a)), "off")
    if amp not in ("bf16", "fp16", "off"):
        raise ConfigError(f"unknown amp setting {amp!r}; expected auto, bf16, fp16 or off")
    if not model.supports(amp):
        raise ConfigError(f"model {model.name!r} does not run in {amp} (it supports: "
                          f"{', '.join(model.dtypes) or 'float32 only'}); use amp auto or off")
    return amp


Consistency = DataConsistency | ConsistencySettings | bool | None


def consistency_stage(model: ModelDescriptor, consistency: Consistency) -> DataConsistency | None:
    """The data-consistency stage to run after ``model``: ``None`` -> the card's
    (``card.consistency``; off when it has none), ``False`` -> off, ``True`` -> on (the card's
    settings, else the defaults), settings -> those through the card's degradation, or a built
    :class:`DataConsistency`."""
    if isinstance(consistency, DataConsistency):
        return consistency
    if consistency is False:
        return None
    card = model.card if isinstance(model.card, ModelCard) else None
    if consistency is None:
        return DataConsistency.from_card(card) if card is not None and card.consistency is not None else None
    if card is None:
        raise ConfigError(f"model {model.name!r} has no model card: data consistency needs its degradation")
    settings = consistency if isinstance(consistency, ConsistencySettings) else (
        card.consistency or ConsistencySettings())
    return DataConsistency.from_card(card, settings)


@dataclass
class RunStats:
    """What the last run did (for logs, provenance and tests)."""

    tiles: int = 0
    computed: int = 0
    skipped: int = 0
    batches: int = 0
    seconds: float = 0.0
    #: out-of-memory recoveries (CUDA): batches split, windows run as nested plans of smaller ones
    oom_events: int = 0
    #: wall time reading windows, in the network (and consistency stage), and writing (streaming)
    read_seconds: float = 0.0
    infer_seconds: float = 0.0
    write_seconds: float = 0.0
    plan: dict[str, Any] = field(default_factory=dict)


class PatchInferer:
    """Tiled, batched inference of an SR module.

    Args:
        model: a :class:`ModelDescriptor` (or a bare module ``(B, C, *w) -> (B, C_out, *w * scale)``,
            described by ``ModelDescriptor.wrap``); its module is put in eval mode and moved to
            the device (and to channels-last where used) in place.
        scale: integer factor per spatial axis (default: the descriptor's).
        halo: LR context per axis cropped from each tile (default ``ceil(receptive_radius)``;
            unknown or infinite radius -> ``tile // 16`` with ``overlap = tile // 8`` blending).
            Windows follow the descriptor's size rules (multiple of / at least so many pixels).
        tile: largest LR window per axis; the plan uses the fewest windows of at most this size
            and shrinks them to just cover the image. Default: the largest within
            ``WINDOW_BOUNDS`` whose activations (measured by a tiny probe) fit ``MEMORY_FRACTION``
            of the free memory.
        overlap: extra LR overlap blended between tiles beyond the halo (0 = halo mode: exact).
        batch_size: tiles per forward pass (default from ``BATCH_PIXELS``).
        device: ``"auto"`` (CUDA if available, else CPU), or any torch device.
        amp: ``"auto"`` (on CUDA bf16 where device and model support it, else fp16 where the
            model does; on CPU bf16 where :func:`cpu_auto_precision` allows, else float32),
            ``"bf16"``, ``"fp16"`` or ``"off"`` (float32).
        blend: window profile over the overlap, ``"cosine"`` or ``"gaussian"``.
        border: ``"model"`` (windows stay inside the image; tiled == one whole-image pass) or
            ``"reflect"`` (windows reach ``halo`` past the border, reflect-padded).
        threads: torch CPU threads during a run (default: physical cores).
        channels_last: memory format (default: on for 2D/3D convs on CPU and CUDA; it is
            ~1.7x faster for EDSR-style nets on CPU with oneDNN).
        progress: ``progress(done_tiles, total_tiles)`` callback.
        consistency: the data-consistency stage after the network (:func:`consistency_stage`:
            default the card's setting); its halo is added to the network's.
    """

    def __init__(self, model: ModelDescriptor | torch.nn.Module, *, scale: int | Sequence[int] | None = None,
                 halo: int | Sequence[int] | None = None, tile: int | Sequence[int] | None = None,
                 overlap: int | Sequence[int] = 0, batch_size: int | None = None,
                 device: str | torch.device = "auto", amp: Amp = "auto", blend: Blend = "cosine",
                 border: Border = "model", threads: int | None = None,
                 channels_last: bool | None = None, progress: Progress | None = None,
                 consistency: Consistency = None) -> None:
        if not isinstance(model, (ModelDescriptor, torch.nn.Module)):
            raise ModelError(f"expected a ModelDescriptor or torch.nn.Module, got {type(model).__name__}")
        self.descriptor = as_descriptor(model, scale=scale)
        self.model = self.descriptor.module
        self.spatial_dims: int | None = self.descriptor.spatial_dims
        self._scale = self.descriptor.scale
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
        self.amp: str = _amp_for(self.descriptor, amp, self.device.type == "cuda")
        self._amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}[self.amp]
        self.channels_last = True if channels_last is None else channels_last
        self.in_channels: int | None = self.descriptor.in_channels
        self.consistency = consistency_stage(self.descriptor, consistency)
        if self.consistency is not None and self.spatial_dims not in (None, len(self.consistency.scale)):
            raise ConfigError(f"data consistency at scale {list(self.consistency.scale)} for a "
                              f"{self.spatial_dims}D model")
        self.stats = RunStats()
        self._oom_batch: int | None = None  # learnt after an out-of-memory error: tiles per pass
        self._oom_window: tuple[int, ...] | None = None  # ... and the window size a tile runs in
        self._oom_inner: PatchInferer | None = None  # the nested inferer of that window size
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
        halo = per_axis(self._halo, nd, "halo") if self._halo is not None else _halo_of(self.descriptor, nd)
        d = self.descriptor
        if d.tiling == "internal" and self._tile is None:  # the network tiles itself: one window if it fits
            tile = self._auto_window(nd, (WINDOW_BOUNDS.get(nd, (16, 256))[1],) * nd, channels)
            halo = halo or (0,) * nd
        elif halo is None:  # unknown/global receptive field: crop a margin and blend the rest
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
        if self.consistency is not None:  # the stage sees as far again beyond the network
            halo = tuple(h + r for h, r in zip(halo, self.consistency.halo))
            if self._tile is None:
                tile = tuple(t + 2 * r for t, r in zip(tile, self.consistency.halo))
        plan = TilePlan.build(shape, scale=self.scale_for(nd), window=tile, halo=halo, overlap=overlap,
                              border=self.border, blend=self.blend, align=align, multiple=d.size_multiple,
                              minimum=d.min_size)
        if d.tiling == "discouraged" and len(plan) > 1:
            log.warning("model %r relies on global context and tiling is discouraged: %d tiles may show seams; "
                        "pass a larger tile= to use fewer", d.name, len(plan))
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
            size = max(16 if nd == 2 else 8, self.descriptor.min_size)
            size = -(-size // self.descriptor.size_multiple) * self.descriptor.size_multiple
            self._act[key] = activation_bytes(self.model, nd, channels, size)
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
        """inference mode, threads, deterministic kernels and, on CPU, activation memory that is
        reused (:mod:`domainsr.malloc`) for the length of a run."""
        cudnn = torch.backends.cudnn
        old = (cudnn.deterministic, cudnn.benchmark)
        cpu = self.device.type == "cpu" and tune_malloc()
        try:
            with torch_threads(self.threads), torch.inference_mode():
                cudnn.deterministic, cudnn.benchmark = True, False
                self._prepare(nd)
                yield
        finally:
            cudnn.deterministic, cudnn.benchmark = old
            if cpu:
                release_memory()

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
            raise ModelError(f"model {self.descriptor.name} returned "
                             f"{getattr(y, 'shape', type(y).__name__)} for input {tuple(x.shape)}")
        if out_window is not None and tuple(y.shape[2:]) != tuple(out_window):
            raise ModelError(f"model {self.descriptor.name} returned spatial shape "
                             f"{tuple(y.shape[2:])} for input {tuple(x.shape[2:])}; expected "
                             f"{tuple(out_window)} (scale {self._scale})")
        return y.float().cpu().numpy()

    def forward_adaptive(self, batch: np.ndarray, out_window: Sequence[int]) -> np.ndarray:
        """:meth:`forward` that survives running out of (GPU) memory: the batch is split in halves
        down to one tile, then a tile runs as a nested halo-mode plan of half-size windows (exact:
        the same as one pass over the tile's window), halving again while needed. The sizes that
        fit are kept for the rest of the run (``stats.oom_events`` counts the recoveries)."""
        n, i, outs = batch.shape[0], 0, []
        step = min(n, self._oom_batch or n)
        while i < n:
            part = batch[i:i + step]
            try:
                y = (self._nested(part) if self._oom_window is not None else self.forward(part, out_window))
            except torch.OutOfMemoryError:
                self.stats.oom_events += 1
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if step > 1:
                    step = self._oom_batch = step // 2
                    continue
                window = self._oom_window or tuple(part.shape[2:])
                halo = _halo_of(self.descriptor, len(window)) or (0,) * len(window)
                smaller = tuple(max(w // 2, 2 * h + max(1, self.descriptor.min_size)) for w, h in zip(window, halo))
                if smaller == window:
                    raise ResourceLimitError(f"out of {self.device.type} memory even for one window of "
                                             f"{list(window)} px with model {self.descriptor.name}; use a "
                                             "smaller tile= or the CPU") from None
                log.warning("out of %s memory: running %s px windows as %s px windows", self.device.type,
                            list(window), list(smaller))
                self._oom_window = smaller
                continue
            outs.append(y)
            i += step
        return outs[0] if len(outs) == 1 else np.concatenate(outs)

    def _nested(self, part: np.ndarray) -> np.ndarray:
        """Each window of ``part`` through a nested plan of ``_oom_window`` windows (network only;
        the nested inferer is built once per window size)."""
        inner = self._oom_inner
        if inner is None or inner._tile != self._oom_window:
            inner = self._oom_inner = PatchInferer(
                self.descriptor, tile=self._oom_window, batch_size=1, device=self.device, amp=self.amp,
                border="model", threads=self.threads, channels_last=self.channels_last, consistency=False)
        return np.stack([inner.run(np.ascontiguousarray(x)) for x in part])

    # ---- tile stream ------------------------------------------------------------------------------
    def _read(self, source: Source, tile: Tile) -> tuple[np.ndarray, np.ndarray | None]:
        x, invalid = source.read(tile.src)
        if any(p != (0, 0) for p in tile.pad):
            x = pad_window(x, tile.pad)
            if invalid is not None:
                invalid = pad_window(invalid, tile.pad)
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
            "batch_size": bsize, "redundancy": round(plan.redundancy(), 4), "precision": self.amp,
            "device": self.device.type,
            **({"consistency": self.consistency.describe()} if self.consistency is not None else {})})
        t0 = time.perf_counter()
        pending: list[tuple[Tile, np.ndarray | None, bool]] = []  # (tile, invalid in region, computed)
        shape = (bsize, source.channels, *plan.window)
        # the batch is assembled in place; on CUDA in pinned memory, for asynchronous copies
        buf = (torch.empty(shape, pin_memory=True).numpy() if self.device.type == "cuda"
               else np.empty(shape, dtype=np.float32))
        n_in = 0

        def flush() -> Iterator[tuple[Tile, np.ndarray | None, np.ndarray | None]]:
            nonlocal n_in, done
            t_inf = time.perf_counter()
            y = self.forward_adaptive(buf[:n_in], plan.out_window) if n_in else None
            if y is not None and self.consistency is not None:
                y = self.consistency.batch(y, buf[:n_in])
            self.stats.infer_seconds += time.perf_counter() - t_inf
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
                t_read = time.perf_counter()
                x, invalid = self._read(source, tile)
                self.stats.read_seconds += time.perf_counter() - t_read
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
            c_out = int(self.descriptor.out_channels or source.channels)
            return np.full((c_out, *plan.out_shape), fill, dtype=np.float32)
        if plan.blended:  # blended pixels are final only now: mask in slabs along the first axis
            step = max(1, 2**20 // max(1, math.prod(plan.shape[1:])))
            for a in range(0, plan.shape[0], step):
                lr = (slice(a, min(a + step, plan.shape[0])), *(slice(0, n) for n in plan.shape[1:]))
                _, invalid = source.read(lr)
                hr = tuple(slice(s.start * f, s.stop * f) for s, f in zip(lr, plan.scale))
                mask_output(out[(slice(None), *hr)], invalid, plan.scale, fill)
        return out
