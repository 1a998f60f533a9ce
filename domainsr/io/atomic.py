"""Atomic output: write to a temporary sibling, rename into place only when complete."""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from domainsr.errors import OutputError


def _tmp_sibling(final: Path, is_dir: bool) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{final.name}.partial-"
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
