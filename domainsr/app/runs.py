"""Runs: a run's spec (the config, where it came from, the model's identity and the *run key*),
planning (everything checked before any item runs), which items are already done (their output
carries the same run key: skipped) or refused, one item's result, and a run's summary.

The run key is 16 hex digits of a hash of the model's identity (e.g. the checkpoint's sha256)
and every setting that changes the output; a run's name, retries or thread count do not.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from domainsr.app.audits import audit_thresholds
from domainsr.app.models import model_identity, parse_scale
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.errors import ConfigError, DomainSRError
from domainsr.stores.base import Item, Store

log = logging.getLogger("domainsr.app")


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


def run_key(config: EnhanceConfig, model: dict[str, Any]) -> str:
    """16 hex digits of the sha256 of everything that decides an output's content."""
    from domainsr import __version__

    payload = {
        "model": {k: v for k, v in model.items() if k not in ("path", "version")},
        "bands": config.bands,
        **({"band_map": {str(k): v for k, v in config.band_map.items()}} if config.band_map else {}),
        **({"domain": config.domain} if config.domain else {}),  # how a NIfTI is read (HU or a.u.)
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


def summarize(results: Sequence[ItemResult], spec: RunSpec, output: str | None) -> dict[str, Any]:
    """Counts and rows of a run (the flow's final state carries this)."""
    counts = {s: sum(r.status == s for r in results) for s in ("enhanced", "skipped", "failed")}
    return {"task": spec.name, "run_key": spec.run_key, "model": spec.model.get("name"), "output": output,
            "total": len(results), **counts, "items": [r.to_dict() for r in results]}
