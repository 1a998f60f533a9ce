"""What the flows share: the task runner a config asks for, the retry rule, artifact helpers."""
from __future__ import annotations

import contextlib
import ipaddress
import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from prefect.task_runners import ThreadPoolTaskRunner

from domainsr.config import RunnerConfig
from domainsr.errors import ConfigError
from domainsr.retry import is_transient

#: seconds the Dask workers get to send their queued Prefect logs and events at the end of a batch
DRAIN_S = 10.0


def task_runner_for(runner: RunnerConfig) -> Any:
    """``ThreadPoolTaskRunner(max_workers)``, or prefect-dask's ``DaskTaskRunner``: on the
    scheduler at ``dask_address`` (an existing cluster: Kubernetes, HPC via dask-jobqueue, ...),
    else on a local cluster of ``dask_workers`` processes."""
    if runner.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if runner.dask_address:
            return DaskTaskRunner(address=runner.dask_address)
        return DaskTaskRunner(cluster_kwargs={
            "n_workers": local_dask_workers(runner), "threads_per_worker": runner.dask_threads_per_worker,
            "processes": True, "dashboard_address": ":0"})
    return ThreadPoolTaskRunner(max_workers=runner.max_workers)


def local_dask_workers(runner: RunnerConfig) -> int:
    from domainsr.engine.inferer import physical_cores

    return runner.dask_workers or physical_cores()


@contextlib.contextmanager
def api_for_workers(runner: RunnerConfig) -> Iterator[str | None]:
    """With the ``dask`` runner: the flow's own Prefect API URL pinned in the settings that travel
    with each task to the workers (yields it; ``None`` for other runners).

    A Dask worker runs a task's Prefect engine in its own process with the settings it receives.
    Where they name no API (Prefect's ephemeral mode: the flow's client talks to a server it started
    itself), each worker would start an ephemeral server of its own: the task runs would be
    recorded there, away from the flow's API, and a worker killed mid-run would leave its server
    orphaned. Pinned, every worker reports to the flow's API and starts no server. ConfigError when
    the cluster is on another machine and the API only listens on this one's loopback."""
    if runner.task_runner != "dask":
        yield None
        return
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    url = get_current_settings().api.url
    if not url:
        with get_client(sync_client=True) as client:
            url = str(client.api_url).rstrip("/")
    _check_reachable(url, runner.dask_address)
    with temporary_settings(updates={PREFECT_API_URL: url}):
        yield url


def _loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _local_addresses() -> set[str]:
    import psutil

    addrs = {a.address.split("%")[0] for nics in psutil.net_if_addrs().values() for a in nics}
    with contextlib.suppress(OSError):
        addrs.add(socket.gethostbyname(socket.gethostname()))
    return addrs | {socket.gethostname()}


def _check_reachable(api_url: str, dask_address: str | None) -> None:
    """ConfigError when a scheduler on another machine would get a loopback-only API URL."""
    if not dask_address or "://" not in dask_address or dask_address.startswith("inproc"):
        return  # a local cluster, or an in-process scheduler: on this machine
    api_host = urlsplit(api_url).hostname or ""
    dask_host = urlsplit(dask_address).hostname or ""
    if _loopback(api_host) and not _loopback(dask_host) and dask_host not in _local_addresses():
        raise ConfigError(
            f"the Dask workers of {dask_address} cannot report to the Prefect API at {api_url}: it listens on "
            "this machine's loopback only. Set PREFECT_API_URL to a Prefect server the workers can reach "
            "(e.g. `prefect server start --host 0.0.0.0` on a shared host)")


def drain_worker_queues(task_runner: Any) -> None:
    """Let every Dask worker send its queued Prefect logs and events now (at most
    :data:`DRAIN_S` s), before the flow ends and its API may stop; a no-op for other runners."""
    client = getattr(task_runner, "_client", None)
    if client is None:
        return
    with contextlib.suppress(Exception):  # a lost worker or a closing cluster: nothing to wait for
        client.run(_drain_here, DRAIN_S, wait=True, on_error="return")


async def _drain_here(timeout: float) -> None:
    """Run by ``Client.run`` on each worker's event loop."""
    import inspect

    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for service in (APILogWorker, EventsWorker):
        waiting = service.drain_all(timeout=timeout, at_exit=False)
        if inspect.isawaitable(waiting):
            await waiting


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry what :func:`domainsr.retry.is_transient` calls
    transient (I/O, network, a store or output failure), not bad input, bad config, a model/card
    mismatch, a time limit or a store's refusal (retrying cannot fix those)."""
    try:
        exc = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - no result to inspect: retry as Prefect would by default
        return True
    return not isinstance(exc, BaseException) or is_transient(exc)


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from ``parts``."""
    return re.sub(r"-+", "-", re.sub(r"[^a-z0-9]+", "-", "-".join(parts).lower())).strip("-")[:100]


def link(path: str | None, label: str | None = None) -> str:
    """A markdown link to a local file (as a ``file://`` URI) or a URL, or ``-``."""
    if not path:
        return "-"
    if "://" in path:  # already a URL (a PACS series, a STAC item)
        return f"[{label or path.rstrip('/').rsplit('/', 1)[-1]}]({path})"
    p = Path(path)
    return f"[{label or p.name}]({p.resolve().as_uri()})"
