"""Deployments and their cron schedules, defined once in the repository's ``prefect.yaml`` and read
by Prefect's own loader (the one ``prefect deploy`` uses), as Prefect ``RunnerDeployment``
objects: to register with a Prefect API (:func:`create_deployments`), to serve from this process
without a worker (:func:`serve_deployments`), or to list with their next run times
(:func:`describe`). ``prefect deploy --all`` reads the same file for a server with a work pool and
a worker.

No key is dropped on the way: a key that Prefect's own schema would ignore (a misspelling such as
``concurency_limit``) is a :class:`ConfigError`, and :func:`to_deployment` applies every key a
served deployment can have (schedules with all their options, ``concurrency_limit`` with its
collision strategy, parameters, tags, version, ``paused``, ...). The infrastructure keys
(``work_pool`` and ``build``/``push``/``pull`` steps) are for ``prefect deploy`` and a worker;
``domainsr schedule create/serve`` runs the flows in the serving process instead. Keys only
``prefect deploy`` applies (``triggers``, ``sla``) are refused by :func:`to_deployment` rather
than ignored.

Prefect 3.9 offers no public loader for ``prefect.yaml``: :func:`read_prefect_yaml` calls the one
behind ``prefect deploy`` (``prefect.cli.deploy._config``), which ``pyproject.toml`` pins to the
tested minor version.
"""
from __future__ import annotations

import datetime as dt
import importlib
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from domainsr.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
PREFECT_YAML = REPO / "prefect.yaml"

#: Keys for ``prefect deploy`` and a worker only: where the code is and what runs it.
INFRASTRUCTURE_KEYS = frozenset({"work_pool", "build", "push", "pull"})
#: Keys :func:`to_deployment` applies to a served deployment.
APPLIED_KEYS = frozenset({"name", "entrypoint", "flow_name", "description", "version", "version_type", "tags",
                          "parameters", "schedules", "paused", "concurrency_limit", "enforce_parameter_schema"})


@dataclass(frozen=True)
class ScheduleSpec:
    """A cron schedule (what ``domainsr schedule list`` shows; Prefect applies the whole entry)."""

    cron: str
    timezone: str = "UTC"
    active: bool = True

    @classmethod
    def from_config(cls, entry: Mapping[str, Any], where: str) -> ScheduleSpec:
        if not entry.get("cron"):
            raise ConfigError(f"{where}: DomainSR's schedules are cron schedules (not interval/rrule)", PREFECT_YAML)
        return cls(str(entry["cron"]), str(entry.get("timezone") or "UTC"), bool(entry.get("active", True)))


@dataclass(frozen=True)
class DeploymentSpec:
    """One entry of ``prefect.yaml``'s ``deployments`` as Prefect read it: ``config`` holds every key."""

    config: Mapping[str, Any]

    def __post_init__(self) -> None:
        missing = [k for k in ("name", "entrypoint") if not self.config.get(k)]
        if missing:
            raise ConfigError(f"deployment {self.config.get('name', '?')!r} has no {' or '.join(missing)}",
                              PREFECT_YAML)
        for n, entry in enumerate(self.config.get("schedules") or []):
            ScheduleSpec.from_config(entry, f"deployment {self.name!r} schedule #{n + 1}")
        _ = self.concurrency_limit  # checked here, not when a deployment is created

    @property
    def name(self) -> str:
        return str(self.config["name"])

    @property
    def entrypoint(self) -> str:
        return str(self.config["entrypoint"])

    @property
    def parameters(self) -> dict[str, Any]:
        return dict(self.config.get("parameters") or {})

    @property
    def schedules(self) -> tuple[ScheduleSpec, ...]:
        return tuple(ScheduleSpec.from_config(s, self.name) for s in self.config.get("schedules") or [])

    @property
    def description(self) -> str:
        return " ".join(str(self.config.get("description") or "").split())

    @property
    def tags(self) -> tuple[str, ...]:
        return tuple(self.config.get("tags") or ())

    @property
    def work_pool(self) -> str | None:
        return (self.config.get("work_pool") or {}).get("name")

    @property
    def concurrency_limit(self) -> dict[str, Any] | None:
        """``{"limit": n, "collision_strategy": ...}`` (Prefect's default strategy: ENQUEUE), or None."""
        value = self.config.get("concurrency_limit")
        if value is None:
            return None
        spec = {"limit": value} if isinstance(value, int) else {k: v for k, v in value.items() if v is not None}
        if not isinstance(spec.get("limit"), int) or spec["limit"] < 1:
            raise ConfigError(f"deployment {self.name!r}: concurrency_limit needs a limit >= 1", PREFECT_YAML)
        return {"collision_strategy": "ENQUEUE", **spec}

    @property
    def flow_name(self) -> str:
        return load_flow(self.entrypoint).name

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


