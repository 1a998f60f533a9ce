"""A real deployment: ``prefect server start`` on 127.0.0.1 (a free port, a temporary PREFECT_HOME),
a process work pool, ``prefect deploy`` of the repository's ``prefect.yaml`` (a copy: the test pool,
a cubic x2 run of one small real GeoTIFF, its schedule off), ``prefect deployment run``, and
``prefect worker start --run-once`` from the checkout ($DOMAINSR_REPO). Checked through the API:
the run completed, the outputs are valid, the run's artifacts, the deployment's concurrency limit.
On the same server: a global PACS limit of 1 serialises two holders, and the pseudonym salt of a
Secret block is the same in two processes with different home folders (and differs without it).

Bounded in time (each wait has a deadline; about a minute on two cores), loopback only, and every
process started here (server, CLI commands, worker, their children) is stopped by its own pid.
"""
from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from flow_inputs import write_geotiff_crop

from domainsr.orchestration import HOST, SERVER_ENV, free_port, healthy

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
DEPLOYMENT = "sentinel2-new-scenes"
FLOW = "domainsr-enhance"
POOL = "test-pool"


def stop(proc: subprocess.Popen, grace: float = 15.0) -> list[int]:
    """Stop ``proc`` and its children (found before the signal) by their pids: SIGTERM, then
    SIGKILL after ``grace``; returns the pids still alive afterwards (none, normally)."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for signal_them in (psutil.Process.terminate, psutil.Process.kill):
        alive = [k for k in kids if _alive(k)]
        for k in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                signal_them(k)
        psutil.wait_procs(alive, timeout=grace)
    return [k.pid for k in kids if _alive(k)]


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class Server:
    """The test's Prefect server: its API URL and the environment of the commands that use it."""

    def __init__(self, home: Path) -> None:
        self.home, self.port = home, free_port()
        self.url = f"http://{HOST}:{self.port}/api"
        base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_", "PREFECT_PROFILE"))}
        base.pop("DOMAINSR_PSEUDONYM_SALT", None)
        self.env = {**SERVER_ENV, **base, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING",
                    "PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED": "false"}  # runs here are started by hand
        self.client_env = {**self.env, "PREFECT_API_URL": self.url}
        self.proc: subprocess.Popen | None = None
        self.log = home / "server.log"

    def start(self, timeout: float = 60.0) -> None:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", HOST,
                                          "--port", str(self.port)], cwd=self.home, env=self.env,
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not healthy(self.url, 1.0):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log.read_text(errors="replace")[-400:]
                left = stop(self.proc)
                assert not left, f"server processes left: {left}"
                pytest.skip(f"`prefect server start` did not answer on {self.url} within {timeout:.0f} s: {tail}")
            time.sleep(0.5)

    def cli(self, *args: str, cwd: Path | None = None, timeout: float = 60.0, **env: str) -> str:
        """Run ``prefect ARGS`` against this server; its output (an assertion error on failure)."""
        proc = subprocess.Popen([sys.executable, "-m", "prefect", *args], cwd=cwd or self.home,
                                env={**self.client_env, **env}, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out = None
        finally:
            left = stop(proc)
        assert out is not None, f"prefect {' '.join(args)} took more than {timeout:.0f} s"
        assert not left, f"prefect {' '.join(args)} left processes {left}"
        assert proc.returncode == 0, f"prefect {' '.join(args)} failed ({proc.returncode}):\n{out[-2000:]}"
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("prefect-server-home"))
    srv.start()
    try:
        yield srv
    finally:
        left = stop(srv.proc)
        assert srv.proc.poll() is not None and not left, f"server processes left: {left}"


