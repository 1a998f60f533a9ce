"""Deployments from prefect.yaml: cron schedules parsed and listed, and created against a real
Prefect server (``prefect server start`` on 127.0.0.1, started and stopped by the test)."""
from __future__ import annotations

import datetime as dt
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from flows.deployments import ScheduleSpec, describe, load_specs, next_runs

runner = CliRunner()


def test_prefect_yaml_defines_cron_deployments_with_configs():
    specs = {s.name: s for s in load_specs()}
    ct = specs["nightly-ct-thick-slices"]
    assert ct.entrypoint == "flows/enhance.py:enhance_flow" and ct.parameters == {"config": "configs/ct_slices_x4.yaml"}
    assert ct.schedules == (ScheduleSpec("0 2 * * *", "Europe/Paris"),)
    repo = Path(__file__).resolve().parents[2]
    for spec in specs.values():
        assert spec.schedules and (repo / spec.parameters["config"]).is_file()
    runs = next_runs(ct.schedules[0], 3, after=dt.datetime(2026, 6, 1, 12, tzinfo=dt.timezone.utc))
    assert [r.astimezone(dt.timezone.utc).isoformat() for r in runs] == [  # 02:00 in Paris = 00:00 UTC in June
        "2026-06-02T00:00:00+00:00", "2026-06-03T00:00:00+00:00", "2026-06-04T00:00:00+00:00"]
    assert describe(["weekly-mri-t1"])[0]["schedules"][0]["cron"] == "30 3 * * 0"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def prefect_server(tmp_path):
    """A real Prefect server on 127.0.0.1 with its own PREFECT_HOME; always stopped afterwards."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "server-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_LOGGING_LEVEL="WARNING")
    exe = Path(sys.executable).with_name("prefect")
    with open(tmp_path / "server.log", "wb") as log:
        proc = subprocess.Popen([str(exe), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-ui"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 150
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited ({proc.returncode}): "
                            f"{(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("prefect server did not answer /api/health within 150 s")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


@pytest.mark.slow
def test_cron_deployment_on_a_real_server(prefect_server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from domainsr.cli import app

    with temporary_settings(updates={PREFECT_API_URL: prefect_server}):
        res = runner.invoke(app, ["schedule", "create", "nightly-ct-thick-slices", "sentinel2-new-scenes"])
        assert res.exit_code == 0, res.output
        with get_client(sync_client=True) as client:
            assert client.api_url.host == "127.0.0.1"
            dep = client.read_deployment_by_name("domainsr-enhance/nightly-ct-thick-slices")
            other = client.read_deployment_by_name("domainsr-enhance/sentinel2-new-scenes")
    assert str(dep.id) in res.output and str(other.id) in res.output
    assert dep.parameters == {"config": "configs/ct_slices_x4.yaml"} and dep.entrypoint.endswith("enhance_flow")
    (sched,) = dep.schedules
    assert sched.active and sched.schedule.cron == "0 2 * * *" and sched.schedule.timezone == "Europe/Paris"
    assert other.schedules[0].schedule.cron == "20 * * * *"
