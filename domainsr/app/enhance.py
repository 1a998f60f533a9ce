"""One item path: :func:`enhance_item` reads an item, checks it against the model (a checkpoint's
card: domain, bands, units, value range), enhances it, audits the output without a reference
(``audit_output(sr, lr)``: LR consistency, and the spread under test-time augmentation) and
writes the output, the audit report (HTML + JSON) and the risk map, provenance last.

How the image is enhanced is a strategy; the steps around it are shared:

* :class:`InMemory`: the whole image in memory through the patch engine (the default);
* :class:`SelfSupervised`: ``--model self-supervised``, a network trained on the scan's own slices;
* :class:`Guided`: a guided checkpoint (e.g. Sentinel-2 20 m bands guided by the 10 m bands):
  the card's target bands of a band set, on the guide grid;
* :class:`Streamed`: a large single-file raster, window by window into the output COG (bounded
  memory), audited whole from the two files, window by window (``audit_files``; bounded memory).

Errors of a DICOM item name the item (its series id) and never a file path: folders of DICOM
exports are often named after the patient, and these messages reach logs and Prefect artifacts.

Size: the four strategies (in memory, guided, streamed, self-supervised) share the audit and write
steps and the timing record of one item; split, each would re-import the others.
"""
from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.app.audits import audit_item, audit_item_files
from domainsr.app.inputs import input_for, mapped_band_names, raster_bands, read_item
from domainsr.app.models import load_model, self_supervised_axis, slicewise_descriptor
from domainsr.app.progress import audit_progress, tile_progress
from domainsr.app.runs import ItemResult, RunSpec
from domainsr.bands import apply_band_map
from domainsr.config import EnhanceConfig
from domainsr.errors import DomainSRError, InputError, ModelCardMismatch, StoreError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io.formats import FORMATS
from domainsr.limits import check_disk, check_fits, decoded_bytes, fits, memory_budget
from domainsr.retry import is_transient
from domainsr.stores.base import Item, Store
from domainsr.train.selfsup import SELF_SUPERVISED

Progress = Callable[[int, int], None]
log = logging.getLogger("domainsr.app")


@dataclass
class Enhanced:
    """What a strategy made, for the shared audit and write steps."""

    lr: SpatialImage  #: the input as the model saw it (streamed: the central window it was checked on)
    info: dict[str, Any]  #: the model's identity, for provenance and the report
    scale: tuple[int, ...]
    module: Any = None  #: what the audit re-runs under test-time augmentation (None: nothing)
    sr: SpatialImage | None = None  #: the output, when it is in memory
    run: dict[str, Any] = field(default_factory=dict)  #: more of the run's provenance
    window: dict[str, int] | None = None  #: the audited window of a streamed raster (None: all of it)
    note: str = ""  #: the end of the item's message


def enhance_item(store: Store, item: Item, spec: RunSpec, strategy: Strategy | None = None) -> ItemResult:
    """Read, enhance, audit and write one item (with ``strategy``, default :func:`strategy_for`);
    raises a DomainSRError (or an I/O error) on failure."""
    cfg = spec.config
    t0 = time.monotonic()
    limit = cfg.runner.item_timeout_s
    progress = tile_progress(item.id, t0 + limit if limit else None, limit)
    with errors_named_by_item(item), memory_budget(cfg.runner.memory_budget_gb):
        strategy = strategy or strategy_for(store, item, spec)
        made = strategy.enhance(store, item, spec, progress)
        run: dict[str, Any] = {"run_key": spec.run_key, "task": cfg.name, "config": spec.source, "item": item.id,
                               **made.run}
        extras: dict[str, Path] = {}
        verdict, reasons = None, []
        t_enhanced = time.monotonic()
        run["seconds"] = {"enhance": round(t_enhanced - t0, 1)}
        with tempfile.TemporaryDirectory(prefix="domainsr-audit-") as tmp:
            if cfg.run_audit:
                stem = store.output_stem(item) if hasattr(store, "output_stem") else None
                extras, verdict, reasons = strategy.audit(made, spec, tmp, audit_progress(item.id), stem)
                run["audit"] = {"verdict": verdict, "reasons": reasons,
                                **({"window": made.window} if made.window else {})}
                run["seconds"]["audit"] = round(time.monotonic() - t_enhanced, 1)
            written = strategy.write(store, item, spec, made, run, extras)
        return ItemResult(item.id, item.kind, "enhanced", output=written.uri, extras=dict(written.extras),
                          verdict=verdict, reasons=reasons, seconds=round(time.monotonic() - t0, 2),
                          message=f"{made.info['name']} x{scale_text(made.info['scale'])}{made.note}")