@pytest.fixture
def api(server, monkeypatch):
    """This process's Prefect (and DomainSR's API look-up) pointed at the test server."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_API_URL", server.url)
    with temporary_settings(updates={PREFECT_API_URL: server.url}):
        yield server


def _test_prefect_yaml(path: Path, scene: Path) -> Path:
    """The repository's prefect.yaml with one deployment: the test pool, its schedule off, a cubic x2
    run of ``scene`` (the output folder is given when the run is started)."""
    raw = yaml.safe_load((REPO / "prefect.yaml").read_text())
    dep = next(d for d in raw["deployments"] if d["name"] == DEPLOYMENT)
    dep["work_pool"]["name"] = POOL
    for schedule in dep["schedules"]:
        schedule["active"] = False
    dep["parameters"] = {"model": "cubic", "scale": 2, "inputs": [str(scene)]}
    raw["deployments"] = [dep]
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_deploy_from_prefect_yaml_and_run_on_a_process_worker(server, api, sample_data, tmp_path):
    import rasterio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    from flows.common import artifact_key
    from flows.deployments import load_specs

    scene = write_geotiff_crop(sample_data, tmp_path / "inbox" / "scene.tif")
    out = tmp_path / "outbox"
    prefect_file = _test_prefect_yaml(tmp_path / "prefect.yaml", scene)
    spec = load_specs(prefect_file)[0]  # our loader accepts the copy (no key Prefect would drop)
    assert spec.concurrency_limit == {"limit": 1, "collision_strategy": "CANCEL_NEW"}

    server.cli("work-pool", "create", POOL, "--type", "process")
    server.cli("--no-prompt", "deploy", "--prefect-file", str(prefect_file), "--name", DEPLOYMENT, cwd=REPO)
    started = server.cli("deployment", "run", f"{FLOW}/{DEPLOYMENT}", "--param", f"out={out}")
    run_id = re.search(r"UUID: ([0-9a-f-]{36})", started).group(1)

    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
                              cwd=tmp_path, env={**server.client_env, "DOMAINSR_REPO": str(REPO)},
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        log, _ = worker.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        log = "(the worker did not finish within 120 s)"
    finally:
        left = stop(worker)
    assert worker.returncode == 0 and not left, log[-3000:]

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
        assert run.state.is_completed(), f"{run.state}: {log[-3000:]}"
        assert run.parameters["out"] == str(out) and run.parameters["model"] == "cubic"
        deployment = client.read_deployment(run.deployment_id)
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[run.id])))
    assert deployment.global_concurrency_limit is not None and deployment.global_concurrency_limit.limit == 1
    assert deployment.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert deployment.work_pool_name == POOL and deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $DOMAINSR_REPO }}"}}]
    assert deployment.schedules and not any(s.active for s in deployment.schedules)

    key = artifact_key("domainsr-enhance", "cubic-x2")
    by_key = {a.key: a for a in artifacts}
    assert {key, f"{key}-report"} <= set(by_key), sorted(by_key)
    assert by_key[key].type == "table" and by_key[f"{key}-report"].type == "markdown"
    rows = by_key[key].data if isinstance(by_key[key].data, list) else json.loads(by_key[key].data)
    assert [(r["item"], r["status"]) for r in rows] == [("scene", "enhanced")]
    assert "**1 enhanced, 0 skipped (already done), 0 failed**" in by_key[f"{key}-report"].data
    assert by_key[key].description.startswith("1 enhanced, 0 skipped, 0 failed")

    output = out / "scene_sr.tif"
    assert Path(rows[0]["output"]) == output and (out / "scene_sr.tif.provenance.json").is_file()
    with rasterio.open(scene) as src, rasterio.open(output) as dst:
        assert (dst.count, dst.height, dst.width) == (src.count, 2 * src.height, 2 * src.width)
        assert dst.crs == src.crs and abs(dst.res[0] - src.res[0] / 2) < 1e-6
        data = dst.read()
        assert data.std() > 0 and (data > 0).mean() > 0.99


def test_a_global_pacs_limit_serialises_holders_across_threads(api, monkeypatch):
    from domainsr.stores import pacs

    api.cli("gcl", "create", "pacs-test", "--limit", "1")
    monkeypatch.setattr(pacs, "_LIMITS", {})
    spans: list[tuple[float, float]] = []

    def hold() -> None:
        with pacs.pacs_slot("pacs-test"):
            t0 = time.monotonic()
            time.sleep(1.0)
            spans.append((t0, time.monotonic()))

    # each thread in a copy of this context (Prefect's settings live in a context variable), as
    # Prefect's thread pool task runner runs its tasks
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(hold,)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads) and len(spans) == 2
    (_, a1), (b0, _) = sorted(spans)
    assert b0 >= a1 - 0.05, f"two holders of a limit of 1 overlapped: {spans}"
    assert pacs._LIMITS == {(api.url, "pacs-test"): True}


def _pseudonym_in_processes(env: dict[str, str], homes: list[Path]) -> list[str]:
    code = "from domainsr.audit.privacy import pseudonym; print(pseudonym('patient-42'))"
    procs = []
    for home in homes:
        home.mkdir(parents=True, exist_ok=True)
        procs.append(subprocess.Popen([sys.executable, "-c", code], cwd=REPO, text=True, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, env={**env, "HOME": str(home),
                                                                   "XDG_CONFIG_HOME": str(home / ".config")}))
    answers = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=60)
        finally:
            assert not stop(proc)
        assert proc.returncode == 0, err[-2000:]
        answers.append(out.strip())
    return answers


def test_the_salt_secret_block_gives_the_same_pseudonyms_in_two_processes(api, tmp_path):
    from prefect.blocks.system import Secret

    from domainsr.audit.privacy import SALT_BLOCK

    salt = "site-salt-" + hashlib.sha256(str(tmp_path).encode()).hexdigest()[:16]
    Secret(value=salt).save(SALT_BLOCK, overwrite=True)
    expected = "anon-" + hmac.new(salt.encode(), b"patient-42", hashlib.sha256).hexdigest()[:12]
    with_block = _pseudonym_in_processes(api.client_env, [tmp_path / "a", tmp_path / "b"])
    assert with_block == [expected, expected]
    assert not (tmp_path / "a" / ".config" / "domainsr" / "pseudonym_salt").exists()
    without = _pseudonym_in_processes({k: v for k, v in api.env.items()}, [tmp_path / "c", tmp_path / "d"])
    assert len(set(without)) == 2 and expected not in without  # each machine's own salt
