"""Batches on an existing Dask cluster: ``dask scheduler`` and two ``dask worker`` processes on
127.0.0.1 (free ports, loopback only), as a new user would start them.

* ``domainsr enhance ... --runner dask --dask-address`` with one worker SIGKILLed mid-batch (and one
  corrupt input, so the run also fails): every good item is written exactly once (one output, no
  partial files, one task run), with the pixels of a single-machine run; the task runs are in the
  flow's own API; no Prefect server ever runs under a worker and no process is left afterwards.
* The flow in Prefect's own ephemeral mode (no API URL: the case where each worker used to start
  an ephemeral server of its own): the task runs are in the flow's API, no worker starts a server.

Every process is stopped by its own pid in the fixture's teardown.
"""
from __future__ import annotations

import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from flow_inputs import crop

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks use Linux /proc"),
              pytest.mark.slow]  # about 30 s each on 2 busy cores (one cluster for the module)

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"


class Cluster:
    """A scheduler and named workers, each a process of ours (no nanny: one pid per worker)."""

    def __init__(self, tmp: Path) -> None:
        from domainsr.orchestration import free_port

        self.port = free_port()
        self.address = f"tcp://{HOST}:{self.port}"
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.seen: set[int] = set()  # every pid ever seen under a worker
        self.servers: list[str] = []  # Prefect servers seen under a worker (must stay empty)
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
                    "PREFECT_LOGGING_LEVEL": "INFO"}  # the tests' WARNING would hide the items' log lines

    def _spawn(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen([str(BIN / "dask"), *args], cwd=ROOT, env=self.env, stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def start(self, workers: int = 2) -> None:
        self._spawn("scheduler", "scheduler", "--host", HOST, "--port", str(self.port),
                    "--dashboard-address", f"{HOST}:0")
        for i in range(workers):
            self._spawn(f"w{i}", "worker", self.address, "--host", HOST, "--name", f"w{i}", "--nthreads", "1",
                        "--no-nanny", "--no-dashboard", "--preload", "flows.enhance",
                        "--local-directory", str(self.tmp / f"w{i}-scratch"))
        from distributed import Client

        with Client(self.address, timeout="60s") as client:
            client.wait_for_workers(workers, timeout=90)

    def workers(self) -> dict[str, int]:
        return {n: p.pid for n, p in self.procs.items() if n.startswith("w") and p.poll() is None}

    def watch(self) -> None:
        """Record the descendants of every worker, and any Prefect server among them."""
        for pid in self.workers().values():
            try:
                kids = psutil.Process(pid).children(recursive=True)
            except psutil.NoSuchProcess:
                continue
            for k in kids:
                self.seen.add(k.pid)
                try:
                    cmd = " ".join(k.cmdline())
                except psutil.Error:
                    continue
                if "uvicorn" in cmd or "prefect.server" in cmd or "prefect server" in cmd:
                    self.servers.append(cmd[:200])

    def kill(self, name: str) -> None:
        self.watch()
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> list[int]:
        """Stop every process of ours by its pid (workers first); the pids still alive after."""
        self.watch()
        for name in sorted(self.procs, key=lambda n: n == "scheduler"):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        for pid in self.seen:  # anything a worker left (none expected)
            if psutil.pid_exists(pid):
                try:
                    psutil.Process(pid).kill()
                except psutil.NoSuchProcess:
                    pass
        time.sleep(0.2)
        pids = list(self.seen) + [p.pid for p in self.procs.values()]
        return [p for p in pids if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One cluster for the module: the ephemeral-mode test runs first, the one that kills a worker last."""
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.start()
        yield c
    finally:
        left = c.stop()
        assert not left, f"processes left behind: {left}"


@pytest.fixture(scope="module")
def tiles(sample_data, tmp_path_factory) -> Path:
    """Eight 512x512 windows of the real Sentinel-2 10 m bands (about 1 s each, cubic x2) and a
    corrupt file."""
    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    root = tmp_path_factory.mktemp("tiles")
    rgbn = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    for i in range(8):
        write_raster(crop(rgbn, (150 * (i // 4), 400 * (i % 4)), (512, 512)), root / f"t{i}.tif")
    (root / "broken.tif").write_bytes(b"II*\x00 not really a GeoTIFF")
    return root


def _single_machine(tiles: Path, out: Path) -> dict[str, np.ndarray]:
    from domainsr.app import enhance_item
    from domainsr.io.raster import read_raster
    from flows.enhance import build_run

    spec, store = build_run(model="cubic", scale=2, inputs=[str(tiles)], out=str(out), run_audit=False)
    for item in store.list_items():
        if item.id != "broken":
            enhance_item(store, item, spec)
    return {p.name: read_raster(p).data for p in sorted(out.glob("*_sr.tif"))}


def _descendants(pid: int) -> set[int]:
    try:
        return {k.pid for k in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def test_flow_in_prefect_ephemeral_mode_reports_to_its_own_api(cluster, tiles, prefect_home, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from flows.enhance import enhance_flow

    src = tmp_path / "in"
    src.mkdir()
    for i in range(3):
        shutil.copy(tiles / f"t{i}.tif", src)
    state = enhance_flow(inputs=[str(src)], out=str(tmp_path / "out"), model="cubic", scale=2,
                         dask_address=cluster.address, run_audit=False, return_state=True)
    assert state.is_completed(), state.message
    cluster.watch()
    assert not cluster.servers, cluster.servers  # before the fix: one ephemeral server per worker
    with get_client(sync_client=True) as client:
        subflow = max((r for r in client.read_flow_runs() if r.parent_task_run_id), key=lambda r: r.created)
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[subflow.id])))
    assert sorted((r.name, r.state.type.value) for r in runs) == [(f"enhance-t{i}", "COMPLETED") for i in range(3)]


def test_cli_batch_survives_a_killed_worker(cluster, tiles, tmp_path):
    from distributed import Client

    from domainsr.io.raster import read_raster

    home, out = tmp_path / "prefect-home", tmp_path / "out"
    env = {**cluster.env, "PREFECT_HOME": str(home), "DOMAINSR_PREFECT_SERVER": "auto"}
    env.pop("PREFECT_API_URL", None)
    cmd = [str(BIN / "domainsr"), "enhance", str(tiles), "--model", "cubic", "--scale", "2", "--out", str(out),
           "--runner", "dask", "--dask-address", cluster.address, "--no-audit", "--json", "--no-progress"]
    cli = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    cli_tree: set[int] = set()
    killed, busy_since = None, None
    try:
        with Client(cluster.address, timeout="30s") as client:
            deadline = time.monotonic() + 240
            while cli.poll() is None and time.monotonic() < deadline:
                cli_tree |= _descendants(cli.pid)
                cluster.watch()
                if killed is None:  # mid-batch (an item written, or items running for 2 s): kill a busy worker
                    try:
                        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
                        busy = [names[a] for a, keys in client.processing().items() if keys and a in names]
                    except Exception:  # noqa: BLE001 - a poll racing the scheduler's bookkeeping: poll again
                        busy = []
                    busy_since = (busy_since or time.monotonic()) if busy else busy_since
                    if busy and (any(out.glob("*_sr.tif")) or time.monotonic() - busy_since > 2):
                        killed = busy[0]
                        cluster.kill(killed)
                time.sleep(0.02)
        stdout, stderr = cli.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(5)
    assert killed is not None, "the batch ended before a worker could be killed mid-run"
    assert cli.returncode == 1, stderr.decode()[-3000:]  # the corrupt file failed, the rest enhanced
    import json

    summary = json.loads(stdout)
    status = {r["item_id"]: r["status"] for r in summary["items"]}
    assert status == {**{f"t{i}": "enhanced" for i in range(8)}, "broken": "failed"}

    # exactly once: one output per item, no partial files, one task run each in the flow's API
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".tif")) == [f"t{i}_sr.tif" for i in range(8)]
    assert not [p.name for p in out.rglob("*") if ".partial-" in p.name]
    with sqlite3.connect(home / "prefect.db") as db:
        (sub_id,) = db.execute("SELECT fr.id FROM flow_run fr JOIN flow f ON fr.flow_id = f.id "
                               "WHERE f.name = 'domainsr-enhance-items'").fetchone()
        runs = db.execute("SELECT name, state_type FROM task_run WHERE flow_run_id = ?", (sub_id,)).fetchall()
        # the workers' own log lines reached the API too (drained before the flow ended)
        logged = {n for (n,) in db.execute(
            "SELECT DISTINCT tr.name FROM log l JOIN task_run tr ON l.task_run_id = tr.id "
            "WHERE tr.flow_run_id = ? AND l.message LIKE '%-> %'", (sub_id,))}
    assert sorted(runs) == sorted([(f"enhance-t{i}", "COMPLETED") for i in range(8)] + [("enhance-broken", "FAILED")])
    assert logged == {f"enhance-t{i}" for i in range(8)}

    # pixels equal to a single-machine run
    ref = _single_machine(tiles, tmp_path / "ref")
    assert sorted(ref) == [f"t{i}_sr.tif" for i in range(8)]
    for name, data in ref.items():
        assert np.array_equal(read_raster(out / name).data, data), name

    # no Prefect server under any worker; nothing the CLI started is left (its ephemeral API)
    cluster.watch()
    assert not cluster.servers, cluster.servers
    assert cli_tree, "the CLI's ephemeral API server was never seen"
    assert not [p for p in cli_tree if _alive(p)]
    assert set(cluster.workers()) == {"w0", "w1"} - {killed}
