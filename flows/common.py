"""What the flows share: the task runner a config asks for, the retry rule, artifact helpers."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

from domainsr.config import RunnerConfig
from domainsr.retry import is_transient


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