def strategy_for(store: Store, item: Item, spec: RunSpec) -> Strategy:
    """Self-supervised for ``--model self-supervised``, streamed for a large single-file raster
    (:func:`streams`), guided for a guided checkpoint, else in memory."""
    if spec.model.get("kind") == SELF_SUPERVISED:
        return SelfSupervised()
    if streams(store, item, spec):
        return Streamed()
    return Guided() if spec.model.get("guided") else InMemory()


class Strategy:
    """How one item is enhanced (:meth:`enhance`), what its audit sees and how it is written."""

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Progress) -> Enhanced:
        raise NotImplementedError

    def audited(self, made: Enhanced) -> SpatialImage:
        """The output the audit compares with ``made.lr``."""
        assert made.sr is not None
        return made.sr

    def audit(self, made: Enhanced, spec: RunSpec, out_dir: str, progress: Progress, link_stem: str | None
              ) -> tuple[dict[str, Path], str, list[str]]:
        """The reference-free audit of the output: its extras (report, risk map, exports), verdict
        and reasons (:func:`~domainsr.app.audits.audit_item`)."""
        return audit_item(self.audited(made), made.lr, made.scale, spec, made.module, made.info, out_dir,
                          progress=progress, link_stem=link_stem)

    def write(self, store: Store, item: Item, spec: RunSpec, made: Enhanced, run: dict[str, Any],
              extras: dict[str, Path]) -> Any:
        """Write the output in memory with its provenance, and the extras (``store.write``)."""
        assert made.sr is not None
        made.sr.provenance["model"] = made.info
        made.sr.provenance["run"] = run
        return store.write(item, made.sr, spec.run_key, extras=extras)


class InMemory(Strategy):
    """The bands to enhance (:func:`~domainsr.app.inputs.input_for`), the model built and checked
    for them, and the patch engine over the whole image (within the memory budget)."""

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Progress) -> Enhanced:
        import torch

        cfg = spec.config
        img = input_for(read_item(store, item, cfg), cfg.bands, spec.model)
        check_domain(img, cfg, item)
        if img.mask is not None and not img.mask.any():
            raise InputError("every pixel is nodata, NaN or masked: nothing to enhance (no output written)", item.id)
        module, info = load_model(cfg.model, img)
        check_job_memory(img.channels, img.spatial_shape, module.scale, item.id)
        with torch.inference_mode():
            sr = enhance_image_checked(img, patch_inferer(module, cfg, progress), item)
        return Enhanced(img, info, scale_of(sr, img), module=module, sr=sr)


class Guided(Strategy):
    """A guided checkpoint: the card's target bands of a band set and its guide bands, through the
    guided engine. The audit has no test-time augmentation (the model cannot run on LR alone)."""

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Progress) -> Enhanced:
        import torch

        from domainsr.engine.guided import enhance_guided, guided_inferer, guided_inputs
        from domainsr.models.guided import guided_bands, load_guided_checkpoint

        raw = read_item(store, item, spec.config)
        model, card = load_guided_checkpoint(spec.model["path"])
        target, guide = guided_bands(card)
        if not isinstance(raw, MultiResolutionImage):
            raise ModelCardMismatch(f"guided model {card.name!r} needs a band set (e.g. a Sentinel-2 folder) with "
                                    f"bands {target + guide}", item.id)
        missing = [b for b in (*target, *guide) if b not in raw.band_names]
        if missing:
            raise ModelCardMismatch(f"guided model {card.name!r} needs bands {missing}, the band set has "
                                    f"{list(raw.band_names)}", item.id)
        lr, g = guided_inputs(raw, target, guide, card.scale, resample=True)  # as training: Landsat's pan is offset
        del raw
        t = spec.config.tiling
        inferer = guided_inferer(model, tile=t.tile, batch_size=t.batch_size, device=t.device, amp=t.amp,
                                 threads=t.threads, progress=progress)
        with torch.inference_mode():
            sr = enhance_guided(lr, g, inferer)
        info = {k: v for k, v in spec.model.items() if k != "path"}
        return Enhanced(lr, info, scale_of(sr, lr), sr=sr)


