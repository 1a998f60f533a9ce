"""Deployments and their cron schedules, read from the repository's ``prefect.yaml`` (the one place
they are defined), as Prefect ``RunnerDeployment`` objects: to register with a Prefect API
(:func:`create_deployments`), to serve from this process without a worker
(:func:`serve_deployments`), or to list with their next run times (:func:`describe`).

``prefect deploy --all`` reads the same file for a server with a work pool and a worker.
"""
from __future__ import annotations

import datetime as dt
import importlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from domainsr.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"


@dataclass(frozen=True)
class ScheduleSpec:
    cron: str
    timezone: str = "UTC"
    active: bool = True


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments``."""

    name: str
    entrypoint: str
    parameters: dict[str, Any] = field(default_factory=dict)
    schedules: tuple[ScheduleSpec, ...] = ()
    description: str = ""
    tags: tuple[str, ...] = ()
    work_pool: str | None = None

    @property
    def flow_name(self) -> str:
        return load_flow(self.entrypoint).name

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


def load_specs(path: str | Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments of a ``prefect.yaml`` file (ConfigError naming the file on a bad entry)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read deployments: {exc}", path) from exc
    specs = []
    for n, d in enumerate(doc.get("deployments") or []):
        try:
            specs.append(DeploymentSpec(
                name=str(d["name"]), entrypoint=str(d["entrypoint"]), parameters=dict(d.get("parameters") or {}),
                schedules=tuple(ScheduleSpec(cron=str(s["cron"]), timezone=str(s.get("timezone") or "UTC"),
                                             active=bool(s.get("active", True))) for s in d.get("schedules") or []),
                description=" ".join(str(d.get("description") or "").split()), tags=tuple(d.get("tags") or ()),
                work_pool=(d.get("work_pool") or {}).get("name")))
        except (KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"deployment #{n + 1} is malformed ({exc!r})", path) from exc
    return specs


def select(specs: Sequence[DeploymentSpec], names: Sequence[str] | None) -> list[DeploymentSpec]:
    """The specs named (all when ``names`` is empty); an unknown name is a ConfigError."""
    if not names:
        return list(specs)
    known = {s.name: s for s in specs}
    missing = [n for n in names if n not in known]
    if missing:
        raise ConfigError(f"no deployment named {missing}; defined: {sorted(known)}", PREFECT_YAML)
    return [known[n] for n in names]


def load_flow(entrypoint: str) -> Any:
    """The flow object of ``path/to/module.py:flow_name`` (a module of this repository)."""
    path, _, attr = entrypoint.partition(":")
    module = ".".join(Path(path).with_suffix("").parts)
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load flow {entrypoint!r}: {exc}", PREFECT_YAML) from exc


def to_deployment(spec: DeploymentSpec, *, paused: bool | None = None) -> Any:
    """A ``RunnerDeployment`` with the spec's cron schedules and parameters."""
    from prefect.schedules import Cron

    flow = load_flow(spec.entrypoint)
    schedules = [Cron(s.cron, timezone=s.timezone, active=s.active) for s in spec.schedules]
    return flow.to_deployment(spec.name, schedules=schedules or None, parameters=spec.parameters,
                              description=spec.description or None, tags=list(spec.tags), paused=paused)


def create_deployments(names: Sequence[str] | None = None, *, path: str | Path = PREFECT_YAML,
                       paused: bool | None = None) -> dict[str, str]:
    """Register (create or update) deployments with the Prefect API in ``PREFECT_API_URL``
    (or the ephemeral one); returns ``{full name: deployment id}``."""
    out = {}
    for spec in select(load_specs(path), names):
        deployment = to_deployment(spec, paused=paused)
        out[f"{deployment.flow_name}/{spec.name}"] = str(deployment.apply())
    return out


def serve_deployments(names: Sequence[str] | None = None, *, path: str | Path = PREFECT_YAML) -> None:
    """Serve deployments from this process: runs start on schedule with no worker or work pool
    (blocks until interrupted)."""
    from prefect import serve

    serve(*[to_deployment(s) for s in select(load_specs(path), names)])


def next_runs(schedule: ScheduleSpec, n: int = 3, after: dt.datetime | None = None) -> list[dt.datetime]:
    """The next ``n`` times ``schedule`` fires."""
    from prefect.server.schemas.schedules import CronSchedule
    from prefect.utilities.asyncutils import run_coro_as_sync

    start = after or dt.datetime.now(dt.timezone.utc)
    cron = CronSchedule(cron=schedule.cron, timezone=schedule.timezone)
    return list(run_coro_as_sync(cron.get_dates(n=n, start=start)))


def describe(names: Sequence[str] | None = None, *, path: str | Path = PREFECT_YAML) -> list[dict[str, Any]]:
    """Plain rows for ``domainsr schedule list``."""
    rows = []
    for spec in select(load_specs(path), names):
        rows.append({"name": spec.name, "flow": spec.entrypoint, "parameters": spec.parameters,
                     "schedules": [{"cron": s.cron, "timezone": s.timezone, "active": s.active,
                                    "next": [d.isoformat() for d in next_runs(s)]} for s in spec.schedules],
                     "description": spec.description, "work_pool": spec.work_pool})
    return rows
