"""Which Prefect API the flow of a ``domainsr`` command uses, decided before Prefect is imported.

:func:`use_api` is called once by the CLI when it knows a flow will run (after its usage checks).
``DOMAINSR_PREFECT_SERVER`` picks the order (default ``auto``):

``auto``
  (a) ``PREFECT_API_URL`` configured (environment, ``.env``, ``prefect.toml``, ``pyproject.toml``
  ``[tool.prefect]`` or the active profile): used as is. (b) a DomainSR-managed local server is
  running (``$PREFECT_HOME/domainsr-server.json`` names its pid, port and url; the pid is alive and
  ``<url>/health`` answers within 0.5 s): ``PREFECT_API_URL`` is set to it for this process; a
  state file whose pid is dead or whose server does not answer is removed. (c) else an ephemeral
  API of our own: its server process is spawned at once, so that its start (importing
  ``prefect.server``, migrating the SQLite database) overlaps the command's own imports (Prefect,
  the flows, torch); on 127.0.0.1 on a free port, with telemetry, automations, the event logger
  and the event/log websocket streams off (the one-shot run records flow runs, task runs, logs
  and artifacts as before), stopped by its pid at exit (atexit; and it exits by itself when the
  command's process is gone, even after SIGKILL).
``ephemeral``
  (a), then (c): never a managed server.
``keep``
  (a), (b), else start the managed server (detached, ``prefect server start``), so the next
  command reuses it; it stops itself after ``DOMAINSR_PREFECT_SERVER_IDLE_S`` seconds (default
  900) with no flow run started, running or ended (its keeper process reads the API;
  :mod:`domainsr.prefect_server`).
``prefect``
  leave it all to Prefect: with no URL, its own ``SubprocessASGIServer`` (the behaviour before
  this module; the benchmark's "stock" row).

Measured (benchmarks/results/onefile.md: one-file cubic x2 enhance, end to end, 2 cores lightly
loaded): Prefect's own ephemeral start 12.4 s, ours 7.8 s, a running managed server 5.8 s
(loaded: 20.3, 16.1, 9.1 s). Prefect's imports ``prefect.server`` in the command's process too
(~2-4 s) before its subprocess imports it again, so (c) is our early spawn.

With a managed server running, ``enhance`` and ``audit`` go one step further: its warm runner
(:mod:`domainsr.warm_runner`, already imported) forks to run them, about 1.2 s end to end.

The choice is made only in a process that has not imported Prefect yet (a fresh ``domainsr``
command); a process that already has (tests, notebooks, Typer's CliRunner) keeps its settings. ``domainsr server
start|stop|status`` manage the server of (b) by hand.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from domainsr.errors import ConfigError, DomainSRError
from domainsr.io.atomic import pid_exists

MODE_ENV, IDLE_ENV = "DOMAINSR_PREFECT_SERVER", "DOMAINSR_PREFECT_SERVER_IDLE_S"
MODES = ("auto", "ephemeral", "keep", "prefect")
STATE_NAME, LOG_NAME = "domainsr-server.json", "domainsr-server.log"
HOST = "127.0.0.1"
DEFAULT_IDLE_S = 900.0
#: Server settings of ours. The task-run recorder writes in batches (flushed every 5 s and at
#: shutdown): one write per event held SQLite's lock ~2 s while the subflow's run was created.
#: The environment wins over these.
SERVER_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false",
              "PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_BATCH_SIZE": "100"}
#: ... and of our ephemeral API: what a one-shot run does not need is off.
EPHEMERAL_ENV = {
    "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
    "PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED": "false",  # automations (triggers and actions)
    "PREFECT_SERVER_SERVICES_EVENT_LOGGER_ENABLED": "false",
    "PREFECT_SERVER_EVENTS_STREAM_OUT_ENABLED": "false",
    "PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED": "false",
}


@dataclass(frozen=True)
class ServerState:
    """A managed server, as its state file records it."""

    pid: int
    port: int
    url: str  # the API URL, http://127.0.0.1:PORT/api
    started: float
    idle_s: float = 0.0  # 0: runs until `domainsr server stop`


@dataclass
class Api:
    """The API a command's flow uses: ``source`` is configured, managed, ephemeral or prefect."""

    source: str
    url: str | None
    process: subprocess.Popen[bytes] | None = None

    def wait(self, preload: Iterable[str] = (), timeout: float = 180.0) -> None:
        """Block until an ephemeral server answers; meanwhile import ``preload`` (modules the flow
        needs anyway). Raises DomainSRError if it exits or does not answer within ``timeout``."""
        if self.process is None or self.url is None:
            return
        pending = list(preload)
        deadline = time.monotonic() + timeout
        while not healthy(self.url, 0.25):
            if self.process.poll() is not None:
                raise DomainSRError(f"the ephemeral Prefect server exited with code {self.process.returncode} "
                                    "before it answered (set DOMAINSR_PREFECT_SERVER=prefect to use Prefect's own)")
            if time.monotonic() > deadline:
                self.stop()
                raise DomainSRError(f"the ephemeral Prefect server did not answer within {timeout:.0f} s")
            if pending:
                __import__(pending.pop(0))
            else:
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop an ephemeral server (by its pid; SIGKILL after 10 s)."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def server_mode() -> str:
    """``DOMAINSR_PREFECT_SERVER``, checked."""
    mode = os.environ.get(MODE_ENV, "").strip().lower() or "auto"
    if mode not in MODES:
        raise ConfigError(f"{MODE_ENV}={mode!r} is not one of {', '.join(MODES)}")
    return mode


