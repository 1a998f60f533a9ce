"""Faults in the middle of a run: the worker process is killed (SIGKILL: no clean-up code runs)
mid-write and mid-batch, then the same command is run again. Every item must end complete exactly
once (items finished before a kill are not redone), no partial file may ever carry a final name,
debris of killed writers is cleaned, and resumed outputs equal an uninterrupted run's."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from domainsr.io.raster import read_raster
from domainsr.stores.local import PROVENANCE_SUFFIX

N_TILES = 5
MODEL = "sentinel2-rgbn-x2"

#: The worker: the CLI, optionally with every COG rename held back ``SLOW_WRITE`` seconds (the
#: temporary file is complete, the final name not yet there): a deterministic "mid-write" moment.
RUNNER = textwrap.dedent('''
    import os, sys, time
    from contextlib import contextmanager

    import domainsr.io.raster as raster

    _atomic = raster.atomic_path

    @contextmanager
    def held_back(final, is_dir=False):
        with _atomic(final, is_dir) as tmp:
            yield tmp
            time.sleep(float(os.environ.get("SLOW_WRITE", "0")))

    raster.atomic_path = held_back
    from domainsr.cli import main
    sys.argv = ["domainsr", *sys.argv[1:]]
    main()
''')

WRITER = textwrap.dedent('''
    import os, sys, time
    from contextlib import contextmanager

    import numpy as np
    import domainsr.io.nifti as nifti
    from domainsr.io import read_image, write_image

    _atomic = nifti.atomic_path

    @contextmanager
    def held_back(final, is_dir=False):  # the file is written, not yet renamed: the kill lands here
        with _atomic(final, is_dir) as tmp:
            yield tmp
            time.sleep(float(os.environ.get("SLOW_WRITE", "0")))

    nifti.atomic_path = held_back
    src, dst = sys.argv[1], sys.argv[2]
    img = read_image(src)
    big = np.repeat(np.repeat(np.repeat(img.data, 3, 1), 3, 2), 3, 3).astype(np.float32)
    write_image(img.derive(big, geometry=img.geometry.scaled((3, 3, 3))), dst)
''')


@pytest.fixture(scope="module")
def tiles(sample_data, tmp_path_factory) -> Path:
    """Five 160x160 windows of the real Sentinel-2 10 m RGBN bands, one GeoTIFF each."""
    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    folder = tmp_path_factory.mktemp("fault_tiles")
    rgbn = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    for n in range(N_TILES):
        r, c = 300 + 400 * (n // 3), 150 + 500 * (n % 3)
        write_raster(rgbn.derive(np.ascontiguousarray(rgbn.data[:, r:r + 160, c:c + 160]), mask=None,
                                 geometry=rgbn.geometry.cropped((r, c), (160, 160))), folder / f"tile{n}.tif")
    return folder


@pytest.fixture(scope="module")
def reference(tiles, tmp_path_factory) -> dict[str, np.ndarray]:
    """The same batch run in this process without interruption: item id -> output pixels."""
    from domainsr.app.enhance import enhance_item
    from domainsr.app.runs import config_from_model, plan_run
    from domainsr.stores import open_store

    out = tmp_path_factory.mktemp("fault_reference")
    spec = plan_run(config_from_model(MODEL))
    store = open_store([str(tiles)], output=str(out))
    return {item.id: np.asarray(read_raster(enhance_item(store, item, spec).output).data)
            for item in store.list_items()}


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_LOGGING_LEVEL="WARNING", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PYTHONPATH=str(Path.cwd()), **extra)
    return env


def _launch(script: Path, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_until(cond: Callable[[], bool], proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"worker ended (rc {proc.returncode}) before the fault: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > end:
            _kill(proc)
            raise AssertionError("the moment to inject the fault never came")
        time.sleep(0.01)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the worker, reap it, then stop what it left running (Prefect's ephemeral server)."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _partials(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial-*"))


def _visible(out: Path, pattern: str) -> list[Path]:
    return sorted(p for p in out.glob(pattern) if not p.name.startswith("."))


def _done(out: Path) -> dict[str, Path]:
    """Items whose provenance file (written last) exists: item id -> output (``<id>_sr.tif``)."""
    return {p.name[: -len("_sr.tif" + PROVENANCE_SUFFIX)]: p.with_name(p.name[: -len(PROVENANCE_SUFFIX)])
            for p in _visible(out, f"*.tif{PROVENANCE_SUFFIX}")}


def _assert_no_partial_under_a_final_name(out: Path) -> None:
    for path in out.iterdir():
        if path.name.startswith("."):
            continue
        if path.suffix == ".tif":
            read_raster(path).data.sum()  # complete and readable, every pixel
        elif path.name.endswith(".json"):
            json.loads(path.read_text())
        elif path.name.endswith(".html"):
            assert path.read_text().rstrip().endswith("</html>"), path


def test_worker_killed_mid_write_and_mid_batch_then_rerun_completes_every_item_once(
        tiles, reference, tmp_path, tally):
    script = tmp_path / "worker.py"
    script.write_text(RUNNER)
    out, home = tmp_path / "out", tmp_path / "prefect"
    args = ["enhance", str(tiles), "--model", MODEL, "--out", str(out), "--no-progress", "--json"]

    # fault 1: killed while the first output file is written (complete temporary file, not yet renamed)
    proc = _launch(script, args, _env(home, SLOW_WRITE="30"))
    _wait_until(lambda: any(".tif.partial-" in p.name for p in _partials(out)) if out.exists() else False, proc)
    _kill(proc)
    tally("faults injected")
    assert _partials(out), "the killed writer's temporary file should be the only trace"
    assert not _visible(out, "*.tif"), "no output may appear under its final name"
    _assert_no_partial_under_a_final_name(out)

    # fault 2: killed mid-batch, once two items are complete
    proc = _launch(script, args, _env(home))
    _wait_until(lambda: len(_done(out)) >= 2, proc)
    time.sleep(0.3)
    _kill(proc)
    tally("faults injected")
    _assert_no_partial_under_a_final_name(out)
    finished = _done(out)
    assert 2 <= len(finished) < N_TILES
    stamps = {i: (p.stat().st_ino, p.stat().st_mtime_ns) for i, p in finished.items()}

    # the re-run: finishes the rest, leaves the finished alone, cleans the debris
    proc = _launch(script, args, _env(home))
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout[stdout.index("{"):])
    status = {r["item_id"]: r["status"] for r in summary["items"]}
    assert sorted(status) == sorted(reference)
    assert {i for i, s in status.items() if s == "skipped"} == set(finished)
    assert {i for i, s in status.items() if s == "enhanced"} == set(reference) - set(finished)
    assert not _partials(out), [p.name for p in _partials(out)]
    done = _done(out)
    lost = set(reference) - set(done)
    tally("items checked after faults", len(reference))
    tally("items lost", len(lost))
    assert not lost
    expected = {f"{i}_sr{end}" for i in reference
                for end in (".tif", f".tif{PROVENANCE_SUFFIX}", ".audit.html", ".audit.json", ".risk.tif",
                            ".regions.geojson", ".regions.tif")}
    assert {p.name for p in _visible(out, "*")} == expected  # one of each, nothing else
    for item, (ino, mtime) in stamps.items():  # not rewritten: complete exactly once
        st = done[item].stat()
        assert (st.st_ino, st.st_mtime_ns) == (ino, mtime), item
    for item, pixels in reference.items():  # deterministic on CPU: the resumed batch equals a clean run
        np.testing.assert_array_equal(np.asarray(read_raster(done[item]).data), pixels, err_msg=item)
        record = json.loads((done[item].parent / (done[item].name + PROVENANCE_SUFFIX)).read_text())
        assert record["complete"] and record["run_key"] == summary["run_key"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_killed_nifti_writer_leaves_no_output_and_the_next_write_cleans_up(small_nifti, suffix, tmp_path, tally):
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    dst = tmp_path / f"out{suffix}"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen([sys.executable, str(script), str(small_nifti), str(dst)], text=True,
                            env={**env, "SLOW_WRITE": "30"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    _wait_until(lambda: bool(_partials(tmp_path)), proc)
    _kill(proc)
    tally("faults injected")
    assert not dst.exists() and _partials(tmp_path)

    done = subprocess.run([sys.executable, str(script), str(small_nifti), str(dst)], env=env, text=True, check=False,
                          capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert not _partials(tmp_path), "debris of the killed writer is removed by the next write"
    assert nib.load(dst).shape == tuple(3 * s for s in nib.load(small_nifti).shape)


def test_debris_of_a_live_writer_is_kept(tmp_path):
    """A partial file of a writer that is still running (here: this process) is not touched."""
    from domainsr.io.atomic import atomic_path, remove_stale_partials

    final = tmp_path / "x.tif"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"half")
        assert remove_stale_partials(final) == [] and tmp.exists()
    assert final.read_bytes() == b"half"


def test_debris_of_another_machine_is_removed_only_when_old(tmp_path):
    """On a shared folder a pid from another host means nothing: its partial files are removed
    only once older than STALE_AFTER_S."""
    from domainsr.io.atomic import STALE_AFTER_S, remove_stale_partials

    final = tmp_path / "scene.tif"
    old = tmp_path / ".scene.tif.partial-4242_0badcafe-abcdefgh.tif"
    fresh = tmp_path / ".scene.tif.partial-4243_0badcafe-ijklmnop.tif"
    for p in (old, fresh):
        p.write_bytes(b"half")
    past = time.time() - STALE_AFTER_S - 60
    os.utime(old, (past, past))
    assert remove_stale_partials(final) == [old]
    assert fresh.exists() and not old.exists()
