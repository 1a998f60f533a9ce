"""Deployments from prefect.yaml, read by Prefect's own loader with no key dropped: cron
schedules parsed and listed, one run at a time for every scheduled deployment, and created against
a real Prefect server (``prefect server start`` on 127.0.0.1, started and stopped by the test)."""
from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from domainsr.errors import ConfigError
from flows.deployments import (
    PREFECT_YAML,
    ScheduleSpec,
    describe,
    dropped_keys,
    load_specs,
    next_runs,
    read_prefect_yaml,
    to_deployment,
)

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


def test_prefect_reads_prefect_yaml_and_keeps_every_key():
    raw = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    specs = load_specs()
    assert [dict(s.config) for s in specs] == read_prefect_yaml(PREFECT_YAML)  # Prefect's loader, unchanged
    for entry, spec in zip(raw, specs):
        assert set(entry) == set(spec.config) and dropped_keys(entry, spec.config) == []
        assert spec.config["work_pool"] == entry["work_pool"] and spec.config["tags"] == entry["tags"]


def test_every_scheduled_deployment_runs_one_at_a_time():
    specs = [s for s in load_specs() if s.schedules]
    assert len(specs) == 3
    strategies = {}
    for spec in specs:
        assert spec.concurrency_limit["limit"] == 1
        deployment = to_deployment(spec)
        assert deployment.concurrency_limit == 1
        strategies[spec.name] = deployment.concurrency_options.collision_strategy.value
        assert [s.schedule.cron for s in deployment.schedules] == [s.cron for s in spec.schedules]
    # the hourly "not done yet" query skips a run that would overlap; windowed queries wait for it
    assert strategies == {"nightly-ct-thick-slices": "ENQUEUE", "sentinel2-new-scenes": "CANCEL_NEW",
                          "weekly-mri-t1": "ENQUEUE"}


def _yaml(tmp_path, deployment: dict, top: dict | None = None) -> Path:
    doc = {"name": "t", "prefect-version": "3.9.1", **(top or {}),
           "deployments": [{"name": "d", "entrypoint": "flows/enhance.py:enhance_flow", **deployment}]}
    path = tmp_path / "prefect.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.mark.parametrize(("deployment", "top", "message"), [
    ({"concurency_limit": 1}, {}, r"Prefect ignores key\(s\) \['concurency_limit'\]"),
    ({"work_pool": {"name": "p", "job_variable": {}}}, {}, r"\['work_pool.job_variable'\]"),
    ({"concurrency_limit": {"limit": 1, "strategy": "ENQUEUE"}}, {}, r"\['concurrency_limit.strategy'\]"),
    ({"schedules": [{"cron": "0 2 * * *", "timezon": "UTC"}]}, {}, "Prefect cannot use this file"),
    ({}, {"deployment": []}, r"top-level key\(s\) \['deployment'\]"),
    ({"schedules": [{"interval": 3600}]}, {}, "cron schedules"),
    ({"concurrency_limit": {"collision_strategy": "ENQUEUE"}}, {}, "needs a limit"),
])
def test_a_key_prefect_would_ignore_is_an_error(tmp_path, deployment, top, message):
    with pytest.raises(ConfigError, match=message):
        load_specs(_yaml(tmp_path, deployment, top))


def test_every_key_of_a_served_deployment_is_applied(tmp_path):
    path = _yaml(tmp_path, {
        "version": "7", "paused": True, "tags": ["a"], "parameters": {"config": "configs/mri_t1_x2.yaml"},
        "concurrency_limit": {"limit": 2, "collision_strategy": "CANCEL_NEW", "grace_period_seconds": 120},
        "schedules": [{"cron": "0 4 * * *", "timezone": "Europe/Paris", "active": False, "day_or": False,
                       "slug": "early", "parameters": {"config": "configs/ct_slices_x4.yaml"}}],
        "work_pool": {"name": "domainsr", "job_variables": {"env": {"X": "1"}}}})
    (spec,) = load_specs(path)
    d = to_deployment(spec)
    assert (d.version, d.paused, d.tags, d.parameters) == ("7", True, ["a"], {"config": "configs/mri_t1_x2.yaml"})
    assert d.concurrency_limit == 2 and d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert d.concurrency_options.grace_period_seconds == 120
    (sched,) = d.schedules
    assert (sched.schedule.cron, sched.schedule.timezone, sched.schedule.day_or) == ("0 4 * * *", "Europe/Paris", False)
    assert (sched.active, sched.slug, sched.parameters) == (False, "early", {"config": "configs/ct_slices_x4.yaml"})
    assert to_deployment(spec, paused=False).paused is False
    assert describe(path=path)[0]["schedules"][0]["active"] is False


def test_keys_only_prefect_deploy_applies_are_refused_not_ignored(tmp_path):
    (spec,) = load_specs(_yaml(tmp_path, {"triggers": [{"enabled": True, "match": {"prefect.resource.id": "x"}}]}))
    with pytest.raises(ConfigError, match=r"\['triggers'\] are applied by `prefect deploy` only"):
        to_deployment(spec)
    (spec,) = load_specs(_yaml(tmp_path, {"flow_name": "another-flow"}))
    with pytest.raises(ConfigError, match="is not the entrypoint's flow"):
        to_deployment(spec)


def test_schedule_list_shows_the_concurrency_limit():
    from domainsr.cli import app

    res = runner.invoke(app, ["schedule", "list", "--json"])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert rows["sentinel2-new-scenes"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "CANCEL_NEW"}
    assert rows["sentinel2-new-scenes"]["schedules"][0]["cron"] == "20 * * * *"
    res = runner.invoke(app, ["schedule", "list", "weekly-mri-t1"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "1 (ENQUEUE)" in res.output and "30 3 * * 0" in res.output
    res = runner.invoke(app, ["schedule", "list", "no-such-deployment"])
    assert res.exit_code != 0 and "no deployment named" in res.output


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
def test_cron_deployment_on_a_real_server(prefect_server, tmp_path):
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
    assert dep.global_concurrency_limit.limit == 1 and other.global_concurrency_limit.limit == 1
    assert dep.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert other.concurrency_options.collision_strategy.value == "CANCEL_NEW"

    # `prefect deploy --all` (a work pool and a worker) reads the same file, with the same limits
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_API_URL=prefect_server, PREFECT_HOME=str(tmp_path / "client-home"),
               DOMAINSR_REPO=str(repo))
    prefect = [str(Path(sys.executable).with_name("prefect")), "--no-prompt"]
    for args in (["work-pool", "create", "domainsr", "--type", "process"], ["deploy", "--all"]):
        done = subprocess.run(prefect + args, check=False, cwd=repo, env=env, capture_output=True, text=True,
                              timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    with temporary_settings(updates={PREFECT_API_URL: prefect_server}), get_client(sync_client=True) as client:
        deployed = {n: client.read_deployment_by_name(f"domainsr-enhance/{n}")
                    for n in ("nightly-ct-thick-slices", "sentinel2-new-scenes", "weekly-mri-t1")}
    for name, d in deployed.items():
        assert d.work_pool_name == "domainsr" and d.global_concurrency_limit.limit == 1, name
        assert d.pull_steps == [{"prefect.deployments.steps.set_working_directory": {"directory": str(repo)}}]
    assert deployed["weekly-mri-t1"].schedules[0].schedule.cron == "30 3 * * 0"
    assert deployed["sentinel2-new-scenes"].concurrency_options.collision_strategy.value == "CANCEL_NEW"