class SelfSupervised(Strategy):
    """``--model self-supervised``: a 2D net trained on this scan's own in-plane slices within the
    budget (:func:`~domainsr.train.selfsup.train_self_supervised`), run through-plane as a slice-wise
    checkpoint, audited against that checkpoint's card (its slice profile) and written with the card
    and weights beside the output (``<output>.card.json`` / ``.card.pt``)."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="domainsr-selfsup-")
        self.card_path: Path | None = None

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Progress) -> Enhanced:
        import torch

        from domainsr.models.descriptor import from_checkpoint
        from domainsr.train.selfsup import SelfSupSettings, train_self_supervised

        cfg = spec.config
        img = input_for(read_item(store, item, cfg), cfg.bands, spec.model)
        check_domain(img, cfg, item)
        axis, factor = self_supervised_axis(img, spec.model["scale"], item.id)
        check_job_memory(img.channels, img.spatial_shape, factor, item.id)
        settings = SelfSupSettings.model_validate(spec.model["settings"])
        res = train_self_supervised(img, axis, factor, settings, self.tmp.name, threads=cfg.tiling.threads)
        self.card_path = res.checkpoint
        model = from_checkpoint(res.checkpoint)
        model.prepare(img)
        model = slicewise_descriptor(model, axis)
        with torch.inference_mode():
            sr = enhance_image_checked(img, patch_inferer(model, cfg, progress), item)
        val = res.card.metrics["val"]
        summary = {"card": res.card.name, "steps": res.steps, "best_step": res.best_step,
                   "seconds": round(res.seconds, 1), "budget_s": settings.budget, "profile": res.profile,
                   "val_psnr": round(val.psnr, 3), "val_baseline": val.baseline, "val_gain_db": round(val.gain_db, 3)}
        info = {**spec.model, **model.record(), "kind": SELF_SUPERVISED, "name": SELF_SUPERVISED,
                "scale": list(model.scale), "self_supervised": summary}
        return Enhanced(img, info, scale_of(sr, img), module=model, sr=sr, run={"self_supervised": summary},
                        note=f" (self-supervised: {res.steps} steps in {res.seconds:.0f} s; held-out gain "
                        f"{val.gain_db:+.2f} dB over {val.baseline})")

    def audit(self, made: Enhanced, spec: RunSpec, out_dir: str, progress: Progress, link_stem: str | None
              ) -> tuple[dict[str, Path], str, list[str]]:
        """The audit with the trained checkpoint as the model: its card's degradation."""
        ident = {"kind": "checkpoint", "name": made.info["self_supervised"]["card"], "path": str(self.card_path)}
        return super().audit(made, replace(spec, model=ident), out_dir, progress, link_stem)

    def write(self, store: Store, item: Item, spec: RunSpec, made: Enhanced, run: dict[str, Any],
              extras: dict[str, Path]) -> Any:
        """The output with the card and weights beside it (``card.json``, ``card.pt``)."""
        assert self.card_path is not None
        try:
            return super().write(store, item, spec, made, run, {
                **extras, "card.json": self.card_path, "card.pt": self.card_path.with_suffix(".pt")})
        finally:
            self.tmp.cleanup()


