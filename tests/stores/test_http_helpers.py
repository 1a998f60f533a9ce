"""Shared store helpers: URL options and redaction, secrets from env / Prefect blocks, retries
with backoff, what counts as transient (re-exported from domainsr.retry: the full table and the
jitter / Retry-After checks are in test_retries.py), credentials only for the store's own origin."""
from __future__ import annotations

import logging
import urllib.error

import pytest
import requests
from store_servers import RangeServer, closed_port

from domainsr.errors import ConfigError, InputError, StoreError
from domainsr.retry import PermanentStoreError
from domainsr.stores.http import (
    HttpAuth,
    RetryPolicy,
    TransientError,
    call_with_retries,
    extra_file_name,
    http_session,
    is_transient,
    redact_url,
    resolve_secret,
    same_origin,
    split_store_url,
)


def test_redact_url_drops_userinfo_and_secret_values():
    url = "https://alice:pw1@pacs.example:8443/dicom-web?password=hunter2&token=t0k&limit=5&api_key=k"
    red = redact_url(url)
    assert red == "https://pacs.example:8443/dicom-web?password=***&token=***&limit=5&api_key=***"
    for secret in ("alice", "pw1", "hunter2", "t0k"):
        assert secret not in red


def test_split_store_url_separates_known_options_and_refuses_credentials():
    base, opts = split_store_url("stac+https://h/cat.json?output=/o&assets=B02&foo=1", {"output", "assets"},
                                 {"assets": "B03"})
    assert base == "stac+https://h/cat.json?foo=1" and opts == {"output": "/o", "assets": "B03"}
    with pytest.raises(ConfigError, match="credentials do not belong"):
        split_store_url("dicomweb://u:p@h/x", set(), {})
    with pytest.raises(ConfigError, match="unknown store option"):
        split_store_url("dicomweb://h/x", {"verify"}, {"verfy": True})


def test_secrets_come_from_env_or_prefect_blocks_never_literals(monkeypatch):
    monkeypatch.setenv("MY_PW", "s3")
    assert resolve_secret("env:MY_PW", "password") == "s3"
    assert resolve_secret(None, "password") is None
    assert resolve_secret("DOMAINSR", "calling_aet", literal_ok=True) == "DOMAINSR"
    with pytest.raises(ConfigError, match="never literally"):
        resolve_secret("s3", "password")
    with pytest.raises(ConfigError, match="MISSING_VAR is not set") as err:
        resolve_secret("env:MISSING_VAR", "password")
    assert "s3" not in str(err.value)

    from prefect.blocks import system

    loaded = []

    class FakeSecret:
        def __init__(self, name):
            self.name = name

        @classmethod
        def load(cls, name):
            loaded.append(name)
            if name != "pacs-password":
                raise ValueError(f"no block {name}")
            return cls(name)

        def get(self):
            return "from-block"

    monkeypatch.setattr(system, "Secret", FakeSecret)
    assert resolve_secret("prefect:pacs-password", "password") == "from-block"
    with pytest.raises(ConfigError, match="cannot load Prefect Secret block 'nope'"):
        resolve_secret("prefect:nope", "password")
    assert loaded == ["pacs-password", "nope"]


def test_http_auth_defaults_from_environment_and_hides_secrets(monkeypatch):
    monkeypatch.setenv("DOMAINSR_X_USERNAME", "bob")
    monkeypatch.setenv("DOMAINSR_X_PASSWORD", "pw-xyz")
    auth = HttpAuth.from_options({}, "DOMAINSR_X")
    assert (auth.kind, auth.username, auth.password) == ("basic", "bob", "pw-xyz")
    assert "pw-xyz" not in repr(auth) and "bob" not in repr(auth)
    assert auth.header() == "Basic Ym9iOnB3LXh5eg=="
    monkeypatch.setenv("TOK", "abc")
    assert HttpAuth.from_options({"token": "env:TOK"}, "NONE").header() == "Bearer abc"
    with pytest.raises(ConfigError, match="needs a username and a password"):
        HttpAuth.from_options({"auth": "basic"}, "NONE")
    assert HttpAuth.from_options({}, "NONE").header() is None


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(response=response)


