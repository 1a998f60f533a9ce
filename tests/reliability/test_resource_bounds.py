"""The memory budget in a batch: a raster too large to enhance in memory is streamed (bounded
memory, same pixels), a volume whose output would not fit is refused before any work (and not
retried), the budget comes from the config, the environment or the machine; a model whose card
does not fit the input is refused without writing anything."""
from __future__ import annotations

import numpy as np
import psutil
import pytest

from domainsr import limits
from domainsr.app.enhance import enhance_item, job_bytes
from domainsr.app.runs import config_from_model, plan_run
from domainsr.errors import ConfigError, ModelCardMismatch, ResourceLimitError
from domainsr.io.raster import read_raster
from domainsr.retry import is_transient
from domainsr.stores.local import LocalStore

GIB = 1024**3


def _spec(model: str = "cubic", scale: int | None = 2, budget_bytes: int | None = None, audit: bool = False):
    cfg = config_from_model(model, scale).model_copy(update={"run_audit": audit})
    if budget_bytes is not None:
        cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"memory_budget_gb": budget_bytes / GIB})})
    return plan_run(cfg)


def test_a_raster_over_the_budget_is_streamed_to_the_same_pixels(small_geotiff, tmp_path):
    store = LocalStore([str(small_geotiff)], output=str(tmp_path / "in_memory"))
    item = store.list_items()[0]
    whole = enhance_item(store, item, _spec())
    assert "streamed" not in whole.message
    job = job_bytes(1, (48, 40), 2)
    tight = LocalStore([str(small_geotiff)], output=str(tmp_path / "streamed"))
    streamed = enhance_item(tight, item, _spec(budget_bytes=job // 2))
    assert "streamed" in streamed.message
    np.testing.assert_array_equal(read_raster(streamed.output).data, read_raster(whole.output).data)


def test_a_streamed_raster_keeps_the_band_map_names(tmp_path):
    import rasterio

    src = tmp_path / "undescribed.tif"
    data = np.random.default_rng(0).integers(0, 4000, (2, 40, 36), dtype=np.uint16)
    with rasterio.open(src, "w", driver="GTiff", width=36, height=40, count=2, dtype="uint16",
                       crs="EPSG:32633", transform=rasterio.Affine(10, 0, 500000, 0, -10, 4000000)) as ds:
        ds.write(data)
    cfg = config_from_model("cubic", 2).model_copy(update={"run_audit": False, "band_map": {1: "B04", 2: "B08"}})
    budget = job_bytes(2, (40, 36), 2) // 2
    cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"memory_budget_gb": budget / GIB})})
    store = LocalStore([str(src)], output=str(tmp_path / "out"))
    result = enhance_item(store, store.list_items()[0], plan_run(cfg))
    assert "streamed" in result.message
    assert read_raster(result.output).band_names == ("B04", "B08")


def test_a_volume_whose_output_would_not_fit_is_refused_before_any_work(small_nifti, tmp_path):
    store = LocalStore([str(small_nifti)], output=str(tmp_path / "out"))
    item = store.list_items()[0]
    job = job_bytes(1, (20, 24, 16), 2)
    with pytest.raises(ResourceLimitError) as err:
        enhance_item(store, item, _spec(budget_bytes=job - 1))
    assert item.id in str(err.value) and "memory budget" in str(err.value) and "x2" in str(err.value)
    assert not is_transient(err.value)  # retrying cannot make it fit
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    assert enhance_item(store, item, _spec(budget_bytes=job)).status == "enhanced"


def test_budget_from_context_environment_or_machine(monkeypatch):
    monkeypatch.delenv(limits.ENV_VAR, raising=False)
    assert limits.budget_bytes() == int(limits.DEFAULT_FRACTION * psutil.virtual_memory().total)
    monkeypatch.setenv(limits.ENV_VAR, "1.5")
    assert limits.budget_bytes() == int(1.5 * GIB)
    with limits.memory_budget(0.25):
        assert limits.budget_bytes() == GIB // 4
    assert limits.budget_bytes() == int(1.5 * GIB)
    for bad in ("lots", "-1", "nan"):
        monkeypatch.setenv(limits.ENV_VAR, bad)
        with pytest.raises(ConfigError, match=limits.ENV_VAR):
            limits.budget_bytes()


def test_absurd_sizes_are_computed_without_overflow():
    assert limits.decoded_bytes((10**6, 10**6, 10**3), np.float32) == 4 * 10**15
    with limits.memory_budget(1.0), pytest.raises(ResourceLimitError, match="3.6 PiB"):
        limits.check_fits(limits.decoded_bytes((10**6, 10**6, 10**3), np.float32), "a header's claim")


def test_wrong_band_count_for_the_model_is_refused_and_nothing_written(small_geotiff, tmp_path):
    store = LocalStore([str(small_geotiff)], output=str(tmp_path / "out"))
    item = store.list_items()[0]
    with pytest.raises(ModelCardMismatch) as err:  # one band (B02) for a 4-band (B02, B03, B04, B08) model
        enhance_item(store, item, _spec("sentinel2-rgbn-x2", None))
    assert item.id in str(err.value) or small_geotiff.name in str(err.value)
    assert "B08" in str(err.value) or "band" in str(err.value)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