class Streamed(Strategy):
    """A large raster: the model checked on (and, per image, normalised by) a central window, the
    whole file enhanced window by window into the output COG (bounded memory), and the
    reference-free audit run on the whole input and written output, window by window from the
    files (:func:`~domainsr.app.audits.audit_item_files`). Only when the two files cannot name the
    same bands (a band map renamed a subset of undescribed bands) is the audit that of the central
    window, as the item's message and provenance say."""

    def __init__(self) -> None:
        self.out: Path | None = None
        self.path: str = ""
        self.audit_bands: list[str] | None = None
        self.whole = True
        self.history: dict[str, Any] = {}

    def enhance(self, store: Store, item: Item, spec: RunSpec, progress: Progress) -> Enhanced:
        import torch

        from domainsr.engine.streaming import enhance_raster_file

        cfg = spec.config
        path = item.meta.get("path", item.uri)
        p = probe_raster(path, cfg, spec.model, item)
        inferer = patch_inferer(p.module, cfg, progress)
        f = inferer.scale_for(2)
        out_path = store.output_path(item)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        # the tiled work file and the COG made from it: together about the uncompressed size
        check_disk(out_path.parent, decoded_bytes((p.probe.channels, p.rows * f[0], p.cols * f[1]),
                                                  p.probe.data.dtype),
                   f"the x{scale_text(f)} output of {p.probe.channels}x{p.rows}x{p.cols} pixels", path)
        self.out = store.open_output(item)
        with torch.inference_mode():
            enhance_raster_file(path, self.out, inferer, bands=p.bands, model_info=p.info,
                                band_names=p.probe.band_names)
        st = inferer.stats
        secs = {k: round(getattr(st, f"{k}_seconds"), 1) for k in ("read", "infer", "write")}
        return self.enhanced(path, p, f, cfg, "enhance (streamed)",
                             {"tiles": {"computed": st.computed, "skipped": st.skipped}, "seconds": secs,
                              "precision": st.plan.get("precision"), "device": st.plan.get("device")},
                             {"streamed": True}, "streamed")

    def enhanced(self, path: str | Path, p: RasterProbe, f: Sequence[int], cfg: EnhanceConfig, step: str,
                 history: dict[str, Any], run: dict[str, Any], what: str) -> Enhanced:
        """Record the step's ``history`` and what the audit reads, and return the item's result:
        the audit reads the same bands of input and output, all or by name (the output names them
        as the input does, unless a band map renamed a subset of undescribed bands: then the
        central window)."""
        from domainsr.image import now_iso

        self.history = {"time": now_iso(), "step": step, "model": p.info["name"], "scale": list(f), **history}
        self.path = str(path)
        self.whole = p.bands is None or not p.names_mapped
        self.audit_bands = None if p.bands is None else list(p.probe.band_names)
        h, w = p.window["height"], p.window["width"]
        note = (f" ({what})" if not cfg.run_audit else f" ({what}; audit of the whole scene)" if self.whole
                else f" ({what}; audit on a central {h}x{w} window: the band map renames a band subset)")
        return Enhanced(p.probe, p.info, tuple(f), module=p.module, run=run,
                        window=None if self.whole else p.window, note=note)

    def audit(self, made: Enhanced, spec: RunSpec, out_dir: str, progress: Progress, link_stem: str | None
              ) -> tuple[dict[str, Path], str, list[str]]:
        """The whole scene from the files (bounded memory), else the central window."""
        if not self.whole:
            return super().audit(made, spec, out_dir, progress, link_stem)
        assert self.out is not None
        return audit_item_files(self.out, self.path, made.scale, spec, made.module, made.info, out_dir,
                                bands=self.audit_bands, progress=progress, link_stem=link_stem)

    def audited(self, made: Enhanced) -> SpatialImage:
        """The written output's window over the input's audit window."""
        from domainsr.io.raster import read_raster

        assert made.window is not None and self.out is not None
        (f0, f1), win = made.scale, made.window
        r0, c0, h, w = win["row_off"], win["col_off"], win["height"], win["width"]
        return read_raster(self.out, window=((r0 * f0, (r0 + h) * f0), (c0 * f1, (c0 + w) * f1)))

    def write(self, store: Store, item: Item, spec: RunSpec, made: Enhanced, run: dict[str, Any],
              extras: dict[str, Path]) -> Any:
        """Commit the output written in place, with the extras and its provenance (``store.commit``)."""
        prov = {"format": "raster", "model": made.info, "run": run, "history": [self.history]}
        return store.commit(item, spec.run_key, extras, prov)


@dataclass
class RasterProbe:
    """A large raster's central window with the model checked (and, per image, normalised) on it."""

    rows: int
    cols: int
    bands: list[int] | None  #: the 1-based input bands enhanced (None: all)
    probe: SpatialImage
    names_mapped: bool  #: a band map renamed undescribed bands
    window: dict[str, int]  #: the probe window
    module: Any
    info: dict[str, Any]


def probe_raster(path: str | Path, cfg: EnhanceConfig, model: dict[str, Any], item: Item) -> RasterProbe:
    """Read the central ``tiling.stream_audit_window`` of the raster ``path`` (its bands named as the
    band map says), check the domain on it and load the model for it."""
    from domainsr.io.raster import raster_info, read_raster

    header = raster_info(path)
    _, rows, cols = header["shape"]
    bands = raster_bands(header, cfg, model, str(path))
    side = cfg.tiling.stream_audit_window
    h, w = min(side, rows), min(side, cols)
    r0, c0 = (rows - h) // 2, (cols - w) // 2
    probe = read_raster(path, window=((r0, r0 + h), (c0, c0 + w)), bands=bands)
    names = mapped_band_names(header, cfg.band_map, str(path))
    mapped = names != list(header["band_names"])
    if mapped:
        probe = apply_band_map(probe, {k + 1: names[i - 1] for k, i in enumerate(bands or range(1, len(names) + 1))})
    check_domain(probe, cfg, item)
    module, info = load_model(cfg.model, probe)
    return RasterProbe(rows, cols, bands, probe, mapped, {"row_off": r0, "col_off": c0, "height": h, "width": w},
                       module, info)


