"""The managed server's warm runner (domainsr.warm_runner): when a command is forwarded and when it
is not; and, marked slow, the real runner of a managed server: a forwarded one-file enhance (no
torch imported by the caller, the flow run recorded), an error's exit code, a Ctrl-C passed on,
a SIGKILLed caller's command stopped, and nothing left after ``domainsr server stop``."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from domainsr import orchestration as orch
from domainsr import warm_runner as warm

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def clean_env(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "h"
    home.mkdir()
    for key in list(os.environ):
        if key.startswith(("PREFECT_", "DOMAINSR_PREFECT", "DOMAINSR_WARM")):
            monkeypatch.delenv(key)
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.setattr(orch, "prefect_home", lambda: home)
    monkeypatch.chdir(tmp_path)
    return home


def test_socket_path_stays_short(tmp_path):
    assert warm.socket_path(tmp_path) == tmp_path / warm.SOCKET_NAME or len(str(tmp_path)) > 80
    deep = tmp_path / ("x" * 120)
    path = warm.socket_path(deep)
    assert len(str(path).encode()) <= 100 and path.parent == Path("/tmp")
    assert path == warm.socket_path(deep)  # the same home, the same socket


def test_nothing_is_forwarded_without_a_runner_or_when_it_cannot_serve(clean_env, monkeypatch):
    monkeypatch.setattr(orch, "running_server", lambda: orch.ServerState(pid=1, port=1, url="u", started=0.0))
    warm.socket_path(clean_env).touch()  # a socket file, nobody listening: connect fails
    assert warm.forward(["enhance", "x.tif", "--model", "cubic"]) is None
    assert warm._usable(["enhance"]) and warm._usable(["audit", "x"])
    assert not warm._usable(["info", "x.tif"]) and not warm._usable([])
    monkeypatch.setenv(warm.ENV, "0")
    assert not warm._usable(["enhance"])
    monkeypatch.delenv(warm.ENV)
    for key, value in (("PREFECT_API_URL", "http://127.0.0.1:1/api"), ("PREFECT_LOGGING_LEVEL", "DEBUG"),
                       (orch.MODE_ENV, "ephemeral"), (orch.MODE_ENV, "prefect"), (orch.MODE_ENV, "bogus")):
        monkeypatch.setenv(key, value)
        assert not warm._usable(["enhance"]), key
        monkeypatch.delenv(key)
    monkeypatch.setattr(orch, "running_server", lambda: None)
    assert not warm._usable(["enhance"])


def _cli(args: list[str], env: dict[str, str], timeout: float = 300, flags: tuple[str, ...] = ()
         ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *flags, "-m", "domainsr.cli", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _runner(keeper: int) -> psutil.Process:
    found = [p for p in psutil.Process(keeper).children() if "domainsr.warm_runner" in " ".join(p.cmdline())]
    assert len(found) == 1, [p.cmdline() for p in psutil.Process(keeper).children()]
    return found[0]


def _wait_gone(procs: list[psutil.Process], timeout: float = 20.0) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


@pytest.mark.slow
def test_warm_runner_runs_commands_for_its_callers(sample_data, tmp_path):
    from flow_inputs import crop

    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    s2 = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    tif = write_raster(crop(s2, (900, 900), (64, 64)), tmp_path / "tiny.tif")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINSR_PREFECT", "DOMAINSR_WARM"))}
    env.update(PREFECT_HOME=str(home))
    started = _cli(["server", "start", "--json"], env, timeout=180)
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    assert state["warm_runner"] is True, state
    runner = _runner(state["pid"])
    try:
        out = tmp_path / "out"
        run = _cli(["enhance", str(tif), "--model", "cubic", "--scale", "2", "--out", str(out), "--no-progress"],
                   env, flags=("-X", "importtime"))
        assert run.returncode == 0, run.stderr[-2000:]
        assert (out / "tiny_sr.tif").exists() and (out / "tiny_sr.audit.json").exists()
        assert "1 enhanced" in run.stdout  # the child wrote to the caller's stdout
        imported = {line.rsplit("|", 1)[-1].strip() for line in run.stderr.splitlines() if line.startswith("import time")}
        assert "domainsr.warm_runner" in imported and "torch" not in imported and "prefect" not in imported
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: state["url"]}), get_client(sync_client=True) as client:
            outer = [r for r in client.read_flow_runs() if r.parent_task_run_id is None]
        assert len(outer) == 1 and outer[0].state.is_completed() and "1 enhanced" in outer[0].state.message

        bad = _cli(["enhance", str(tmp_path / "missing.tif"), "--model", "cubic", "--scale", "2", "--out",
                    str(out)], env, flags=("-X", "importtime"))
        assert bad.returncode == 2 and "missing.tif" in bad.stderr and "import time: " in bad.stderr

        volume = str(sample_data["mni152"])
        for sig, expected in ((signal.SIGINT, 130), (signal.SIGKILL, None)):
            proc = subprocess.Popen([sys.executable, "-m", "domainsr.cli", "enhance", volume, "--model", "mri-t1-x2",
                                     "--out", str(tmp_path / f"mri-{sig}"), "--no-progress"], env=env, cwd=ROOT,
                                    stdout=subprocess.DEVNULL, text=True,
                                    stderr=subprocess.PIPE if expected else subprocess.DEVNULL)
            deadline = time.monotonic() + 60
            while not runner.children() and time.monotonic() < deadline:
                time.sleep(0.1)
            children = runner.children()
            assert children, "the command did not reach the runner"
            while sum(children[0].cpu_times()[:2]) < 4 and time.monotonic() < deadline:
                time.sleep(0.2)  # enhancing now (a Ctrl-C while Prefect starts a run may go unseen)
            proc.send_signal(sig)
            try:
                _, err = proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:  # a first Ctrl-C can go unseen, as without the runner
                proc.send_signal(sig)
                _, err = proc.communicate(timeout=60)
            if expected is not None:
                assert proc.returncode == expected, err[-1500:]
            # a SIGKILLed caller: its command gets SIGTERM, then SIGKILL after ORPHAN_GRACE_S
            assert not _wait_gone(children, warm.ORPHAN_GRACE_S + 20), "the command outlived its caller"
    finally:
        stopped = _cli(["server", "stop", "--json"], env, timeout=60)
    assert stopped.returncode == 0
    assert not _wait_gone([runner]) and not orch.pid_alive(state["pid"])
    assert not warm.socket_path(home).exists()