def idle_seconds() -> float:
    """``DOMAINSR_PREFECT_SERVER_IDLE_S`` (default 900), checked."""
    raw = os.environ.get(IDLE_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_IDLE_S
    except ValueError:
        raise ConfigError(f"{IDLE_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ConfigError(f"{IDLE_ENV} must be >= 0 (0: never stop), got {raw}")
    return value


def prefect_home() -> Path:
    """Prefect's home folder: the current settings' if Prefect is imported, else ``$PREFECT_HOME``
    or ``~/.prefect``."""
    if "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return Path(get_current_settings().home).expanduser()
    return Path(os.environ.get("PREFECT_HOME") or "~/.prefect").expanduser()


def state_path() -> Path:
    return prefect_home() / STATE_NAME


def _toml(path: Path) -> dict:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: Prefect's own dependency
        import toml as tomllib  # type: ignore[no-redef]
    try:
        return tomllib.loads(text)
    except Exception:  # noqa: BLE001 - an unreadable file configures nothing
        return {}


def configured_api_url(settings: bool = True) -> str | None:
    """``PREFECT_API_URL`` as Prefect would find it, without importing Prefect: the environment,
    (with ``settings``, Prefect's current settings if it is imported), ``./.env``,
    ``./prefect.toml``, ``./pyproject.toml`` ``[tool.prefect]``, the active profile."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    if settings and "prefect.settings" in sys.modules:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path(".env").read_text(encoding="utf-8").splitlines():
            key, sep, value = line.removeprefix("export ").partition("=")
            if sep and key.strip() == "PREFECT_API_URL" and value.strip().strip("'\""):
                return value.strip().strip("'\"")
    for table in (_toml(Path("prefect.toml")), _toml(Path("pyproject.toml")).get("tool", {}).get("prefect", {})):
        if url := table.get("api", {}).get("url"):
            return str(url)
    profiles = _toml(Path(os.environ.get("PREFECT_PROFILES_PATH") or prefect_home() / "profiles.toml"))
    active = os.environ.get("PREFECT_PROFILE") or profiles.get("active") or "ephemeral"
    return profiles.get("profiles", {}).get(active, {}).get("PREFECT_API_URL") or None


def healthy(api_url: str, timeout: float = 0.5) -> bool:
    """Whether ``<api_url>/health`` answers 200 within ``timeout`` seconds."""
    try:
        with urllib.request.urlopen(f"{api_url.rstrip('/')}/health", timeout=timeout) as response:
            return response.status == 200
    except (OSError, ValueError):
        return False


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (:func:`~domainsr.io.atomic.pid_exists`) and is no zombie."""
    if not pid_exists(pid):
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_prefect_process(pid: int) -> bool:
    """Whether ``pid`` runs Prefect (Linux ``/proc``; elsewhere: assumed when alive)."""
    try:
        return b"prefect" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return pid_alive(pid) and not Path("/proc/self").exists()
    except OSError:
        return False


def read_state(path: Path | None = None) -> ServerState | None:
    """The state file's server, or None (no file, or not ours: an unreadable one is removed)."""
    path = path or state_path()
    try:
        return ServerState(**json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None


def write_state(state: ServerState, path: Path | None = None) -> Path:
    """Write the state file atomically (a temporary file, then a rename)."""
    path = path or state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(asdict(state)), encoding="utf-8")
    os.replace(tmp, path)
    return path


def running_server(path: Path | None = None) -> ServerState | None:
    """The managed server if it is running and answers; a stale state file is removed (its pid is
    dead, or alive but no Prefect process and not answering). A live Prefect pid that does not
    answer keeps its file, so ``domainsr server stop`` can still stop it."""
    path = path or state_path()
    state = read_state(path)
    if state is None:
        return None
    if pid_alive(state.pid) and healthy(state.url):
        return state
    if not (pid_alive(state.pid) and _is_prefect_process(state.pid)):
        path.unlink(missing_ok=True)
    return None


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _port_free(port: int) -> bool:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
        return True


def _server_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {**SERVER_ENV, **os.environ, **(extra or {})}
    env.pop("PREFECT_API_URL", None)
    return env


def start_server(port: int | None = None, idle_s: float = 0.0, timeout: float = 90.0) -> ServerState:
    """Start the managed server (``prefect server start`` on 127.0.0.1 under a small keeper
    process, detached, its own process group, log in ``$PREFECT_HOME/domainsr-server.log``), wait
    for /health, write the state file. With ``idle_s`` > 0 the keeper stops it after that long
    without flow runs."""
    if (state := running_server()) is not None:
        return state
    if port is not None and not _port_free(port):
        raise DomainSRError(f"port {port} on {HOST} is in use: choose another --port, or none for a free one")
    port = port or free_port()
    home = prefect_home()
    home.mkdir(parents=True, exist_ok=True)
    path = home / STATE_NAME
    with open(home / LOG_NAME, "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "domainsr.prefect_server", "managed", str(port), str(idle_s),
                                 str(path)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=_server_env({"PREFECT_HOME": str(home)}), start_new_session=True)
    state = ServerState(pid=proc.pid, port=port, url=f"http://{HOST}:{port}/api", started=time.time(),
                        idle_s=idle_s)
    deadline = time.monotonic() + timeout
    while not healthy(state.url, 0.5):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_group(proc.pid)
            tail = (home / LOG_NAME).read_text(encoding="utf-8", errors="replace")[-600:].strip()
            why = f"exited with code {proc.returncode}" if proc.returncode is not None else \
                f"did not answer within {timeout:.0f} s"
            raise DomainSRError(f"the Prefect server on port {port} {why}: {tail or 'no output'}")
        time.sleep(0.2)
    write_state(state, path)
    return state


def _kill_group(pgid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group ``pgid``, SIGKILL what is left after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pgid, os.WNOHANG)  # reap it when it is our child
        if not pid_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stop_server(path: Path | None = None) -> ServerState | None:
    """Stop the managed server (its process group) and remove the state file; None if none was
    recorded. A recorded pid that is no Prefect process (reused) is not signalled."""
    path = path or state_path()
    state = read_state(path)
    if state is None:
        return None
    path.unlink(missing_ok=True)
    if pid_alive(state.pid) and _is_prefect_process(state.pid):
        _kill_group(state.pid)
    return state


def spawn_ephemeral() -> Api:
    """Spawn our ephemeral API server (returns at once; :meth:`Api.wait` waits for it)."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "domainsr.prefect_server", "ephemeral", str(port), str(os.getpid())],
                            stdin=subprocess.DEVNULL, env=_server_env(EPHEMERAL_ENV))
    api = Api("ephemeral", f"http://{HOST}:{port}/api", proc)
    atexit.register(api.stop)
    return api


def use_api() -> Api:
    """Choose the API of this process's flows (see the module docstring) and set
    ``PREFECT_API_URL`` for (b) and (c). Call before Prefect is imported (after: a no-op)."""
    mode = server_mode()
    if "prefect" in sys.modules:
        return Api("prefect", None)
    return choose_api(mode)


def choose_api(mode: str) -> Api:
    """:func:`use_api`'s choice for ``mode`` (one of :data:`MODES`)."""
    if mode == "prefect":
        return Api("prefect", None)
    if url := configured_api_url():
        return Api("configured", url)
    state = None if mode == "ephemeral" else running_server()
    if state is None and mode == "keep":
        state = start_server(idle_s=idle_seconds())
    api = Api("managed", state.url) if state is not None else spawn_ephemeral()
    os.environ["PREFECT_API_URL"] = str(api.url)
    return api
