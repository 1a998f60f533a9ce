"""Atomic output: write to a temporary sibling, rename into place only when complete.

A process killed mid-write (SIGKILL, power loss) leaves only a hidden ``.<name>.partial-<pid>_<host>-*``
sibling, never a file under the final name; the next write of the same output removes such debris
once its writer is gone.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from domainsr.errors import OutputError

#: A partial output written on this machine is debris once its writer process is gone; one written
#: by another machine (a shared folder) once it is older than this. Debris is removed when the same
#: output is written again.
STALE_AFTER_S = 24 * 3600.0
_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]
_OWNER = re.compile(r"(\d+)_([0-9a-f]{8})-")


def partial_prefix(final: Path) -> str:
    """Name prefix of ``final``'s temporary siblings (hidden; they record the writer's pid and host)."""
    return f".{final.name}.partial-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_partials(final: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``final`` left by a killed writer: written on this machine by
    a process that is gone, or on another machine more than :data:`STALE_AFTER_S` ago. Returns
    what was removed."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    removed = []
    now = time.time()
    prefix = partial_prefix(final)
    for entry in final.parent.glob(glob.escape(prefix) + "*"):
        m = _OWNER.match(entry.name[len(prefix):])
        try:
            age = now - entry.lstat().st_mtime
        except FileNotFoundError:
            continue
        if m is not None and m.group(2) == _HOST:  # ours: stale exactly when its writer is gone
            stale = int(m.group(1)) != os.getpid() and not _alive(int(m.group(1)))
        else:  # another machine's (a shared folder): its pid means nothing here
            stale = age > STALE_AFTER_S
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def _tmp_sibling(final: Path, is_dir: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    prefix = f"{partial_prefix(final)}{os.getpid()}_{_HOST}-"
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix="".join(final.suffixes), dir=final.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists():
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(final: str | os.PathLike[str], is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``final``.

    On any exception the temporary file/folder is removed and ``final`` is left untouched, so a
    crash mid-write never leaves a partial output under the final name.
    """
    final = Path(final)
    tmp = _tmp_sibling(final, is_dir)
    try:
        yield tmp
        if is_dir:
            if final.exists():
                _remove(final)
            os.replace(tmp, final)
        else:
            os.replace(tmp, final)
            # mkstemp creates 0600 files; give outputs normal permissions.
            os.chmod(final, 0o644)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write output: {exc.strerror or exc}", final) from exc
        raise
