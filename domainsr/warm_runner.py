"""The managed server's warm runner: one-file commands in about a second, still as Prefect flows.

A fresh ``domainsr enhance`` spends most of its time importing (torch, Prefect, the flows: about
3.5 CPU-seconds of a 5.3 s one-file run on a running managed server). The managed server
(``domainsr server start``, or ``DOMAINSR_PREFECT_SERVER=keep``) therefore also starts this
process: it imports all of that once, then listens on a Unix socket in ``$PREFECT_HOME`` (owner
only, and it checks the peer's uid). A ``domainsr enhance`` or ``domainsr audit`` command that would
use the managed server sends its arguments, working folder, environment and its stdin, stdout and
stderr (the file descriptors themselves) to the runner, which forks a child to run the command:
the same CLI code, the same flows, recorded in the managed server, writing straight to the
caller's terminal. The caller waits for the child's exit code and exits with it; its SIGINT,
SIGTERM and SIGHUP are passed on to the child, and a caller that is gone (even SIGKILLed) gets
its child terminated.

The caller falls back to running the command itself (the runner is never required) when the
runner is not there or not ready, when ``DOMAINSR_WARM_RUNNER=0``, when the command would not use
the managed server (``PREFECT_API_URL`` configured, ``DOMAINSR_PREFECT_SERVER`` ephemeral or
prefect), or when the caller's environment sets any ``PREFECT_*`` setting other than
``PREFECT_HOME`` (the runner's Prefect settings were read when it started). The runner forks from
a single thread that has run no Prefect or torch work (no threads, no OpenMP pool).

Measured: benchmarks/onefile.py (README "Speed").

    python -m domainsr.warm_runner SOCKET KEEPER_PID     # started by the managed server's keeper
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from pathlib import Path

ENV = "DOMAINSR_WARM_RUNNER"
SOCKET_NAME = "domainsr-runner.sock"
COMMANDS = ("enhance", "audit")
#: What the runner imports before it listens (what a flow command imports anyway).
PRELOAD = ("torch", "prefect", "domainsr.cli", "domainsr.app", "domainsr.models.checkpoints", "domainsr.engine",
           "domainsr.io.raster", "flows.enhance", "flows.audit", "fastapi.encoders")
_HEADER = struct.Struct("!I")
_MAX_MESSAGE = 4 << 20
_PASSED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
ORPHAN_GRACE_S = 10.0  # a command whose caller is gone: SIGTERM, then SIGKILL after this


def socket_path(home: Path) -> Path:
    """The runner's socket for the Prefect home ``home`` (a short path in /tmp when the home's
    would pass the 107-byte limit of a Unix socket address)."""
    path = home / SOCKET_NAME
    if len(str(path).encode()) <= 100:
        return path
    digest = hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:16]
    return Path("/tmp") / f"domainsr-{os.getuid()}-{digest}.sock"


def disabled() -> bool:
    """``DOMAINSR_WARM_RUNNER`` turns the warm runner off (0, false, no, off)."""
    return os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off")


def ready(home: Path | None = None) -> bool:
    """Whether a warm runner answers on the socket of ``home`` (default: the current Prefect home)."""
    from domainsr.orchestration import prefect_home

    path = socket_path(home or prefect_home())
    if not path.exists():
        return False
    with contextlib.closing(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_ready(timeout: float = 60.0) -> bool:
    """Wait up to ``timeout`` s for the warm runner (it imports for a few seconds after the server answers)."""
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _usable(argv: list[str]) -> bool:
    from domainsr import orchestration as orch

    if not argv or argv[0] not in COMMANDS or disabled():
        return False
    if any(k.startswith("PREFECT_") and k != "PREFECT_HOME" for k in os.environ):
        return False
    try:
        if orch.server_mode() not in ("auto", "keep") or orch.configured_api_url() is not None:
            return False
    except Exception:  # noqa: BLE001 - a bad setting: the command itself reports it
        return False
    return socket_path(orch.prefect_home()).exists() and orch.running_server() is not None


def forward(argv: list[str]) -> int | None:
    """Run ``domainsr ARGV`` in the warm runner and return its exit code; None when the runner
    cannot take it (the caller then runs the command itself)."""
    if not _usable(argv):
        return None
    from domainsr.orchestration import prefect_home

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(2.0)
        sock.connect(str(socket_path(prefect_home())))
        body = json.dumps({"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}).encode()
        socket.send_fds(sock, [_HEADER.pack(len(body)) + body], [0, 1, 2])
        reader = sock.makefile("rb")
        started = json.loads(reader.readline() or b"null")
    except (OSError, ValueError):
        sock.close()
        return None
    if not isinstance(started, dict) or "pid" not in started:
        sock.close()
        return None
    return _wait(sock, reader, int(started["pid"]))


def _wait(sock: socket.socket, reader, child: int) -> int:
    """The child's exit code, passing this process's signals on to it meanwhile."""
    def pass_on(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(child, signum)

    previous = {s: signal.signal(s, pass_on) for s in _PASSED}
    try:
        sock.settimeout(None)
        line = reader.readline()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        sock.close()
    try:
        return int(json.loads(line)["rc"])
    except (ValueError, KeyError, TypeError):
        print("domainsr: the warm runner stopped before the command ended", file=sys.stderr)
        return 3


# --- the runner ------------------------------------------------------------------------------

def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _flags, _addr = socket.recv_fds(conn, 65536, 3)
    while len(data) < _HEADER.size or len(data) < _HEADER.size + _HEADER.unpack_from(data)[0]:
        if len(data) > _MAX_MESSAGE:
            raise ValueError("message too long")
        more = conn.recv(65536)
        if not more:
            raise ValueError("truncated message")
        data += more
    if len(fds) != 3:
        raise ValueError("expected stdin, stdout and stderr")
    return json.loads(data[_HEADER.size:_HEADER.size + _HEADER.unpack_from(data)[0]]), fds


def _run_child(request: dict, fds: list[int], api_url: str) -> None:
    """In the forked child: become the caller's command, then exit with its code."""
    atexit._clear()  # the runner's exit handlers are not the command's
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    for s in _PASSED:
        signal.signal(s, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    os.environ["PREFECT_API_URL"] = api_url
    code = 3
    try:
        os.chdir(request["cwd"])
        sys.argv = ["domainsr", *request["argv"]]
        from domainsr import cli

        cli.reset_consoles()
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except BaseException as exc:  # noqa: BLE001 - the child must always exit with a code
        print(f"domainsr: {type(exc).__name__}: {exc}", file=sys.stderr)
    finally:
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(code)


def serve(path: Path, keeper: int) -> None:
    """Import :data:`PRELOAD`, listen on ``path`` and run each request in a forked child, until
    the keeper process ``keeper`` is gone or SIGTERM."""
    from importlib import import_module

    from domainsr.malloc import tune_malloc

    tune_malloc()  # forked children inherit it
    for name in PRELOAD:
        import_module(name)
    api_url = os.environ["PREFECT_API_URL"]
    path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    inode = os.stat(path).st_ino  # removed at exit only if still ours (not a newer runner's)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # the group's SIGTERM: clean up below
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ, "accept")
    children: dict[int, tuple[socket.socket, int]] = {}  # pidfd -> (conn, pid)
    orphans: dict[int, float] = {}  # pid of a child whose caller is gone -> when to SIGKILL it
    try:
        while os.getppid() == keeper:
            for key, _ in selector.select(timeout=1.0):
                if key.data == "accept":
                    _accept(listener, selector, children, api_url)
                elif key.data[0] == "client":  # the caller hung up before its child ended
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(key.data[1], signal.SIGTERM)
                    orphans[key.data[1]] = time.monotonic() + ORPHAN_GRACE_S
                    selector.unregister(key.fileobj)
                else:
                    orphans.pop(_reap(key.data[1], selector, children), None)
            for pid, deadline in list(orphans.items()):
                if time.monotonic() > deadline:  # Prefect handles SIGTERM in a flow: it may not stop
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                    orphans.pop(pid)
    finally:
        with contextlib.suppress(OSError):
            if os.stat(path).st_ino == inode:
                path.unlink()
        for _conn, pid in children.values():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def _accept(listener: socket.socket, selector: selectors.BaseSelector,
            children: dict[int, tuple[socket.socket, int]], api_url: str) -> None:
    conn, _ = listener.accept()
    try:
        conn.settimeout(5.0)
        uid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
        if uid != os.getuid():
            raise PermissionError("peer is another user")
        request, fds = _receive(conn)
    except (OSError, ValueError):
        conn.close()
        return
    pid = os.fork()
    if pid == 0:
        selector.close()
        listener.close()
        conn.close()
        _run_child(request, fds, api_url)
    for fd in fds:
        os.close(fd)
    pidfd = os.pidfd_open(pid)
    children[pidfd] = (conn, pid)
    try:
        conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        selector.register(conn, selectors.EVENT_READ, ("client", pid))
    except OSError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    selector.register(pidfd, selectors.EVENT_READ, ("child", pidfd))


def _reap(pidfd: int, selector: selectors.BaseSelector, children: dict[int, tuple[socket.socket, int]]) -> int:
    """Reap the child of ``pidfd``, send its caller the exit code; returns its pid."""
    conn, pid = children.pop(pidfd)
    _, status = os.waitpid(pid, 0)
    selector.unregister(pidfd)
    os.close(pidfd)
    with contextlib.suppress(KeyError, ValueError):
        selector.unregister(conn)
    with contextlib.suppress(OSError):
        code = os.waitstatus_to_exitcode(status)
        conn.sendall(json.dumps({"rc": code if code >= 0 else 128 - code}).encode() + b"\n")
    conn.close()
    return pid


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m domainsr.warm_runner SOCKET KEEPER_PID")
    serve(Path(sys.argv[1]), int(sys.argv[2]))
