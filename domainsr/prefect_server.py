"""The server processes of :mod:`domainsr.orchestration`, run as ``python -m domainsr.prefect_server``:

``ephemeral PORT PARENT_PID``
  Prefect's API app under uvicorn on 127.0.0.1 (the settings come from the environment the
  orchestration gives it); it stops when its parent, the command, is gone, even after SIGKILL.
``managed PORT IDLE_S STATE_FILE``
  the keeper of the managed server: ``prefect server start`` in the keeper's process group
  (``domainsr server stop`` signals the group); with ``IDLE_S`` > 0 it stops the group after that
  long without a flow run started, running or ended (read from the API), and removes the state file.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from domainsr.orchestration import HOST, healthy, pid_alive, read_state


def _serve_ephemeral(port: int, parent: int) -> None:
    """Prefect's API app under uvicorn; exits when the ``parent`` process is gone."""
    def follow_parent() -> None:
        while pid_alive(parent) and os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
        os._exit(1)

    threading.Thread(target=follow_parent, daemon=True).start()
    import uvicorn

    uvicorn.run("prefect.server.api.server:create_app", factory=True, host=HOST, port=port, log_level="error",
                lifespan="on")


def last_activity(api_url: str, timeout: float = 5.0) -> float | None:
    """When a flow run last started or ended (epoch seconds); ``inf`` while one is pending or
    running; None if the API did not answer."""
    from datetime import datetime

    body = json.dumps({"limit": 5, "sort": "EXPECTED_START_TIME_DESC"}).encode()
    request = urllib.request.Request(f"{api_url}/flow_runs/filter", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            runs = json.loads(response.read())
    except (OSError, ValueError):
        return None
    latest = 0.0
    for run in runs:
        if (run.get("state_type") or "") in ("RUNNING", "PENDING", "CANCELLING"):
            return float("inf")
        for key in ("expected_start_time", "start_time", "end_time"):
            if run.get(key):
                latest = max(latest, datetime.fromisoformat(run[key].replace("Z", "+00:00")).timestamp())
    return latest


def _keep(port: int, idle_s: float, path: Path) -> None:
    """The keeper of a managed server: runs ``prefect server start`` in its own process group and,
    with ``idle_s`` > 0, stops the group after ``idle_s`` without flow runs (or 10 unanswered checks)."""
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST, "--port",
                               str(port)], stdin=subprocess.DEVNULL)
    url, started, misses = f"http://{HOST}:{port}/api", time.time(), 0
    runner = _start_runner(server, url)
    while server.poll() is None:
        try:
            server.wait(max(1.0, min(30.0, idle_s / 10)) if idle_s > 0 else None)
        except subprocess.TimeoutExpired:
            pass
        if server.poll() is not None or not healthy(url, 5.0) and time.time() - started < 120:
            continue
        last = last_activity(url)
        misses = misses + 1 if last is None else 0
        if time.time() - max(started, last or 0.0) >= idle_s or misses >= 10:
            break
    state = read_state(path)
    if state is not None and state.pid == os.getpid():
        path.unlink(missing_ok=True)
    if server.poll() is None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # outlive the SIGTERM sent to the group
        os.killpg(0, signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
    if runner is not None and runner.poll() is None:
        runner.kill()


def _start_runner(server: subprocess.Popen[bytes], url: str, timeout: float = 120.0) -> subprocess.Popen[bytes] | None:
    """Once the server answers: the warm runner (:mod:`domainsr.warm_runner`) in this process
    group, unless ``DOMAINSR_WARM_RUNNER=0``."""
    from domainsr.orchestration import prefect_home
    from domainsr.warm_runner import disabled, socket_path

    if disabled():
        return None
    deadline = time.monotonic() + timeout
    while not healthy(url, 1.0):
        if server.poll() is not None or time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    return subprocess.Popen([sys.executable, "-m", "domainsr.warm_runner", str(socket_path(prefect_home())),
                             str(os.getpid())], stdin=subprocess.DEVNULL, env={**os.environ, "PREFECT_API_URL": url})


if __name__ == "__main__":
    if sys.argv[1:2] == ["ephemeral"]:
        _serve_ephemeral(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1:2] == ["managed"]:
        _keep(int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4]))
    else:
        sys.exit("usage: python -m domainsr.prefect_server ephemeral PORT PARENT_PID | managed PORT IDLE_S STATE")