def streams(store: Store, item: Item, spec: RunSpec) -> bool:
    """Whether ``item`` is a single-file raster to stream (the store can take a file written in
    place: ``open_output``/``commit``): one of ``tiling.stream_above_mpx`` LR megapixels or more,
    or one too large to enhance in memory within the memory budget."""
    limit = spec.config.tiling.stream_above_mpx
    fmt = FORMATS.get(item.kind)
    if limit is None or fmt is None or not fmt.windowed or spec.model.get("guided") or not hasattr(store, "open_output"):
        return False
    from domainsr.io.raster import raster_info

    count, rows, cols = raster_info(item.meta.get("path", item.uri))["shape"]
    return rows * cols >= limit * 1e6 or not fits(job_bytes(count, (rows, cols), spec.model["scale"]))


@contextmanager
def errors_named_by_item(item: Item) -> Iterator[None]:
    """For a DICOM item, re-raise any error with its file paths replaced by pseudonyms and the
    item id as its subject, without the original chained (a logged traceback would show it).
    DomainSRErrors keep their type; other errors become StoreError (transient: retried) or
    InputError."""
    if item.kind != "dicom":
        yield
        return
    from domainsr.audit.privacy import file_labels, relabel, replace_paths

    labels = file_labels([str(f) for f in item.meta.get("files", [])] or [item.uri], item.id, item.uri)
    try:
        yield
    except DomainSRError as exc:
        raise relabel(exc, labels, item.id) from None
    except Exception as exc:  # noqa: BLE001 - any error: its text may carry a path
        kind = StoreError if is_transient(exc) else InputError
        raise kind(f"{type(exc).__name__}: {replace_paths(str(exc), labels)}", item.id) from None


def check_domain(img: SpatialImage, cfg: EnhanceConfig, item: Item) -> None:
    """InputError when the config is for another domain than the image's."""
    if cfg.domain is not None and img.domain != cfg.domain:
        raise InputError(f"this is a {img.domain} image but task {cfg.name!r} is for {cfg.domain}", item.id)


def patch_inferer(model: Any, config: EnhanceConfig, progress: Progress | None) -> Any:
    """The patch engine for ``model`` (a ModelDescriptor from :func:`load_model`) with the config's tiling."""
    from domainsr.engine import PatchInferer

    t = config.tiling
    return PatchInferer(model, tile=t.tile, overlap=t.overlap, batch_size=t.batch_size, device=t.device,
                        amp=t.amp, blend=t.blend, threads=t.threads, progress=progress, consistency=t.consistency)


def enhance_image_checked(img: SpatialImage, inferer: Any, item: Item) -> SpatialImage:
    """``engine.enhance_image`` with the item named in a shape/scale error."""
    from domainsr.engine import enhance_image

    try:
        return enhance_image(img, inferer)
    except DomainSRError as exc:
        if exc.path:
            raise
        raise type(exc)(exc.message, item.id) from exc


def job_bytes(channels: int, spatial_shape: Sequence[int], scale: int | Sequence[int]) -> int:
    """Memory of enhancing a whole image at once: its float32 copy and the float32 output."""
    factors = np.broadcast_to(np.asarray(scale, dtype=np.int64), (len(spatial_shape),))
    return decoded_bytes((channels, *spatial_shape), np.float32) * (1 + math.prod(int(f) for f in factors))


def check_job_memory(channels: int, spatial_shape: Sequence[int], scale: int | Sequence[int], item_id: str) -> None:
    """ResourceLimitError when enhancing the whole image at once would exceed the memory budget."""
    shape = "x".join(str(int(s)) for s in spatial_shape)
    check_fits(job_bytes(channels, spatial_shape, scale), f"enhancing {channels}x{shape} at x{scale_text(scale)}",
               item_id, "crop or split the input, or raise the budget")


def scale_of(sr: SpatialImage, lr: SpatialImage) -> tuple[int, ...]:
    """The factor per axis between an output and its input."""
    return tuple(a // b for a, b in zip(sr.spatial_shape, lr.spatial_shape))


def scale_text(scale: int | Sequence[int]) -> str:
    """``2`` or ``[2, 2]`` -> ``"2"``; ``[1, 1, 4]`` -> ``"1x1x4"``."""
    vals = [scale] if isinstance(scale, int) else list(scale)
    return str(vals[0]) if len(set(vals)) == 1 else "x".join(str(v) for v in vals)
