"""One raster larger than a worker's memory budget, split into bands of tile rows (windows with
the model's halo), computed on two Dask workers (separate processes on 127.0.0.1) and assembled
into one COG: pixels and mask identical to the single-machine streamed run."""
from __future__ import annotations

import itertools
import sys

import numpy as np
import pytest
from flow_inputs import crop
from test_dask_cluster import cluster  # noqa: F401 - the module's cluster fixture

from domainsr.engine.split import band_plan, split_rows
from domainsr.engine.tiling import TilePlan
from domainsr.errors import ConfigError


def test_bands_of_tile_rows_cover_the_plan_once():
    plan = TilePlan.build((600, 500), scale=2, window=132, halo=2, align=64)
    ranges = split_rows(plan, 3)
    assert ranges[0][0] == 0 and ranges[-1][1] == plan.axes[0].count
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    tiles = [t for a, b in ranges for t in band_plan(plan, a, b)]
    whole = list(plan)
    assert [(t.src, t.out, t.crop) for t in tiles] == [(t.src, t.out, t.crop) for t in whole]
    blended = TilePlan.build((600, 500), scale=2, window=128, halo=8, overlap=16)
    with pytest.raises(ConfigError, match="halo-mode"):
        split_rows(blended, 2)


def test_a_remote_cluster_needs_an_api_it_can_reach():
    from flows.common import _check_reachable

    with pytest.raises(ConfigError, match="cannot report to the Prefect API"):
        _check_reachable("http://127.0.0.1:4200/api", "tcp://10.1.2.3:8786")
    _check_reachable("http://127.0.0.1:4200/api", "tcp://127.0.0.1:8786")  # loopback cluster
    _check_reachable("http://prefect.internal:4200/api", "tcp://10.1.2.3:8786")  # a shared server
    _check_reachable("http://127.0.0.1:4200/api", None)  # a local cluster


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks use Linux /proc")
def test_large_raster_split_across_two_workers_equals_one_machine(cluster, sample_data, tmp_path):  # noqa: F811
    from distributed import Client

    from domainsr.app import enhance_item
    from domainsr.app.enhance import streams
    from domainsr.app.split import enhance_raster_split
    from domainsr.io import read_image
    from domainsr.io.raster import read_raster, write_raster
    from flows.enhance import build_run

    rgbn = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    src = write_raster(crop(rgbn, (100, 100), (600, 600)), tmp_path / "in" / "scene.tif")
    spec, store = build_run(model="cubic", scale=2, inputs=[str(src)], out=str(tmp_path / "one"), run_audit=False)
    # a budget the whole image does not fit (about 25 MB in float32 at x2): the raster streams
    cfg = spec.config.model_copy(update={
        "runner": spec.config.runner.model_copy(update={"memory_budget_gb": 0.01}),
        "tiling": spec.config.tiling.model_copy(update={"tile": 128})})  # 3 tile rows of 256 LR px
    spec = type(spec)(cfg, spec.source, spec.model, spec.run_key)
    (item,) = store.list_items()
    from domainsr.limits import memory_budget

    with memory_budget(cfg.runner.memory_budget_gb):
        assert streams(store, item, spec)
    one = enhance_item(store, item, spec)
    assert "(streamed" in one.message

    with Client(cluster.address, timeout="30s") as client:
        res = enhance_raster_split(src, tmp_path / "split" / "scene_sr.tif", spec, client, parts=3)
    assert res.bands == [(0, 1), (1, 2), (2, 3)] and res.workers == 2
    assert len(res.where) == 2, res.where  # both workers computed bands
    a, b = read_raster(one.output), read_raster(res.output)
    assert np.array_equal(a.data, b.data)
    assert (a.mask is None and b.mask is None) or np.array_equal(a.mask, b.mask)
    assert a.geometry.transform == b.geometry.transform
    assert [p.name for p in res.output.parent.iterdir()] == ["scene_sr.tif"]  # parts removed, no partial file
    cluster.watch()
    assert not cluster.servers


@pytest.mark.slow  # about 30 s on 2 busy cores: a Prefect flow with the whole-scene audit
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process checks use Linux /proc")
def test_enhance_flow_splits_a_streamed_raster_across_the_workers(cluster, sample_data, prefect_home, tmp_path):  # noqa: F811
    """``enhance_flow`` on the cluster: the raster that streams is split (runner.dask_split, the
    default), audited and committed like a streamed item; its pixels equal the one-machine run."""
    from domainsr.app import enhance_item
    from domainsr.io import read_image
    from domainsr.io.raster import read_raster, write_raster
    from flows.enhance import build_run, enhance_flow

    rgbn = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    src = write_raster(crop(rgbn, (300, 200), (600, 600)), tmp_path / "in" / "scene.tif")
    config = tmp_path / "split.yaml"
    config.write_text("name: split-test\nmodel: {name: cubic, scale: 2}\ntiling: {tile: 128}\nrun_audit: true\n"
                      "runner: {memory_budget_gb: 0.01}\n", encoding="utf-8")
    state = enhance_flow(config=str(config), inputs=[str(src)], out=str(tmp_path / "out"),
                         dask_address=cluster.address, return_state=True)
    assert state.is_completed(), state.message
    (row,) = state.data["items"] if isinstance(state.data, dict) else state.result()["items"]
    assert row["status"] == "enhanced" and "split in 3 bands over 2 workers" in row["message"], row
    assert "audit.html" in row["extras"]
    spec, store = build_run(str(config), inputs=[str(src)], out=str(tmp_path / "one"), run_audit=False)
    (item,) = store.list_items()
    one = enhance_item(store, item, spec)
    assert "(streamed" in one.message and "split" not in one.message
    assert np.array_equal(read_raster(one.output).data, read_raster(row["output"]).data)
    cluster.watch()
    assert not cluster.servers
