"""glibc malloc settings that let CPU inference reuse its activation memory.

PyTorch's CPU tensors come straight from ``malloc``. glibc serves every request above its mmap
threshold (at most 32 MiB, dynamically) with a fresh ``mmap``, and a thread outside the main
arena does so for anything above its 64 MiB heap, whatever the threshold. So each layer's output
of a large window is new memory that the kernel must fault in and zero page by page, and is
unmapped again when freed. Measured on 2 cores with the light model (ResCNN 8x32, 4 bands,
1042^2 window, channels-last): 0.7 M page faults and 2.3 s per forward pass by default, 6 k and
1.2 s with these settings (1.9x), the same in a worker thread (Prefect's task runner) once the
arena is shared.

:func:`tune_malloc` (idempotent; glibc only; ``DOMAINSR_MALLOC_TUNING=0`` turns it off) raises the
mmap and trim thresholds and keeps threads in the main arena, so freed activations are reused.
It acts on threads that have not allocated yet, so the CLI calls it at start-up and the engine
again before a run. :func:`release_memory` (``malloc_trim``) returns the freed heap to the system
after a run, so a long-lived process (warm runner child, Dask worker) does not keep its peak.
Same idea as the jemalloc/tcmalloc ``LD_PRELOAD`` that Intel advises for PyTorch on CPU, without
a preload or a re-exec.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import platform

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8  # <malloc.h>
#: Requests below this come from the heap (reused); larger ones (whole-scene buffers) still mmap.
MMAP_THRESHOLD = 1 << 30
#: Freed memory at the top of the heap is kept up to this much until :func:`release_memory`.
TRIM_THRESHOLD = (1 << 31) - 1  # the largest C int
#: glibc before 2.35 accepts an mmap threshold of at most half its 64 MiB heap size.
FALLBACK_MMAP_THRESHOLD = 32 << 20

_tuned: bool | None = None  # set by the first tune_malloc() of this process


def disabled() -> bool:
    """Whether ``DOMAINSR_MALLOC_TUNING`` turns the tuning off (0/false/off/no)."""
    return os.environ.get("DOMAINSR_MALLOC_TUNING", "1").strip().lower() in ("0", "false", "off", "no")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def tune_malloc() -> bool:
    """Apply the settings (once per process; inherited by forked children). Returns whether they
    are in force."""
    global _tuned
    if _tuned is not None:
        return _tuned
    libc = None if disabled() else _libc()
    ok = False
    if libc is not None:
        mmap_ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                       or libc.mallopt(M_MMAP_THRESHOLD, FALLBACK_MMAP_THRESHOLD))
        ok = mmap_ok and bool(libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(libc.mallopt(M_ARENA_MAX, 1))
        log.debug("glibc malloc tuned for tensor reuse: %s", ok)
    _tuned = ok
    return ok


def release_memory() -> None:
    """Return the heap's free memory to the system (after a run; a no-op without the tuning)."""
    libc = _libc()
    if _tuned and libc is not None:
        libc.malloc_trim(0)
