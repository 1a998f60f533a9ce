"""Enhancement and audit of one item, without Prefect: the steps the flows (``flows/``) and the CLI
wire together (DESIGN.md: flows hold no image logic).

One item: ``store.read`` -> band selection -> model built for it (a checkpoint is checked against
its model card: domain, bands, units, value range) -> ``engine.enhance_image`` -> reference-free
audit (``audit_output(sr, lr)``: LR consistency, and the spread under test-time augmentation) ->
``store.write`` of the output, the audit report (HTML + JSON) and the risk map, provenance last.

A run is described by a :class:`RunSpec` (the config, where it came from, and its *run key*: a
hash of the model's identity, e.g. the checkpoint's sha256, and every setting that changes the
output). Items whose output already carries the same run key are skipped.

Progress: :func:`listen` registers an in-process callback ``(kind, key, done, total)`` that gets
``("tiles", item_id, ...)``, ``("items", run_name, ...)`` and ``("steps", model_name, ...)``
events (the CLI draws progress bars from them); flows also log progress with an ETA.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from domainsr.bands import apply_band_map, described, match_bands
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.degrade import NoiseFreeOperator, noise_free_operator
from domainsr.errors import (
    ConfigError,
    DomainSRError,
    InputError,
    ModelCardMismatch,
    ModelError,
    ResourceLimitError,
    StoreError,
)
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io.formats import FORMATS, risk_label
from domainsr.limits import check_disk, check_fits, decoded_bytes, fits, memory_budget
from domainsr.retry import PERMANENT_ERRORS, TRANSIENT_ERRORS, is_transient  # noqa: F401 - re-exported
from domainsr.stores.base import Item, Store

if TYPE_CHECKING:
    from domainsr.audit import AuditOutcome

log = logging.getLogger("domainsr.pipeline")

# ---------------------------------------------------------------------------------------------
# progress events


ProgressListener = Callable[[str, str, int, int], None]
_LISTENERS: list[ProgressListener] = []


@contextmanager
def listen(callback: ProgressListener) -> Iterator[None]:
    """Send progress events ``callback(kind, key, done, total)`` while the block runs."""
    _LISTENERS.append(callback)
    try:
        yield
    finally:
        _LISTENERS.remove(callback)


def report(kind: str, key: str, done: int, total: int) -> None:
    """Send one progress event to the registered listeners (in this process)."""
    for callback in tuple(_LISTENERS):
        callback(kind, key, done, total)


def _tile_progress(item_id: str, deadline: float | None, limit: float | None) -> Callable[[int, int], None]:
    from domainsr.engine import log_progress

    logged = log_progress(f"enhance {item_id}")

    def update(done: int, total: int) -> None:
        logged(done, total)
        report("tiles", item_id, done, total)
        if deadline is not None and time.monotonic() > deadline:
            raise ResourceLimitError(f"stopped after the time limit of {limit:g} s per item "
                                     f"({done}/{total} tiles done)", item_id)

    return update


# ---------------------------------------------------------------------------------------------
# models


def find_checkpoint(name: str) -> Path | None:
    """The model card path of checkpoint ``name`` (a path, or a name in the user/shipped folders,
    where ``-`` and ``_`` are interchangeable), or ``None`` when there is none (also for
    third-party weights files, which have no card)."""
    from domainsr.models.checkpoints import resolve_checkpoint
    from domainsr.models.names import is_weights_file

    if is_weights_file(name):
        return None
    for candidate in dict.fromkeys((name, name.replace("-", "_"), name.replace("_", "-"))):
        try:
            return resolve_checkpoint(candidate)
        except ModelError:
            continue
    return None


def parse_scale(text: str | int | Sequence[int] | None) -> int | list[int] | None:
    """``"2"`` -> 2, ``"1,1,4"`` -> [1, 1, 4] (the CLI's ``--scale``)."""
    if text is None or isinstance(text, int):
        return text
    if not isinstance(text, str):
        vals = [int(v) for v in text]
        return vals[0] if len(vals) == 1 else vals
    try:
        vals = [int(v) for v in text.replace("x", ",").split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"scale {text!r} is not an integer or a comma-separated list of integers") from None
    if not vals or any(v < 1 for v in vals):
        raise ConfigError(f"scale {text!r} needs factors >= 1")
    return vals[0] if len(vals) == 1 else vals


def model_identity(ref: ModelRef) -> dict[str, Any]:
    """What identifies a model's outputs: a checkpoint's name and weights sha256, third-party
    weights' sha256, architecture and declared input range, or a registry model's name, scale and
    options. Raises ModelError/ConfigError for an unusable reference."""
    from domainsr.models.names import is_weights_file

    if is_weights_file(ref.name):
        from domainsr.models.weights import weights_identity

        return weights_identity(ref.name, ref.kwargs)
    card_path = find_checkpoint(ref.name)
    if card_path is not None:
        from domainsr.models.checkpoints import read_card
        from domainsr.models.guided import is_guided

        card = read_card(card_path)
        if ref.kwargs:
            raise ConfigError(f"model.kwargs apply to registry models, not to checkpoint {card.name!r}")
        return {"kind": "checkpoint", "name": card.name, "version": card.version, "sha256": card.weights_sha256,
                "scale": list(card.scale), "application": card.application, "guided": is_guided(card),
                "path": str(card_path)}
    from domainsr.models import get_spec
    from domainsr.models.names import check_model

    check_model(ref.name, ref.scale)  # unknown (with the closest name), not an SR model, no scale
    spec = get_spec(ref.name)
    return {"kind": "registry", "name": spec.name, "family": spec.family, "scale": ref.scale,
            "kwargs": dict(ref.kwargs)}


def slicewise_module(module: Any, slice_axis: int) -> Any:
    """The 3D module that applies a slice-wise checkpoint (a 2D network whose card has scale
    ``(1, s)``: its second axis is the slice axis) to a volume: on every plane that contains the
    slice axis, in both orientations, averaged (as SMORE-style models are trained). It exposes
    ``scale``, ``receptive_radius`` and the channels per volume axis, so the patch engine tiles it
    like any 3D model, and ``prepare(img)`` (the card's input check and normalisation)."""
    import torch
    from torch import nn

    card = module.card
    if len(card.scale) != 2 or card.scale[0] != 1:
        raise ModelError(f"slice-wise model needs scale (1, s), card says {card.scale}", card.name)
    s, (ra, rb) = int(card.scale[1]), card.receptive_radius

    class SliceWise(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = module
            self.axis = slice_axis
            self.spatial_dims = 3
            self.scale = tuple(s if a == slice_axis else 1 for a in range(3))
            self.receptive_radius = tuple(rb if a == slice_axis else ra for a in range(3))
            self.in_channels = module.in_channels
            self.out_channels = module.out_channels
            self.card = card

        def prepare(self, img: SpatialImage) -> Any:
            return self.inner.prepare(img)

        def to(self, *args: Any, **kwargs: Any) -> SliceWise:
            """As ``nn.Module.to``; a 3D memory format (the engine's channels-last-3d for 5D
            tiles) becomes its 2D counterpart for the inner network's 4D weights."""
            fmt = kwargs.pop("memory_format", None)
            super().to(*args, **kwargs)
            if fmt is not None:
                self.inner.to(memory_format=torch.channels_last if fmt is torch.channels_last_3d else fmt)
            return self

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = x.movedim(2 + self.axis, -1)  # (B, C, P, Q, K), K = slice axis
            b, c, p, q, k = x.shape
            ya = self.inner(x.permute(0, 3, 1, 2, 4).reshape(b * q, c, p, k))  # planes (P, K)
            co = ya.shape[1]
            ya = ya.reshape(b, q, co, p, k * s).permute(0, 2, 3, 1, 4)
            yb = self.inner(x.permute(0, 2, 1, 3, 4).reshape(b * p, c, q, k))  # planes (Q, K)
            yb = yb.reshape(b, p, co, q, k * s).permute(0, 2, 1, 3, 4)
            return ((ya + yb) * 0.5).movedim(-1, 2 + self.axis)

    return SliceWise().eval()


def slice_axis_of(img: SpatialImage) -> int:
    """The thick-slice axis of a volume. For a DICOM series: the axis it was stacked on (along the
    slice normal, from the geometry; an in-plane axis never is). Otherwise the axis with the
    largest spacing, the last of those within 0.1 % of it (rounding noise makes no slice thicker).
    A single slice (2D) has none: InputError."""
    from domainsr.io.dicom import stack_axis

    spacing = np.asarray(img.geometry.spacing, float)
    axis = stack_axis(img)
    if axis is None:
        axis = int(np.flatnonzero(spacing >= spacing.max() * (1 - 1e-3))[-1])
    if img.spatial_shape[axis] == 1:
        raise InputError("a single slice is 2D: a slice-wise model has no slice axis to upsample "
                         "(use an in-plane model or scale)")
    if spacing[axis] < 1.5 * np.min(spacing):
        log.warning("voxels are nearly isotropic (%s mm); a slice-wise model expects thick slices "
                    "along one axis; using axis %d", np.round(spacing, 3).tolist(), axis)
    return axis


def load_model(ref: ModelRef, img: SpatialImage) -> tuple[Any, dict[str, Any]]:
    """The :class:`~domainsr.models.descriptor.ModelDescriptor` that enhances ``img`` as ``ref``
    says (its ``scale``, and the module the engine runs), and its identity for provenance.

    A checkpoint is loaded (weights verified) and checked against ``img`` by its card
    (ModelCardMismatch on a wrong domain, band set, units or value range); its per-image
    normalisation is set from ``img``. Third-party weights are loaded through spandrel with a card
    generated for ``img`` (input range declared, from a card beside them, or a natural image's
    dtype range) and checked the same way. A registry model is built for ``img``'s channels and
    axes; an untrained architecture (random weights) is run only with a loud warning.
    """
    from domainsr.models.descriptor import from_checkpoint, from_registry

    ident = model_identity(ref)
    public = {k: v for k, v in ident.items() if k != "path"}
    if ident["kind"] == "weights":
        from domainsr.models.weights import load_weights

        model = load_weights(ident["path"], img, input_range=ident.get("input_range"))
        model.prepare(img)
        if ref.scale is not None and not _same_scale(ref.scale, model.scale):
            raise ConfigError(f"scale {ref.scale} differs from the weights' {list(model.scale)} ({ident['name']})")
        return model, {**public, **model.record(), "card": model.card.model_dump(mode="json")}
    if ident["kind"] == "checkpoint":
        model = from_checkpoint(ident["path"])
        model.prepare(img)
        if model.application == "slicewise":
            inner = slicewise_module(model.module, slice_axis_of(img))
            model = model.with_module(inner, spatial_dims=3, scale=inner.scale,
                                      receptive_radius=inner.receptive_radius, prepare=inner.prepare)
        if ref.scale is not None and not _same_scale(ref.scale, model.scale):
            raise ConfigError(f"scale {ref.scale} differs from checkpoint {model.name!r}'s {list(model.scale)}")
        return model, {**public, **model.record(), "scale": list(model.scale)}
    scale = in_plane_scale(ref.scale, img)
    model = from_registry(ref.name, spatial_dims=img.spatial_dims, in_channels=img.channels, scale=scale,
                          **ref.kwargs)
    if model.weights == "untrained":
        log.warning("UNTRAINED: model %r is a registry architecture with random weights; its output is "
                    "not super-resolution. Use a trained checkpoint or your own weights (--model FILE.pth); "
                    "`domainsr models list` shows which is which", ref.name)
    return model, {**ident, "scale": scale, "weights": model.record()["weights"], "sha256": None,
                   "config_sha256": model.config_sha256}


def in_plane_scale(scale: int | Sequence[int] | None, img: SpatialImage) -> int | list[int] | None:
    """A single factor for a volume with one slice (a single DICOM slice, a 2D NIfTI) applies in
    plane only: a single slice is a 2D image, and nothing is invented along its normal."""
    if isinstance(scale, int) and img.spatial_dims == 3 and 1 in img.spatial_shape:
        return [1 if n == 1 else scale for n in img.spatial_shape]
    return scale


def _same_scale(want: int | Sequence[int], have: Sequence[int]) -> bool:
    if isinstance(want, int):
        return max(have) == want and all(h in (1, want) for h in have)
    return list(want) == list(have)


# ---------------------------------------------------------------------------------------------
# runs


@dataclass(frozen=True)
class RunSpec:
    """A resolved enhancement run: config, where it came from, the model's identity, the run key."""

    config: EnhanceConfig
    source: str
    model: dict[str, Any]
    run_key: str
    force: bool = False

    @property
    def name(self) -> str:
        return self.config.name


def config_from_model(model: str, scale: int | Sequence[int] | str | None = None,
                      bands: Sequence[str] | None = None, name: str | None = None) -> EnhanceConfig:
    """The config of ``domainsr enhance --model NAME [--scale S]`` (any domain, defaults elsewhere)."""
    s = parse_scale(scale)
    return EnhanceConfig(name=name or f"{model}" + (f"-x{s}" if isinstance(s, int) else ""),
                         model=ModelRef(name=model, scale=s), bands=list(bands) if bands else None)


def audit_thresholds(config: EnhanceConfig, source: str | None = None) -> Any:
    """``config.audit`` as :class:`~domainsr.audit.AuditThresholds` (ConfigError naming the file)."""
    from pydantic import ValidationError

    from domainsr.audit import AuditThresholds

    try:
        return AuditThresholds.model_validate(config.audit)
    except ValidationError as exc:
        problems = "; ".join(f"audit.{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid config: {problems}", source) from exc


def run_key(config: EnhanceConfig, model: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of everything that decides an output's content."""
    from domainsr import __version__

    payload = {
        "model": {k: v for k, v in model.items() if k not in ("path", "version")},
        "bands": config.bands,
        **({"band_map": {str(k): v for k, v in config.band_map.items()}} if config.band_map else {}),
        "tiling": config.tiling.model_dump(mode="json", include={"tile", "overlap", "blend", "amp", "stream_above_mpx",
                                                                 "stream_audit_window"}),
        "output_format": config.output.format,
        "audit": config.audit if config.run_audit else None,
        "domainsr": __version__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan_run(config: EnhanceConfig, source: str = "command line", *, force: bool = False) -> RunSpec:
    """Check ``config`` before any item runs (model exists, audit settings valid) and key the run."""
    if config.run_audit:
        audit_thresholds(config, source)
    try:
        ident = model_identity(config.model)
    except ConfigError as exc:
        raise ConfigError(exc.message, exc.path or source) from exc
    return RunSpec(config=config, source=source, model=ident, run_key=run_key(config, ident), force=force)


@dataclass
class ItemResult:
    """What happened to one item (plain data: goes into artifacts, tables and JSON)."""

    item_id: str
    kind: str
    status: Literal["enhanced", "skipped", "failed"]
    output: str | None = None
    extras: dict[str, str] = field(default_factory=dict)
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)
    seconds: float = 0.0
    message: str = ""
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def split_done(store: Store, items: Sequence[Item], spec: RunSpec) -> tuple[list[Item], list[ItemResult]]:
    """Items still to do, and results for the others: skipped (their output already has this run
    key) or failed because their output is refused (it would write over an input, or replace a
    file that is not ours: ``store.check_output``). Nothing is read or written; one refused item
    does not stop the others."""
    todo, done = [], []
    check = getattr(store, "check_output", None)
    for item in items:
        try:
            if check is not None:
                check(item)
        except DomainSRError as exc:
            log.error("%s refused: %s", item.id, exc)
            done.append(ItemResult(item.id, item.kind, "failed", message=str(exc), error=type(exc).__name__))
            continue
        found = None if spec.force else store.existing(item, spec.run_key)
        if found is None:
            todo.append(item)
            continue
        verdict, reasons = _recorded_verdict(found.extras.get("audit.json"))
        done.append(ItemResult(item.id, item.kind, "skipped", output=found.uri, extras=dict(found.extras),
                               verdict=verdict, reasons=reasons,
                               message=f"already enhanced with run key {spec.run_key}"))
    return todo, done


def _recorded_verdict(report: str | None) -> tuple[str | None, list[str]]:
    """The verdict and reasons of the audit report at ``report`` (none when it cannot be read)."""
    if not report:
        return None, []
    from domainsr.audit import AuditHeadline

    headline = AuditHeadline.read(report)
    return (None, []) if headline is None else (headline.verdict, list(headline.reasons))


def select_input(img: SpatialImage | MultiResolutionImage, bands: Sequence[str] | None) -> SpatialImage:
    """The bands to enhance: ``bands`` by name (band sets: from one resolution group), else a
    single image as it is, or a band set's finest-resolution group."""
    if isinstance(img, MultiResolutionImage):
        if bands:
            try:
                return img.select(list(bands))
            except KeyError as exc:
                raise InputError(f"band {exc.args[0]!r} is not in the band set {list(img.band_names)}",
                                 img.provenance.get("source")) from None
        return min(img.groups.values(), key=lambda g: max(g.geometry.spacing))
    if not bands or list(bands) == list(img.band_names):
        return img
    return img.select(bands)  # any spelling: B2 is B02


def read_item(store: Store, item: Item, config: EnhanceConfig) -> SpatialImage | MultiResolutionImage:
    """``store.read(item)``, with the config's ``band_map`` naming the bands of a single-file raster
    that does not describe them (files that name their bands, band sets named by their files and
    medical images keep their names)."""
    raw = store.read(item)
    if config.band_map and isinstance(raw, SpatialImage) and raw.domain == "optical" and not described(raw):
        return apply_band_map(raw, config.band_map)
    return raw


def _inferer(model: Any, config: EnhanceConfig, progress: Callable[[int, int], None] | None) -> Any:
    """The patch engine for ``model`` (a ModelDescriptor from :func:`load_model`) with the config's tiling."""
    from domainsr.engine import PatchInferer

    t = config.tiling
    return PatchInferer(model, tile=t.tile, overlap=t.overlap, batch_size=t.batch_size, device=t.device,
                        amp=t.amp, blend=t.blend, threads=t.threads, progress=progress)


def _input_for(img: SpatialImage | MultiResolutionImage, bands: Sequence[str] | None,
               ident: dict[str, Any]) -> SpatialImage:
    """The bands asked for, else the bands a checkpoint's card names when the input has them (when
    it has not, the card check that follows says what the model expects)."""
    if bands or ident["kind"] != "checkpoint":
        return select_input(img, bands)
    from domainsr.models.checkpoints import read_card

    try:
        return select_input(img, read_card(ident["path"]).bands or None)
    except InputError:
        return select_input(img, None)


def enhance_item(store: Store, item: Item, spec: RunSpec) -> ItemResult:
    """Read, enhance, audit and write one item; raises a DomainSRError (or an I/O error) on failure.

    Errors of a DICOM item name the item (its series id) and never a file path: folders of DICOM
    exports are often named after the patient, and these messages reach logs and Prefect artifacts.
    """
    cfg = spec.config
    t0 = time.monotonic()
    limit = cfg.runner.item_timeout_s
    deadline = t0 + limit if limit else None
    progress = _tile_progress(item.id, deadline, limit)
    with errors_named_by_item(item), memory_budget(cfg.runner.memory_budget_gb):
        if _streams(store, item, spec):
            return _enhance_streamed(store, item, spec, progress, t0)
        return _enhance_in_memory(store, item, spec, progress, t0)


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


def _enhance_in_memory(store: Store, item: Item, spec: RunSpec, progress: Callable[[int, int], None],
                       t0: float) -> ItemResult:
    import torch

    cfg = spec.config
    raw = read_item(store, item, cfg)
    if spec.model.get("guided"):
        img, sr, module, info = _enhance_guided(raw, spec, item, progress)
    else:
        img = _input_for(raw, cfg.bands, spec.model)
        if cfg.domain is not None and img.domain != cfg.domain:
            raise InputError(f"this is a {img.domain} image but task {cfg.name!r} is for {cfg.domain}", item.id)
        if img.mask is not None and not img.mask.any():
            raise InputError("every pixel is nodata, NaN or masked: nothing to enhance (no output written)", item.id)
        module, info = load_model(cfg.model, img)
        check_job_memory(img.channels, img.spatial_shape, module.scale, item.id)
        with torch.inference_mode():
            sr = enhance_image_checked(img, _inferer(module, cfg, progress), item)
    del raw
    sr.provenance["model"] = info
    sr.provenance["run"] = {"run_key": spec.run_key, "task": cfg.name, "config": spec.source, "item": item.id}
    extras: dict[str, Path] = {}
    verdict, reasons = None, []
    with tempfile.TemporaryDirectory(prefix="domainsr-audit-") as tmp:
        if cfg.run_audit:
            from domainsr.audit import audit_output, write_report, write_risk_map

            th = audit_thresholds(cfg, spec.source)
            tta_model = module if th.tta != "off" else None  # a guided model cannot run on LR alone
            scale = _scale_of(sr, img)
            result = audit_output(sr, img, degradation=consistency_operator(spec.model, scale, img.channels),
                                  thresholds=th,
                                  model=tta_model, model_info={k: v for k, v in info.items() if k != "path"})
            html, js = write_report(result, tmp, stem="audit")
            risk_name = risk_label(img.domain)
            risk = write_risk_map(result, Path(tmp) / risk_name)
            extras = {"audit.html": html, "audit.json": js, risk_name: Path(risk)}
            verdict, reasons = result.verdict, list(result.reasons)
            sr.provenance["run"]["audit"] = {"verdict": verdict, "reasons": reasons}
            del result
        written = store.write(item, sr, spec.run_key, extras=extras)
    return ItemResult(item.id, item.kind, "enhanced", output=written.uri, extras=dict(written.extras),
                      verdict=verdict, reasons=reasons, seconds=round(time.monotonic() - t0, 2),
                      message=f"{info['name']} x{scale_text(info['scale'])}")


def job_bytes(channels: int, spatial_shape: Sequence[int], scale: int | Sequence[int]) -> int:
    """Memory of enhancing a whole image at once: its float32 copy and the float32 output."""
    factors = np.broadcast_to(np.asarray(scale, dtype=np.int64), (len(spatial_shape),))
    return decoded_bytes((channels, *spatial_shape), np.float32) * (1 + math.prod(int(f) for f in factors))


def check_job_memory(channels: int, spatial_shape: Sequence[int], scale: int | Sequence[int], item_id: str) -> None:
    """ResourceLimitError when enhancing the whole image at once would exceed the memory budget."""
    shape = "x".join(str(int(s)) for s in spatial_shape)
    check_fits(job_bytes(channels, spatial_shape, scale), f"enhancing {channels}x{shape} at x{scale_text(scale)}",
               item_id, "crop or split the input, or raise the budget")


def _streams(store: Store, item: Item, spec: RunSpec) -> bool:
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


def _enhance_streamed(store: Any, item: Item, spec: RunSpec, progress: Callable[[int, int], None],
                      t0: float) -> ItemResult:
    """A large raster: the model checked on (and, per image, normalised by) a central window, the
    whole file enhanced window by window into the output COG (bounded memory), and the
    reference-free audit run on that central window of the input and the written output."""
    import torch

    from domainsr.engine.streaming import enhance_raster_file
    from domainsr.image import now_iso
    from domainsr.io.raster import raster_info, read_raster

    cfg = spec.config
    path = item.meta.get("path", item.uri)
    header = raster_info(path)
    _, rows, cols = header["shape"]
    bands = _streamed_bands(header, cfg, spec.model, path)
    side = cfg.tiling.stream_audit_window
    h, w = min(side, rows), min(side, cols)
    r0, c0 = (rows - h) // 2, (cols - w) // 2
    window = {"row_off": r0, "col_off": c0, "height": h, "width": w}
    probe = read_raster(path, window=((r0, r0 + h), (c0, c0 + w)), bands=bands)
    names = _mapped_names(header, cfg.band_map, path)
    if names != list(header["band_names"]):
        probe = apply_band_map(probe, {k + 1: names[i - 1] for k, i in enumerate(bands or range(1, len(names) + 1))})
    if cfg.domain is not None and probe.domain != cfg.domain:
        raise InputError(f"this is a {probe.domain} image but task {cfg.name!r} is for {cfg.domain}", item.id)
    module, info = load_model(cfg.model, probe)
    inferer = _inferer(module, cfg, progress)
    f = inferer.scale_for(2)
    out_path = store.output_path(item)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # the tiled work file and the COG made from it: together about the uncompressed size
    check_disk(out_path.parent, decoded_bytes((probe.channels, rows * f[0], cols * f[1]), probe.data.dtype),
               f"the x{scale_text(f)} output of {probe.channels}x{rows}x{cols} pixels", path)
    out = store.open_output(item)
    with torch.inference_mode():
        enhance_raster_file(path, out, inferer, bands=bands, model_info=info, band_names=probe.band_names)
    run: dict[str, Any] = {"run_key": spec.run_key, "task": cfg.name, "config": spec.source, "item": item.id,
                           "streamed": True}
    prov = {"format": "raster", "model": info, "run": run,
            "history": [{"time": now_iso(), "step": "enhance (streamed)", "model": info["name"], "scale": list(f),
                         "tiles": {"computed": inferer.stats.computed, "skipped": inferer.stats.skipped}}]}
    verdict, reasons, extras = None, [], {}
    with tempfile.TemporaryDirectory(prefix="domainsr-audit-") as tmp:
        if cfg.run_audit:
            from domainsr.audit import audit_output, write_report, write_risk_map

            th = audit_thresholds(cfg, spec.source)
            sr = read_raster(out, window=((r0 * f[0], (r0 + h) * f[0]), (c0 * f[1], (c0 + w) * f[1])))
            result = audit_output(sr, probe, degradation=consistency_operator(spec.model, f, probe.channels),
                                  thresholds=th,
                                  model=module if th.tta != "off" else None, model_info=info)
            html, js = write_report(result, tmp, stem="audit")
            risk_name = risk_label(sr.domain)
            risk = write_risk_map(result, Path(tmp) / risk_name)
            extras = {"audit.html": html, "audit.json": js, risk_name: Path(risk)}
            verdict, reasons = result.verdict, list(result.reasons)
            run["audit"] = {"verdict": verdict, "reasons": reasons, "window": window}
        written = store.commit(item, spec.run_key, extras, prov)
    note = f" (streamed; audit on a central {h}x{w} window)" if cfg.run_audit else " (streamed)"
    return ItemResult(item.id, item.kind, "enhanced", output=written.uri, extras=dict(written.extras),
                      verdict=verdict, reasons=reasons, seconds=round(time.monotonic() - t0, 2),
                      message=f"{info['name']} x{scale_text(info['scale'])}{note}")


def _mapped_names(header: dict[str, Any], band_map: dict[int, str] | None, path: str) -> list[str]:
    """A raster's band names (its header's), with ``band_map`` applied when it has no band
    descriptions (as :func:`read_item`)."""
    names = list(header["band_names"])
    if not band_map or any((d or "").strip() for d in header.get("descriptions") or []):
        return names
    too_far = [i for i in (band_map or {}) if i > len(names)]
    if too_far:
        raise InputError(f"band map names band {too_far[0]} but the file has {len(names)} band(s)", path)
    return [(band_map or {}).get(i, n) for i, n in enumerate(names, start=1)]


def _streamed_bands(header: dict[str, Any], cfg: EnhanceConfig, model: dict[str, Any], path: str) -> list[int] | None:
    """The 1-based bands of a streamed raster to enhance: the config's ``bands``, else a
    checkpoint card's bands when the file has them all (names after the band map, any spelling),
    else all (``None``)."""
    names = _mapped_names(header, cfg.band_map, path)
    wanted = list(cfg.bands) if cfg.bands else None
    if wanted is None and model["kind"] == "checkpoint":
        from domainsr.models.checkpoints import read_card

        card_bands = read_card(model["path"]).bands
        wanted = card_bands if card_bands and not match_bands(card_bands, names)[1] else None
    if wanted is None:
        return None
    found, missing = match_bands(wanted, names)
    if missing:
        raise InputError(f"bands {missing} are not in the image's bands {names}", path)
    return [names.index(b) + 1 for b in found]


def _enhance_guided(raw: SpatialImage | MultiResolutionImage, spec: RunSpec, item: Item,
                    progress: Callable[[int, int], None]) -> tuple[SpatialImage, SpatialImage, Any, dict[str, Any]]:
    """A guided checkpoint (e.g. Sentinel-2 20 m bands guided by the 10 m bands): the card's target
    bands of a band set, on the guide grid. Returns (LR target bands, SR, module for TTA or None, info)."""
    import torch

    from domainsr.engine.guided import enhance_guided, guided_inferer, guided_inputs
    from domainsr.models.guided import guided_bands, load_guided_checkpoint

    model, card = load_guided_checkpoint(spec.model["path"])
    target, guide = guided_bands(card)
    if not isinstance(raw, MultiResolutionImage):
        raise ModelCardMismatch(f"guided model {card.name!r} needs a band set (e.g. a Sentinel-2 folder) with "
                                f"bands {target + guide}", item.id)
    missing = [b for b in (*target, *guide) if b not in raw.band_names]
    if missing:
        raise ModelCardMismatch(f"guided model {card.name!r} needs bands {missing}, the band set has "
                                f"{list(raw.band_names)}", item.id)
    lr, g = guided_inputs(raw, target, guide, card.scale)
    t = spec.config.tiling
    inferer = guided_inferer(model, tile=t.tile, batch_size=t.batch_size, device=t.device, amp=t.amp,
                             threads=t.threads, progress=progress)
    with torch.inference_mode():
        sr = enhance_guided(lr, g, inferer)
    info = {k: v for k, v in spec.model.items() if k != "path"}
    return lr, sr, None, info


def _scale_of(sr: SpatialImage, lr: SpatialImage) -> tuple[int, ...]:
    return tuple(a // b for a, b in zip(sr.spatial_shape, lr.spatial_shape))


def scale_text(scale: int | Sequence[int]) -> str:
    """``2`` or ``[2, 2]`` -> ``"2"``; ``[1, 1, 4]`` -> ``"1x1x4"``."""
    vals = [scale] if isinstance(scale, int) else list(scale)
    return str(vals[0]) if len(set(vals)) == 1 else "x".join(str(v) for v in vals)


def enhance_image_checked(img: SpatialImage, inferer: Any, item: Item) -> SpatialImage:
    """``engine.enhance_image`` with the item named in a shape/scale error."""
    from domainsr.engine import enhance_image

    try:
        return enhance_image(img, inferer)
    except DomainSRError as exc:
        if exc.path:
            raise
        raise type(exc)(exc.message, item.id) from exc


def summarize(results: Sequence[ItemResult], spec: RunSpec, output: str | None) -> dict[str, Any]:
    """Counts and rows of a run (the flow's final state carries this)."""
    counts = {s: sum(r.status == s for r in results) for s in ("enhanced", "skipped", "failed")}
    return {"task": spec.name, "run_key": spec.run_key, "model": spec.model.get("name"), "output": output,
            "total": len(results), **counts, "items": [r.to_dict() for r in results]}


# ---------------------------------------------------------------------------------------------
# audits outside a batch


def card_degradation(ident: dict[str, Any], scale: Sequence[int]) -> dict[str, Any] | None:
    """The degradation a checkpoint was trained to invert (its card), on ``scale``'s axes (a
    slice-wise card's 2D factors become the volume's), or ``None``. A training mix (``one_of``)
    is audited against its primary (first) operator: the held-out pair and the LR-consistency
    check must use one and the same physics."""
    if ident["kind"] != "checkpoint":
        return None
    from domainsr.models.checkpoints import read_card

    spec = dict(read_card(ident["path"]).degradation) or None
    if spec is not None and "kind" not in spec and isinstance(spec.get("target"), dict):
        spec = dict(spec["target"])  # guided cards: {protocol, target, guide}; the output is the target bands
    if spec is not None:
        from domainsr.degrade import primary_spec

        spec = primary_spec(spec)
    given = spec.get("scale") if spec is not None else None
    if isinstance(given, (list, tuple)) and len(given) != len(scale):
        spec["scale"] = list(scale)
    return spec


def consistency_operator(ident: dict[str, Any], scale: Sequence[int], channels: int) -> NoiseFreeOperator | None:
    """The noise-free HR -> LR operator for the reference-free audit's LR-consistency check: the
    checkpoint's own degradation (SR re-degraded that way should give back the input; see
    :func:`~domainsr.degrade.noise_free_operator`), or ``None`` (the audit's default area average)
    for registry models and degradations without a noise-free form."""
    spec = card_degradation(ident, scale)
    return None if spec is None else noise_free_operator(spec, scale, channels)


def _default_degradation(scale: Sequence[int]) -> dict[str, Any]:
    return {"kind": "gaussian_mean", "scale": list(scale), "sigma": 0.0}


def heldout_audit(reference: str | Path, model: ModelRef, out_dir: str | Path, *, audit: dict[str, Any] | None = None,
                  bands: Sequence[str] | None = None, degradation: dict[str, Any] | None = None, seed: int = 0,
                  domain: str | None = None) -> AuditOutcome:
    """Held-out audit: degrade the real high-resolution ``reference`` (the checkpoint's own
    degradation from its card, else a block mean at the model's scale), enhance it with ``model``
    and with the interpolation baseline, compare both with the reference, and write the report
    (``<stem>.audit.html/.json``) and risk map into ``out_dir``. Returns the paths and headline
    numbers (:class:`~domainsr.audit.AuditOutcome`)."""
    from domainsr.audit import AuditOutcome, area_average, audit_heldout, write_report, write_risk_map
    from domainsr.audit.privacy import public_stem
    from domainsr.degrade import build_degradation
    from domainsr.io import detect_format, read_image

    th = audit_thresholds(EnhanceConfig(name="audit", model=model, audit=audit or {}))
    ident = model_identity(model)
    if ident.get("guided"):
        raise ConfigError(f"the held-out audit of guided model {ident['name']!r} needs its guide bands degraded "
                          "too; it is measured at training time (see its model card)")
    nifti_domain = domain if domain in ("mri", "ct") and detect_format(reference) == "nifti" else None
    raw = read_image(reference, domain=nifti_domain) if nifti_domain else read_image(reference)
    img = _input_for(raw, bands, ident)
    module, info = load_model(model, img)
    scale = tuple(int(s) for s in np.broadcast_to(np.asarray(module.scale), (img.spatial_dims,)))
    spec = degradation or card_degradation(ident, scale) or _default_degradation(scale)
    consistency = noise_free_operator(spec, scale, img.channels) or area_average(scale)
    result = audit_heldout(img, module, build_degradation(spec), scale=scale, consistency=consistency,
                           thresholds=th, seed=seed, model_info=info)
    out = Path(out_dir)
    stem = public_stem(reference, img.domain)
    html, js = write_report(result, out, stem=f"{stem}.audit")
    risk = write_risk_map(result, out / f"{stem}.{risk_label(img.domain)}")
    table = None if result.metrics.reference is None else result.metrics.reference.per_metric
    return AuditOutcome(verdict=result.verdict, reasons=list(result.reasons), html=str(html), json_path=str(js),
                        risk_map=str(risk), model=info["name"], scale=list(scale), domain=img.domain,
                        psnr=None if table is None else table.psnr.means(),
                        ssim=None if table is None else table.ssim.means(), regions=len(result.regions))


def output_audit(sr: str | Path, lr: str | Path, out_dir: str | Path, *, reference: str | Path | None = None,
                 audit: dict[str, Any] | None = None, bands: Sequence[str] | None = None) -> AuditOutcome:
    """Audit a super-resolved file made by any tool against its low-resolution input (and a
    high-resolution reference when there is one); writes the report and risk map into ``out_dir``."""
    from domainsr.audit import AuditOutcome, AuditThresholds, audit_output, write_report, write_risk_map
    from domainsr.audit.privacy import public_stem
    from domainsr.io import read_image

    th = AuditThresholds.model_validate(audit or {})
    sr_img = select_input(read_image(sr), bands)
    lr_img = select_input(read_image(lr), bands)
    ref_img = select_input(read_image(reference), bands) if reference is not None else None
    result = audit_output(sr_img, lr_img, ref_img, thresholds=th)
    out = Path(out_dir)
    stem = public_stem(sr, sr_img.domain)
    html, js = write_report(result, out, stem=f"{stem}.audit")
    risk = write_risk_map(result, out / f"{stem}.{risk_label(sr_img.domain)}")
    reference_metrics = result.metrics.reference
    return AuditOutcome(verdict=result.verdict, reasons=list(result.reasons), html=str(html), json_path=str(js),
                        risk_map=str(risk), regions=len(result.regions),
                        psnr=None if reference_metrics is None else reference_metrics.per_metric.psnr.means())

