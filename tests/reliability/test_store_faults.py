"""A store that fails transiently (busy PACS on read, a network share hiccup on write, a failure
between the output and its provenance record) is retried by the enhancement flow until the item is
complete exactly once; a permanent error (bad input) is not retried. The protocol-level retries
(HTTP 5xx with backoff, an upload cut mid-way) are in tests/stores against real Orthanc and HTTP."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from domainsr.app.runs import config_from_model, plan_run
from domainsr.errors import StoreError
from domainsr.io.raster import read_raster
from domainsr.stores.local import PROVENANCE_SUFFIX, LocalStore


class FlakyStore(LocalStore):
    """Fails once on purpose: the read of ``busy`` (StoreError, as a 503 from a PACS), the write
    of ``hiccup`` (OSError), and the provenance commit of ``late`` (after its output file is in place)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: Counter[tuple[str, str]] = Counter()

    def read(self, item):
        self.calls["read", item.id] += 1
        if item.id == "busy" and self.calls["read", item.id] == 1:
            raise StoreError("store answered HTTP 503 (busy)", item.id)
        return super().read(item)

    def write(self, item, image, run_key, extras=None):
        self.calls["write", item.id] += 1
        if item.id == "hiccup" and self.calls["write", item.id] == 1:
            raise OSError(5, "Input/output error (network share)")
        return super().write(item, image, run_key, extras)

    def commit(self, item, run_key, extras=None, provenance=None):
        self.calls["commit", item.id] += 1
        if item.id == "late" and self.calls["commit", item.id] == 1:
            raise StoreError("connection reset before the provenance record was stored", item.id)
        return super().commit(item, run_key, extras, provenance)


@pytest.fixture()
def inbox(small_geotiff, tmp_path) -> Path:
    folder = tmp_path / "inbox"
    folder.mkdir()
    for name in ("busy", "hiccup", "late", "calm"):
        (folder / f"{name}.tif").write_bytes(small_geotiff.read_bytes())
    (folder / "broken.tif").write_bytes(small_geotiff.read_bytes()[:600])
    return folder


def test_transient_store_failures_are_retried_until_complete_exactly_once(prefect_home, inbox, tmp_path, tally):
    from flows.enhance import Batch, enhance_items_flow

    cfg = config_from_model("cubic", 2).model_copy(update={"run_audit": False})
    cfg = cfg.model_copy(update={"runner": cfg.runner.model_copy(update={"retries": 2, "retry_delay_s": 0})})
    spec = plan_run(cfg)
    out = tmp_path / "out"
    store = FlakyStore(inbox, output=out)
    items = store.list_items()
    results = {r.item_id: r for r in enhance_items_flow(Batch(store, items, spec))}
    tally("faults injected", 3)

    assert {i: r.status for i, r in results.items()} == {
        "busy": "enhanced", "hiccup": "enhanced", "late": "enhanced", "calm": "enhanced", "broken": "failed"}
    assert store.calls["read", "busy"] == 2 and store.calls["write", "hiccup"] == 2
    assert store.calls["commit", "late"] == 2
    assert store.calls["read", "broken"] == 1, "a bad input is not retried"
    assert store.calls["read", "calm"] == 1
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i}_sr.tif{end}" for i in ("busy", "hiccup", "late", "calm") for end in ("", PROVENANCE_SUFFIX))
    tally("items checked after faults", 4)
    tally("items lost", 4 - sum(store.existing(i, spec.run_key) is not None for i in items))
    expect = np.asarray(read_raster(out / "calm_sr.tif").data)
    for name in ("busy", "hiccup", "late"):  # a retried item equals one that never failed
        np.testing.assert_array_equal(np.asarray(read_raster(out / f"{name}_sr.tif").data), expect)
