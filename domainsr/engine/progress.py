"""Progress reporting: a plain ``progress(done, total)`` callback, with a rich bar for the CLI and
a logger (Prefect's run logger inside a flow, standard logging elsewhere) for flows."""
from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol


class Progress(Protocol):
    def __call__(self, done: int, total: int) -> None: ...


@contextmanager
def rich_progress(description: str = "enhancing", transient: bool = False,
                  console: Any = None) -> Iterator[Progress]:
    """A rich progress bar (tiles done, elapsed, ETA) for the CLI; yields the callback."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress

    with RichProgress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                      transient=transient, console=console) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


def _run_logger() -> logging.Logger | logging.LoggerAdapter:
    try:
        from prefect import get_run_logger
        from prefect.exceptions import MissingContextError

        try:
            return get_run_logger()
        except MissingContextError:
            pass
    except ImportError:  # pragma: no cover - prefect is a core dependency
        pass
    return logging.getLogger("domainsr.engine")


def log_progress(description: str = "enhance", every_s: float = 10.0,
                 logger: logging.Logger | logging.LoggerAdapter | None = None) -> Progress:
    """A callback that logs ``done/total``, percentage, elapsed time and ETA at most every
    ``every_s`` seconds (and at the end), to Prefect's run logger when called in a flow run."""
    log = logger or _run_logger()
    t0 = time.monotonic()
    last = [-float("inf")]

    def update(done: int, total: int) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < every_s:
            return
        last[0] = now
        el = now - t0
        eta = el / done * (total - done) if done else float("nan")
        log.info("%s: %d/%d tiles (%.0f%%), elapsed %.0f s, ETA %.0f s", description, done, total,
                 100.0 * done / max(total, 1), el, eta)

    return update