# ------------------------------------------------------------------------------------ loading

def read_prefect_yaml(path: Path) -> list[dict[str, Any]]:
    """The deployments of ``path`` as Prefect's ``prefect deploy`` loader reads and validates them
    (ConfigError with Prefect's complaint when it cannot)."""
    from prefect.cli.deploy._config import _load_deploy_configs_and_actions
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    configs, _actions = _load_deploy_configs_and_actions(path, console=console)
    complaint = console.file.getvalue().strip()  # type: ignore[attr-defined]
    if complaint:
        raise ConfigError(f"Prefect cannot use this file: {' '.join(complaint.split())}", path)
    return configs


def load_specs(path: str | Path = PREFECT_YAML) -> list[DeploymentSpec]:
    """The deployments of a ``prefect.yaml``, read by Prefect; a key Prefect would drop is a
    ConfigError naming it."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read deployments: {exc}", path) from exc
    if not isinstance(raw, dict):
        raise ConfigError("prefect.yaml must be a mapping", path)
    unknown = sorted(set(raw) - _top_level_keys())
    if unknown:
        raise ConfigError(f"Prefect ignores the top-level key(s) {unknown}", path)
    entries, configs = raw.get("deployments") or [], read_prefect_yaml(path)
    if len(entries) != len(configs):
        raise ConfigError(f"Prefect read {len(configs)} of the {len(entries)} deployments", path)
    for n, (entry, config) in enumerate(zip(entries, configs)):
        dropped = dropped_keys(entry, config)
        if dropped:
            raise ConfigError(f"deployment #{n + 1} ({entry.get('name', '?')}): Prefect ignores key(s) {dropped}",
                              path)
    return [DeploymentSpec(config) for config in configs]


def _top_level_keys() -> set[str]:
    from prefect.cli.deploy._models import PrefectYamlModel

    return {f.alias or name for name, f in PrefectYamlModel.model_fields.items()}


def dropped_keys(raw: Any, kept: Any, where: str = "") -> list[str]:
    """Dotted paths of the mapping keys in ``raw`` that are missing from ``kept`` (at any depth)."""
    if isinstance(raw, Mapping) and isinstance(kept, Mapping):
        out: list[str] = []
        for key, value in raw.items():
            out += [f"{where}{key}"] if key not in kept else dropped_keys(value, kept[key], f"{where}{key}.")
        return out
    if isinstance(raw, list) and isinstance(kept, list) and len(raw) == len(kept):
        return [k for n, (r, c) in enumerate(zip(raw, kept)) for k in dropped_keys(r, c, f"{where}{n}.")]
    return []


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


# -------------------------------------------------------------------------------- deployments

def prefect_schedules(spec: DeploymentSpec) -> list[Any] | None:
    """The spec's schedules as Prefect's ``DeploymentScheduleCreate``, converted the way
    ``prefect deploy`` converts them (time zone, ``active``, ``parameters``, ``slug``, ...)."""
    from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
    from prefect.client.schemas.actions import DeploymentScheduleCreate

    entries = spec.config.get("schedules")
    if entries is None:
        return None
    return [DeploymentScheduleCreate(**_schedule_config_to_deployment_schedule(dict(e))) for e in entries]


def to_deployment(spec: DeploymentSpec, *, paused: bool | None = None) -> Any:
    """A ``RunnerDeployment`` with every applicable key of the spec (``paused`` overrides the
    file's); a key only ``prefect deploy`` applies is a ConfigError."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig

    c = spec.config
    unsupported = sorted(set(c) - APPLIED_KEYS - INFRASTRUCTURE_KEYS)
    if unsupported:
        raise ConfigError(f"deployment {spec.name!r}: {unsupported} are applied by `prefect deploy` only",
                          PREFECT_YAML)
    flow = load_flow(spec.entrypoint)
    if c.get("flow_name") not in (None, flow.name):
        raise ConfigError(f"deployment {spec.name!r}: flow_name {c['flow_name']!r} is not the entrypoint's flow "
                          f"{flow.name!r}", PREFECT_YAML)
    limit = spec.concurrency_limit
    optional = {k: c[k] for k in ("version", "version_type", "enforce_parameter_schema") if c.get(k) is not None}
    return flow.to_deployment(
        spec.name, schedules=prefect_schedules(spec), parameters=spec.parameters,
        concurrency_limit=None if limit is None else ConcurrencyLimitConfig(**limit),
        description=spec.description or None, tags=list(spec.tags),
        paused=paused if paused is not None else c.get("paused"), **optional)


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
    """Serve deployments from this process: runs start on schedule with no worker or work pool,
    at most ``concurrency_limit`` at once (blocks until interrupted)."""
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
                     "concurrency_limit": spec.concurrency_limit, "tags": list(spec.tags),
                     "description": spec.description, "work_pool": spec.work_pool})
    return rows
