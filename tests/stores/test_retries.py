"""One retry rule (domainsr.retry) for the flows, the pipeline and the stores: what is transient,
exponential backoff with jitter and a cap, Retry-After honoured, attempts bounded. No test waits
for real: ``sleep`` is a list's ``append``."""
from __future__ import annotations

import email.utils
import logging
import re
import time
import urllib.error

import pytest
import requests
from store_servers import RangeServer

from domainsr.app import enhance
from domainsr.errors import (
    ConfigError,
    DomainSRError,
    GeometryError,
    InputError,
    ModelCardMismatch,
    ModelError,
    OutputError,
    ResourceLimitError,
    StoreError,
)
from domainsr.retry import (
    PERMANENT_ERRORS,
    TRANSIENT_ERRORS,
    PermanentStoreError,
    RetryPolicy,
    TransientError,
    is_transient,
    parse_retry_after,
    retry_after,
)
from domainsr.stores import http
from domainsr.stores.http import call_with_retries
from flows import common

URL = "dicomweb+http://h:1/dw"


def _http_error(status: int, headers: dict[str, str] | None = None) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    response.headers.update(headers or {})
    return requests.HTTPError(response=response)


def _raise(exc: BaseException):
    def fn():
        raise exc
    return fn


class RasterioIOError(OSError):
    """Stands for rasterio.errors.RasterioIOError (GDAL's errors carry only text)."""


RasterioIOError.__module__ = "rasterio.errors"


def _chained(exc: BaseException, cause: BaseException) -> BaseException:
    exc.__cause__ = cause
    return exc


