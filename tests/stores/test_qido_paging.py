"""QIDO-RS paging against loopback fakes: pages are followed only on the 299 "more results"
warning, a server that ignores ``offset`` (and always warns) ends the search, and the number of
pages is capped."""
from __future__ import annotations

import logging

import pytest
from store_servers import MORE_RESULTS, QidoServer

from domainsr.stores import pacs
from domainsr.stores.pacs import PacsStore, truncated_results


def _list(server: QidoServer) -> list:
    return PacsStore.from_url(server.url, auth="none", retries=1).list_items({})


def test_truncated_results_are_paged_with_offset():
    with QidoServer(total=250, limit=100) as server:
        items = _list(server)
    assert len(items) == 250 and len({i.id for i in items}) == 250
    assert server.offsets == [0, 100, 200]


def test_a_server_that_ignores_offset_and_always_warns_terminates(caplog):
    caplog.set_level(logging.WARNING, logger="domainsr")
    with QidoServer(total=500, limit=100, ignore_offset=True, always_warn=True) as server:
        items = _list(server)
    assert len(items) == 100 and server.offsets == [0, 100]  # the repeat is noticed at once
    assert "repeated itself at offset 100" in caplog.text


def test_pages_are_capped(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="domainsr")
    monkeypatch.setattr(pacs, "QIDO_MAX_PAGES", 5)
    with QidoServer(total=None, limit=10) as server:  # endless, every page new and "truncated"
        items = _list(server)
    assert len(items) == 50 and server.offsets == [0, 10, 20, 30, 40]
    assert "still truncated after 5 pages" in caplog.text


def test_other_warnings_do_not_page():
    with QidoServer(total=500, limit=100, warning='199 orthanc "Miscellaneous warning"') as server:
        items = _list(server)
    assert len(items) == 100 and server.offsets == [0]


def test_a_complete_answer_with_a_warning_and_an_empty_page_end_the_search():
    with QidoServer(total=100, limit=100, always_warn=True) as server:  # warns on its last, full page
        items = _list(server)
    assert len(items) == 100 and server.offsets == [0, 100]  # the empty page ends it


def test_the_instance_count_of_a_derived_series_pages_the_same_way():
    with QidoServer(total=500, limit=100, ignore_offset=True, always_warn=True) as server:
        backend = PacsStore.from_url(server.url, auth="none").backend
        count, recorded, key = backend.stamp("1.2.3.4", "1.2.3.4.5")
    assert (count, recorded, key) == (100, None, None)
    assert server.offsets == [0, 100, 0]  # two QIDO pages, then the metadata of one instance


@pytest.mark.parametrize(("header", "truncated"), [
    (MORE_RESULTS, True), ('299 pacs "Additional results can be requested"', True),
    ('199 pacs "misc", ' + MORE_RESULTS, True), ('199 pacs "Miscellaneous"', False),
    ('110 pacs "Response is stale"', False), ("", False), (None, False),
])
def test_only_the_299_warning_means_more_results(header, truncated):
    headers = {} if header is None else {"Warning": header}
    assert truncated_results(headers) is truncated
