"""The global PACS limit (domainsr.stores.pacs.pacs_slot): every exchange with the PACS holds one
slot of the Prefect global concurrency limit when one is configured, and nothing happens without
a name, an API or the limit. Unit level, with Prefect's ``concurrency`` replaced by a recorder
(the real server serialising two holders: tests/flows/test_prefect_deploy.py)."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import pytest

from domainsr.errors import StoreError
from domainsr.stores import pacs
from domainsr.stores.base import Item

API = "http://127.0.0.1:9/api"


class FakeBackend:
    """A PACS with one series; each call records whether a slot was held."""

    def __init__(self, held: list[str]) -> None:
        self.held, self.calls = held, []

    def _note(self, what: str) -> None:
        self.calls.append((what, list(self.held)))

    def find_series(self, keys):
        self._note("find")
        return [] if "SeriesInstanceUID" in keys else [pacs._Series(
            study_uid="1.2.3", series_uid="1.2.3.4", modality="MR", description="t1", study_date="20240101",
            n_instances=1, image_type="ORIGINAL")]

    def stamp(self, study_uid, series_uid):
        self._note("stamp")
        return 0, None, None

    def retrieve(self, study_uid, series_uid, folder: Path) -> int:
        self._note("retrieve")
        raise OSError("connection reset")  # transient: retried, each try in its own slot

    def store(self, files, study_uid) -> None:
        self._note("store")


@pytest.fixture
def recorder(monkeypatch) -> dict[str, Any]:
    """Prefect's ``concurrency`` replaced: records names, and what is held while inside."""
    from prefect.concurrency import sync

    state: dict[str, Any] = {"held": [], "acquired": [], "fail": None}

    @contextlib.contextmanager
    def fake(names, occupy=1, **kwargs):
        if state["fail"]:
            raise state["fail"]
        state["acquired"].append((names, occupy, kwargs.get("strict")))
        state["held"].append(names)
        try:
            yield
        finally:
            state["held"].remove(names)

    monkeypatch.setattr(sync, "concurrency", fake)
    monkeypatch.setattr(pacs, "_api_url", lambda: API)
    monkeypatch.setattr(pacs, "_LIMITS", {(API, "pacs-main"): True})
    monkeypatch.delenv(pacs.LIMIT_ENV, raising=False)
    return state


def _store(state: dict[str, Any], limit: str | None = "pacs-main") -> tuple[pacs.PacsStore, FakeBackend]:
    backend = FakeBackend(state["held"])
    store = pacs.PacsStore("dimse://pacs.example:104", backend, concurrency_limit=limit,
                           retry=pacs.RetryPolicy(tries=2, base_delay=0.0, jitter=0.0))
    return store, backend


def test_every_exchange_holds_one_slot_of_the_named_limit(recorder):
    store, backend = _store(recorder)
    items = store.list_items({"modality": ["MR", "CT"]})
    assert [i.meta["series_uid"] for i in items] == ["1.2.3.4"]
    assert store.existing(items[0], "k" * 16) is None
    with pytest.raises(StoreError):
        store.read(items[0])
    assert [c[0] for c in backend.calls] == ["find", "find", "find", "retrieve", "retrieve"]
    assert all(held == ["pacs-main"] for _, held in backend.calls)  # one slot, each try its own
    assert len(recorder["acquired"]) == 5 and recorder["held"] == []
    assert {(a[0], a[1], a[2]) for a in recorder["acquired"]} == {("pacs-main", 1, True)}


def test_no_name_means_no_slot(recorder):
    store, backend = _store(recorder, limit=None)
    store.list_items({})
    assert backend.calls == [("find", [])] and recorder["acquired"] == []


def test_no_api_means_no_slot_and_one_warning(recorder, monkeypatch, caplog):
    monkeypatch.setattr(pacs, "_api_url", lambda: None)
    store, backend = _store(recorder)
    with caplog.at_level(logging.WARNING, logger="domainsr.stores.pacs"):
        store.list_items({})
        store.list_items({})
    assert recorder["acquired"] == [] and [c[1] for c in backend.calls] == [[], []]
    assert sum("no Prefect API configured" in r.getMessage() for r in caplog.records) == 1


def test_a_limit_the_server_does_not_have_is_skipped_with_one_warning(recorder, monkeypatch, caplog):
    import prefect.client.orchestration as client_module
    from prefect.exceptions import ObjectNotFound

    asked: list[str] = []

    class Client:  # no API is reached (a real get_client here would start an ephemeral server)
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def read_global_concurrency_limit_by_name(self, name):
            asked.append(name)
            raise ObjectNotFound(http_exc=Exception("404"))

    monkeypatch.setattr(pacs, "_LIMITS", {})
    monkeypatch.setattr(client_module, "get_client", lambda sync_client=False, **kw: Client())
    store, _ = _store(recorder)
    with caplog.at_level(logging.WARNING, logger="domainsr.stores.pacs"):
        store.list_items({})
        store.list_items({})
    assert asked == ["pacs-main"] and recorder["acquired"] == []  # asked once per process
    assert sum("prefect gcl create pacs-main" in r.getMessage() for r in caplog.records) == 1


def test_a_slot_that_cannot_be_had_is_a_store_error_naming_the_limit(recorder):
    recorder["fail"] = RuntimeError("API down")
    store, backend = _store(recorder)
    with pytest.raises(StoreError, match="concurrency limit 'pacs-main'") as info:
        store.list_items({})
    assert backend.calls == [] and "series query" in str(info.value)


def test_the_limit_comes_from_the_url_options_or_the_environment(monkeypatch):
    monkeypatch.delenv(pacs.LIMIT_ENV, raising=False)
    assert pacs.PacsStore.from_url("dimse://pacs.example:104?concurrency_limit=pacs-a").concurrency_limit == "pacs-a"
    assert pacs.PacsStore.from_url("dimse://pacs.example:104", concurrency_limit="pacs-b").concurrency_limit == "pacs-b"
    assert pacs.PacsStore.from_url("dimse://pacs.example:104").concurrency_limit is None
    monkeypatch.setenv(pacs.LIMIT_ENV, "pacs-env")
    assert pacs.PacsStore.from_url("dicomweb+http://127.0.0.1:8042/dicom-web").concurrency_limit == "pacs-env"


def test_an_item_from_elsewhere_is_refused_before_any_slot(recorder):
    store, _ = _store(recorder)
    with pytest.raises(Exception, match="no study/series UID"):
        store.read(Item(id="x", uri="file:///x", kind="dicom", meta={}))
    assert recorder["acquired"] == []


def test_the_api_is_the_one_prefect_would_use():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: API}):
        assert pacs._api_url() == API
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert pacs._api_url() is None