TABLE = [
    # DomainSR's own errors: a store failure is transient unless the store refused
    (StoreError("PACS timeout"), True), (PermanentStoreError("HTTP 403"), False), (OutputError("nfs"), True),
    (InputError("corrupt"), False), (GeometryError("two grids"), False), (ConfigError("bad"), False),
    (ModelError("bad weights"), False), (ModelCardMismatch("wrong domain"), False),
    (ResourceLimitError("too slow"), False), (DomainSRError("other"), False),
    # HTTP answers
    (_http_error(503), True), (_http_error(429), True), (_http_error(504), True), (_http_error(408), True),
    (_http_error(401), False), (_http_error(404), False), (_http_error(400), False),
    (urllib.error.HTTPError("http://h", 502, "Bad Gateway", {}, None), True),  # type: ignore[arg-type]
    (RuntimeError("HTTP response code: 503"), True), (RuntimeError("HTTP response code: 403"), False),
    # network, TLS
    (requests.ConnectionError("refused"), True), (requests.Timeout("slow"), True),
    (requests.exceptions.ChunkedEncodingError("cut"), True),
    (ConnectionRefusedError(111, "Connection refused"), True), (ConnectionResetError(), True),
    (TimeoutError(), True), (urllib.error.URLError("down"), True), (TransientError("association aborted"), True),
    (requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"), False),
    (_chained(ValueError("bad answer"), ConnectionResetError()), True),
    # bugs, bad data, missing things
    (TypeError("bug"), False), (AttributeError("bug"), False), (ValueError("bad json"), False),
    (KeyError("x"), False), (ModuleNotFoundError("prefect_dask"), False), (FileNotFoundError("x"), False),
    (PermissionError("x"), False),
    # GDAL: only its text says more
    (RasterioIOError("'/vsicurl/x.tif' does not exist in the file system"), False),
    (RasterioIOError("HTTP response code: 503"), True), (RasterioIOError("CURL error: couldn't connect"), True),
    # anything else is retried, as Prefect would
    (OSError(5, "Input/output error"), True), (OSError("disk"), True), (RuntimeError("CUDA OOM"), True),
    # never a cancellation
    (KeyboardInterrupt(), False), (SystemExit(1), False),
]


@pytest.mark.parametrize(("exc", "transient"), TABLE, ids=[f"{type(e).__name__}:{e}"[:60] for e, _ in TABLE])
def test_one_transient_table(exc, transient):
    assert is_transient(exc) is transient


def test_pipeline_flows_and_stores_share_the_one_rule():
    assert enhance.is_transient is http.is_transient is common.is_transient is is_transient
    assert PERMANENT_ERRORS and TRANSIENT_ERRORS


def test_a_store_error_carries_its_verdict():
    assert PermanentStoreError.transient is False and issubclass(PermanentStoreError, StoreError)
    err = StoreError("x")
    err.transient = False  # type: ignore[attr-defined]  # how any StoreError may say so
    assert not is_transient(err)


def test_a_store_fails_transiently_after_its_tries_and_permanently_at_once():
    policy = RetryPolicy(tries=3, base_delay=0.01)
    with pytest.raises(StoreError, match="failed after 3 tries: HTTP 503") as err:
        call_with_retries(_raise(_http_error(503)), what="query", url=URL, policy=policy, sleep=lambda s: None)
    assert is_transient(err.value)  # the flow retries the item later
    with pytest.raises(PermanentStoreError, match="query failed: HTTP 404"):
        call_with_retries(_raise(_http_error(404)), what="query", url=URL, policy=policy, sleep=lambda s: None)


def test_attempts_are_capped():
    calls = []

    def down():
        calls.append(1)
        raise requests.ConnectionError("refused")

    waits: list[float] = []
    with pytest.raises(StoreError, match="failed after 5 tries"):
        call_with_retries(down, what="q", url=URL, policy=RetryPolicy(tries=5, base_delay=0.1), sleep=waits.append)
    assert len(calls) == 5 and len(waits) == 4
    with pytest.raises(StoreError, match="failed after 1 try:"):
        call_with_retries(down, what="q", url=URL, policy=RetryPolicy(tries=1), sleep=waits.append)
    assert len(waits) == 4


def test_backoff_is_exponential_and_capped_without_jitter():
    waits: list[float] = []
    policy = RetryPolicy(tries=6, base_delay=0.5, factor=2, max_delay=3, jitter=0)
    with pytest.raises(StoreError):
        call_with_retries(_raise(TimeoutError()), what="q", url=URL, policy=policy, sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_jitter_spreads_the_waits_within_bounds():
    policy = RetryPolicy(tries=4, base_delay=0.2, factor=2, max_delay=10, jitter=1.0)
    runs = []
    for _ in range(30):
        waits: list[float] = []
        with pytest.raises(StoreError):
            call_with_retries(_raise(TimeoutError()), what="q", url=URL, policy=policy, sleep=waits.append)
        runs.append(waits)
    for n, nominal in enumerate((0.2, 0.4, 0.8)):
        column = [w[n] for w in runs]
        assert all(nominal - 1e-9 <= w <= nominal + 0.2 + 1e-9 for w in column)  # at most one base delay added
        assert len({round(w, 6) for w in column}) > 20  # clients do not retry in lockstep


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_honoured(status, caplog):
    caplog.set_level(logging.WARNING, logger="domainsr")
    answers = [_http_error(status, {"Retry-After": "7"})]
    waits: list[float] = []

    def busy():
        if answers:
            raise answers.pop()
        return "ok"

    policy = RetryPolicy(tries=3, base_delay=0.1, jitter=1.0)
    assert call_with_retries(busy, what="query", url=URL, policy=policy, sleep=waits.append) == "ok"
    assert len(waits) == 1 and 7.0 <= waits[0] <= 7.1  # what the server asked, plus jitter
    assert re.search(r"query at .*: HTTP \d{3} .*; retry 1 of 2 in 7\.\d\d s \(Retry-After\)", caplog.text)


def test_retry_after_is_ignored_where_it_means_nothing():
    assert retry_after(_http_error(500, {"Retry-After": "7"})) is None
    assert retry_after(_http_error(503)) is None and retry_after(TimeoutError()) is None
    waits: list[float] = []
    with pytest.raises(StoreError):
        call_with_retries(_raise(_http_error(503, {"Retry-After": "soon"})), what="q", url=URL,
                          policy=RetryPolicy(tries=2, base_delay=0.1, jitter=0), sleep=waits.append)
    assert waits == [0.1]  # unreadable: the plain backoff


def test_retry_after_http_date_against_a_fixed_clock():
    now = 1_780_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after(date, now=now) == pytest.approx(42.0)
    assert parse_retry_after(email.utils.formatdate(now - 5, usegmt=True), now=now) == 0.0  # in the past
    assert parse_retry_after(" 120 ") == 120.0
    assert parse_retry_after(None) is None and parse_retry_after("tomorrow") is None and parse_retry_after("-3") is None
    urllib_err = urllib.error.HTTPError("http://h", 429, "Too Many", {"Retry-After": date}, None)  # type: ignore[arg-type]
    assert retry_after(urllib_err, now=now) == pytest.approx(42.0)


def test_a_retry_after_beyond_the_limit_ends_the_retries_at_once():
    waits: list[float] = []
    calls = []

    def busy():
        calls.append(1)
        raise _http_error(503, {"Retry-After": "3600"})

    with pytest.raises(StoreError, match="asks to retry in 3600 s") as err:
        call_with_retries(busy, what="query", url=URL, policy=RetryPolicy(tries=5, max_retry_after=60),
                          sleep=waits.append)
    assert calls == [1] and waits == [] and is_transient(err.value)


def test_retry_after_from_a_loopback_server(tmp_path):
    """A real 503 answer with an HTTP-date Retry-After, through requests and the store session."""
    (tmp_path / "a.json").write_text("{}")
    with RangeServer(tmp_path) as server:
        date = email.utils.formatdate(time.time() + 30, usegmt=True)
        server.failures.set(count=1, methods=("GET",), status=503, headers={"Retry-After": date})
        session = http.http_session(http.HttpAuth(), True, server.url)
        waits: list[float] = []

        def get():
            r = session.get(server.url + "/a.json", timeout=5)
            r.raise_for_status()
            return r.json()

        assert call_with_retries(get, what="get", url=server.url, policy=RetryPolicy(base_delay=0.1),
                                 sleep=waits.append) == {}
    assert len(waits) == 1 and 28.0 <= waits[0] <= 30.2  # HTTP dates have a one-second resolution


def test_invalid_policies_are_config_errors():
    for bad in ({"tries": 0}, {"base_delay": -1}, {"factor": 0.5}, {"jitter": -0.1}, {"max_retry_after": -1}):
        with pytest.raises(ConfigError):
            RetryPolicy(**bad)
    assert RetryPolicy.from_options({"retries": "4", "backoff": "0.1"}) == RetryPolicy(tries=4, base_delay=0.1)
    with pytest.raises(ConfigError, match="must be numbers"):
        RetryPolicy.from_options({"retries": "many"})
