"""Atomic output: write to a temporary sibling, rename into place only when complete.

A process killed mid-write (SIGKILL, power loss) leaves only a hidden ``.<name>.partial-<pid>_<host>-*``
sibling, never a file under the final name; the next write of the same output removes such debris
once its writer is gone. Before the rename the file (or every file and folder of a folder output)
is fsynced, after it the parent folder, so a completed output survives a power loss too.

Outputs get the permissions a plainly created file or folder would get under the process umask
(``0666 & ~umask``, ``0777 & ~umask``), not the private 0600/0700 of ``tempfile``'s temporaries.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import os
import re
import shutil
import socket
import tempfile
import threading
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
_UMASK_LOCK = threading.Lock()
# fsync errors that only say "this file system cannot do that" (some network and FUSE mounts)
_NO_FSYNC = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EROFS}


def partial_prefix(final: Path) -> str:
    """Name prefix of ``final``'s temporary siblings (hidden; they record the writer's pid and host)."""
    return f".{final.name}.partial-"


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:  # no /proc: set and restore at once (briefly visible to other threads)
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def output_mode(is_dir: bool) -> int:
    """Permissions of a new output under the current umask."""
    return (0o777 if is_dir else 0o666) & ~current_umask()


def pid_exists(pid: int) -> bool:
    """Whether a process ``pid`` exists (a zombie too), by signal 0."""
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
            stale = int(m.group(1)) != os.getpid() and not pid_exists(int(m.group(1)))
        else:  # another machine's (a shared folder): its pid means nothing here
            stale = age > STALE_AFTER_S
        if stale:
            _remove(entry)
            removed.append(entry)
    return removed


def _own_prefix(final: Path) -> str:
    return f"{partial_prefix(final)}{os.getpid()}_{_HOST}-"


def _tmp_sibling(final: Path, is_dir: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(final)
    prefix = _own_prefix(final)
    if is_dir:
        return Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    fd, name = tempfile.mkstemp(prefix=prefix, suffix="".join(final.suffixes), dir=final.parent)
    os.close(fd)
    return Path(name)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def fsync_path(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to stable storage."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _NO_FSYNC:
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file and folder under ``root`` (deepest first), then ``root``."""
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            p = Path(folder, name)
            if p.is_file() and not p.is_symlink():
                fsync_path(p)
        fsync_path(Path(folder))


def _commit_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` onto ``final``; an existing ``final`` is moved aside first and removed after,
    so the final name is missing only between two renames."""
    old = None
    if final.exists() or final.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=_own_prefix(final) + "old-", dir=final.parent))
        os.replace(final, old / final.name)
    try:
        os.replace(tmp, final)
    except OSError:
        if old is not None:  # put the previous output back
            os.replace(old / final.name, final)
            _remove(old)
        raise
    if old is not None:
        _remove(old)


@contextmanager
def atomic_path(final: str | os.PathLike[str], is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to ``final``.

    On any exception the temporary file/folder is removed and ``final`` is left untouched, so a
    crash mid-write never leaves a partial output under the final name. On success the output gets
    the umask's permissions (:func:`output_mode`) and is fsynced, then the rename is (its folder).
    """
    final = Path(final)
    tmp = _tmp_sibling(final, is_dir)
    try:
        yield tmp
        os.chmod(tmp, output_mode(is_dir))  # tempfile made it 0600 / 0700
        if is_dir:
            _fsync_tree(tmp)
            _commit_dir(tmp, final)
        else:
            fsync_path(tmp)
            os.replace(tmp, final)
        fsync_path(final.parent)
    except BaseException as exc:
        _remove(tmp)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write output: {exc.strerror or exc}", final) from exc
        raise
