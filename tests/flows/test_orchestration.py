"""Which Prefect API a command's flow uses (domainsr.orchestration): the state file of the managed
server, a configured PREFECT_API_URL, the setting; and, marked slow, the real managed server
recording a one-file enhance run from the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from domainsr import orchestration as orch
from domainsr.cli import app
from domainsr.errors import ConfigError, DomainSRError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """An empty PREFECT_HOME (env and, if Prefect is imported, its settings) and working folder."""
    home = tmp_path / "prefect-home"
    home.mkdir()
    monkeypatch.setenv("PREFECT_HOME", str(home))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    monkeypatch.delenv("PREFECT_PROFILE", raising=False)
    monkeypatch.delenv("PREFECT_PROFILES_PATH", raising=False)
    monkeypatch.delenv(orch.MODE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(orch, "prefect_home", lambda: home)
    return home


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(30)
    return proc.pid


def _state(pid: int, port: int) -> orch.ServerState:
    return orch.ServerState(pid=pid, port=port, url=f"http://127.0.0.1:{port}/api", started=time.time())


def test_state_file_round_trip_is_atomic(home):
    path = orch.write_state(_state(123, 4567))
    assert path == home / orch.STATE_NAME
    assert orch.read_state() == _state(123, 4567).__class__(**json.loads(path.read_text()))
    assert [p.name for p in home.iterdir()] == [orch.STATE_NAME]  # no temporary file left


def test_unreadable_state_file_is_removed(home):
    (home / orch.STATE_NAME).write_text("{not json")
    assert orch.read_state() is None
    assert not (home / orch.STATE_NAME).exists()


def test_stale_pid_is_ignored_and_removed(home):
    orch.write_state(_state(_dead_pid(), orch.free_port()))
    assert orch.running_server() is None
    assert not (home / orch.STATE_NAME).exists()


def test_live_pid_that_is_no_server_is_ignored_and_removed_not_killed(home):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        orch.write_state(_state(other.pid, orch.free_port()))  # nothing listens on that port
        started = time.monotonic()
        assert orch.running_server() is None
        assert time.monotonic() - started < 5
        assert not (home / orch.STATE_NAME).exists()
        orch.write_state(_state(other.pid, orch.free_port()))
        assert orch.stop_server() is not None  # forgets it, but does not signal a stranger
        assert other.poll() is None and not (home / orch.STATE_NAME).exists()
    finally:
        other.kill()
        other.wait(10)


def test_configured_url_is_used_and_left_untouched(home, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://prefect.example:4200/api")
    orch.write_state(_state(_dead_pid(), orch.free_port()))  # not even looked at
    api = orch.choose_api("auto")
    assert (api.source, api.url, api.process) == ("configured", "http://prefect.example:4200/api", None)
    assert os.environ["PREFECT_API_URL"] == "http://prefect.example:4200/api"
    assert (home / orch.STATE_NAME).exists()


def test_url_from_profile_and_project_files(home, monkeypatch):
    assert orch.configured_api_url(settings=False) is None
    (home / "profiles.toml").write_text('active = "work"\n[profiles.work]\nPREFECT_API_URL = "http://a:1/api"\n')
    assert orch.configured_api_url(settings=False) == "http://a:1/api"
    Path("prefect.toml").write_text('[api]\nurl = "http://b:2/api"\n')
    assert orch.configured_api_url(settings=False) == "http://b:2/api"
    Path(".env").write_text("export PREFECT_API_URL='http://c:3/api'\n")
    assert orch.configured_api_url(settings=False) == "http://c:3/api"


def test_prefect_mode_changes_nothing(home):
    assert orch.choose_api("prefect") == orch.Api("prefect", None)
    assert "PREFECT_API_URL" not in os.environ


def test_bad_settings_name_the_problem(monkeypatch):
    monkeypatch.setenv(orch.MODE_ENV, "sometimes")
    with pytest.raises(ConfigError, match="DOMAINSR_PREFECT_SERVER='sometimes'.*auto, ephemeral, keep"):
        orch.server_mode()
    monkeypatch.setenv(orch.IDLE_ENV, "soon")
    with pytest.raises(ConfigError, match="DOMAINSR_PREFECT_SERVER_IDLE_S='soon'"):
        orch.idle_seconds()


def test_health_check_is_fast_when_nothing_listens():
    started = time.monotonic()
    assert not orch.healthy(f"http://127.0.0.1:{orch.free_port()}/api", timeout=0.5)
    assert time.monotonic() - started < 2


def test_a_port_in_use_is_refused_before_anything_starts(home):
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(DomainSRError, match=f"port {port} on 127.0.0.1 is in use"):
            orch.start_server(port)
    assert not (home / orch.STATE_NAME).exists()


def test_cli_server_status_and_stop_without_a_server(home):
    orch.write_state(_state(_dead_pid(), orch.free_port()))
    runner = CliRunner()
    result = runner.invoke(app, ["server", "status", "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout) == {"status": "not running"}
    assert not (home / orch.STATE_NAME).exists()
    result = runner.invoke(app, ["server", "stop"])
    assert result.exit_code == 0 and "not running" in result.stdout


def test_cli_bad_mode_is_a_usage_error(home, monkeypatch, tmp_path):
    monkeypatch.setenv(orch.MODE_ENV, "sometimes")
    tif = tmp_path / "x.tif"
    tif.write_bytes(b"")
    result = CliRunner().invoke(app, ["enhance", str(tif), "--model", "cubic", "--scale", "2", "--out",
                                      str(tmp_path / "o"), "--no-audit"])
    assert result.exit_code == 2
    assert "DOMAINSR_PREFECT_SERVER" in result.output


# ---------------------------------------------------------------------------------------------
# the real managed server


def _cli(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "domainsr.cli", *args], env=env, cwd=ROOT, capture_output=True,
                          check=False,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_managed_server_records_a_one_file_enhance(sample_data, tmp_path):
    from flow_inputs import crop

    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    s2 = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    tif = write_raster(crop(s2, (900, 900), (64, 64)), tmp_path / "tiny.tif")
    home = tmp_path / "prefect-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DOMAINSR_PREFECT"))}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    port = orch.free_port()
    started = _cli(["server", "start", "--port", str(port), "--json"], env, timeout=180)
    assert started.returncode == 0, started.stderr
    state = json.loads(started.stdout)
    assert state["status"] == "started" and state["url"] == f"http://127.0.0.1:{port}/api"
    try:
        assert json.loads(_cli(["server", "status", "--json"], env, 60).stdout)["status"] == "running"
        run = _cli(["enhance", str(tif), "--model", "cubic", "--scale", "2", "--out", str(tmp_path / "out"),
                    "--no-audit", "--no-progress"], env, timeout=300)
        assert run.returncode == 0, run.stderr
        assert (tmp_path / "out" / "tiny_sr.tif").exists()
        from prefect.client.orchestration import get_client
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: state["url"]}), get_client(sync_client=True) as client:
            runs = client.read_flow_runs()
        outer = [r for r in runs if r.parent_task_run_id is None]
        assert len(outer) == 1 and outer[0].state.is_completed(), [(r.name, r.state) for r in runs]
        assert "1 enhanced" in outer[0].state.message
    finally:
        stopped = _cli(["server", "stop", "--json"], env, timeout=60)
    assert stopped.returncode == 0 and json.loads(stopped.stdout)["status"] == "stopped"
    assert not orch.pid_alive(state["pid"])
    assert not (home / orch.STATE_NAME).exists()
