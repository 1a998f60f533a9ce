"""The progress bus: in-process listeners of ``(kind, key, done, total)`` events.

Events: ``("tiles", item_id, ...)`` while an item is enhanced, ``("windows", item, ...)`` while it
is audited (the audit's windows), ``("items", run_name, ...)`` as a batch's items finish and
``("steps", model_name, ...)`` while a model trains. The CLI draws its
progress bars from them (:func:`listen`); flows send them (:func:`report`) and also log progress
with an ETA.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from domainsr.errors import ResourceLimitError

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


def tile_progress(item_id: str, deadline: float | None, limit: float | None) -> Callable[[int, int], None]:
    """The engine's tile callback for one item: logged (with an ETA), reported as ``"tiles"``
    events, and a ResourceLimitError once ``deadline`` (``time.monotonic``) has passed."""
    from domainsr.engine import log_progress

    logged = log_progress(f"enhance {item_id}")

    def update(done: int, total: int) -> None:
        logged(done, total)
        report("tiles", item_id, done, total)
        if deadline is not None and time.monotonic() > deadline:
            raise ResourceLimitError(f"stopped after the time limit of {limit:g} s per item "
                                     f"({done}/{total} tiles done)", item_id)

    return update


def audit_progress(key: str) -> Callable[[int, int], None]:
    """The audit's window callback for item ``key`` (``audit_output(progress=...)``): logged (with an
    ETA) and reported as ``"windows"`` events."""
    from domainsr.engine import log_progress

    logged = log_progress(f"audit {key}")

    def update(done: int, total: int) -> None:
        logged(done, total)
        report("windows", key, done, total)

    return update