@pytest.mark.parametrize(("exc", "transient"), [
    (_http_error(503), True), (_http_error(429), True), (_http_error(504), True),
    (_http_error(401), False), (_http_error(404), False), (_http_error(400), False),
    (requests.ConnectionError("refused"), True), (requests.Timeout("slow"), True),
    (ConnectionRefusedError(111, "Connection refused"), True), (TimeoutError(), True),
    (urllib.error.URLError("down"), True), (TransientError("association aborted"), True),
    (requests.exceptions.SSLError("CERTIFICATE_VERIFY_FAILED"), False),
    (RuntimeError("HTTP response code: 503"), True), (RuntimeError("HTTP response code: 403"), False),
    (ValueError("bad json"), False), (InputError("not found", "x"), False),
])
def test_transient_classification(exc, transient):
    assert is_transient(exc) is transient


def test_call_with_retries_backs_off_then_fails_clearly(caplog):
    caplog.set_level(logging.WARNING, logger="domainsr")
    waits: list[float] = []
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise _http_error(503)
        return "ok"

    url = "dicomweb+http://h:1/dw?password=env:P"
    policy = RetryPolicy(tries=3, base_delay=0.2, jitter=0)
    assert call_with_retries(flaky, what="query", url=url, policy=policy, sleep=waits.append) == "ok"
    assert waits == [0.2, 0.4] and len(calls) == 3

    waits.clear()
    with pytest.raises(StoreError) as err:
        call_with_retries(lambda: (_ for _ in ()).throw(requests.ConnectionError("x")), what="query", url=url,
                          policy=policy, sleep=waits.append)
    assert waits == [0.2, 0.4]
    assert str(err.value).startswith("dicomweb+http://h:1/dw?password=***: query failed after 3 tries")
    assert "retry 2 of 2 in 0.40 s" in caplog.text and "env:P" not in caplog.text

    waits.clear()
    with pytest.raises(PermanentStoreError, match="query failed: HTTP 403 Forbidden"):
        call_with_retries(lambda: (_ for _ in ()).throw(_http_error(403)), what="query", url=url,
                          policy=policy, sleep=waits.append)
    assert waits == []  # permanent errors are not retried
    with pytest.raises(TypeError):  # a bug is not a store failure
        call_with_retries(lambda: (_ for _ in ()).throw(TypeError("bug")), what="query", url=url,
                          policy=policy, sleep=waits.append)


def test_credentials_go_only_to_the_store_origin(tmp_path):
    """The Authorization header is added for the store's scheme/host/port only: not for assets
    or redirects elsewhere."""
    (tmp_path / "a.txt").write_text("a")
    with RangeServer(tmp_path) as mine, RangeServer(tmp_path) as other:
        session = http_session(HttpAuth("basic", "u", "pw"), True, mine.url + "/catalog.json")
        assert session.get(mine.url + "/a.txt", timeout=5).text == "a"
        assert session.get(other.url + "/a.txt", timeout=5).text == "a"
        assert mine.log[-1][3] == "Basic dTpwdw==" and other.log[-1][3] is None
    assert same_origin("https://h/x", "https://h:443/y") and not same_origin("http://h/x", "https://h/x")
    assert not same_origin(f"http://127.0.0.1:{closed_port()}/", "http://127.0.0.1/")


def test_extra_file_names():
    assert extra_file_name("audit.html", "/t/report.html") == "audit.html"
    assert extra_file_name("risk", "/t/risk.nii.gz") == "risk.nii.gz"
    assert extra_file_name("risk.nii.gz", "/t/x.nii.gz") == "risk.nii.gz"
    assert extra_file_name("../evil name", "/t/a.json") == "evil_name.json"
