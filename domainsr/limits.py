"""The memory budget: how many bytes one decoded input (or one job's arrays) may take.

Readers check the decoded size from the header *before* decoding any pixel, so a file whose
header claims 10^6 x 10^6 pixels (or a small .nii.gz that inflates to terabytes) is refused with
a :class:`~domainsr.errors.ResourceLimitError` naming the file, the size and the budget, instead of
dying in the kernel's out-of-memory killer at 3 a.m. Single-file rasters above the budget are not
refused by a batch: :mod:`domainsr.app.enhance` sends them down the streaming path (bounded
memory, any size), which checks instead that the output fits on the disk (:func:`check_disk`).

The budget, first that is set:

1. :func:`memory_budget` (a context manager; ``enhance_item`` enters it with
   ``runner.memory_budget_gb`` of the task config),
2. the ``DOMAINSR_MEMORY_BUDGET_GB`` environment variable,
3. :data:`DEFAULT_FRACTION` of this machine's physical memory.
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from os import PathLike

import numpy as np

from domainsr.errors import ConfigError, ResourceLimitError

ENV_VAR = "DOMAINSR_MEMORY_BUDGET_GB"
#: Share of physical memory one input may take when nothing else is configured (the output of an
#: x2 model is 4x the input and the engine needs working room, so inputs get a share, not all).
DEFAULT_FRACTION = 0.5
GIB = 1024**3

_BUDGET: ContextVar[int | None] = ContextVar("domainsr_memory_budget", default=None)


def _total_memory() -> int:
    import psutil

    return int(psutil.virtual_memory().total)


def budget_bytes() -> int:
    """The memory budget in force, in bytes."""
    set_ = _BUDGET.get()
    if set_ is not None:
        return set_
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise ConfigError(f"{ENV_VAR}={env!r} is not a number of GiB") from None
        if not math.isfinite(gb) or gb <= 0:
            raise ConfigError(f"{ENV_VAR}={env!r} must be a positive number of GiB")
        return int(gb * GIB)
    return int(DEFAULT_FRACTION * _total_memory())


@contextmanager
def memory_budget(gib: float | None) -> Iterator[None]:
    """Use ``gib`` GiB as the budget inside the block (``None``: keep the one in force)."""
    if gib is None:
        yield
        return
    if not math.isfinite(gib) or gib <= 0:
        raise ConfigError(f"memory budget must be a positive number of GiB, not {gib!r}")
    token = _BUDGET.set(int(gib * GIB))
    try:
        yield
    finally:
        _BUDGET.reset(token)


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``; binary units up to EiB."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} EiB"  # pragma: no cover


def decoded_bytes(shape: Sequence[int], dtype: np.dtype | str | type) -> int:
    """Bytes of an array of ``shape`` and ``dtype`` (Python ints: no overflow for absurd headers)."""
    return math.prod(int(s) for s in shape) * np.dtype(dtype).itemsize


def check_fits(nbytes: int, what: str, path: str | PathLike[str] | None = None, hint: str = "") -> None:
    """Raise ResourceLimitError when ``nbytes`` exceeds the budget in force."""
    budget = budget_bytes()
    if nbytes > budget:
        more = f"; {hint}" if hint else ""
        raise ResourceLimitError(
            f"{what} would need {human_bytes(nbytes)} of memory, above the memory budget of "
            f"{human_bytes(budget)} (runner.memory_budget_gb or {ENV_VAR}){more}", path)


def fits(nbytes: int) -> bool:
    """Whether ``nbytes`` is within the budget in force."""
    return nbytes <= budget_bytes()


def check_disk(folder: str | PathLike[str], nbytes: int, what: str, name: str | PathLike[str] | None = None) -> None:
    """Raise ResourceLimitError when ``folder``'s file system has less than ``nbytes`` free."""
    import shutil

    free = shutil.disk_usage(folder).free
    if nbytes > free:
        raise ResourceLimitError(f"{what} would need about {human_bytes(nbytes)} of disk, "
                                 f"{human_bytes(free)} is free in {folder}", name)
