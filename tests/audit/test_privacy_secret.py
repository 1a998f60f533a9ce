"""Where the pseudonym salt comes from (domainsr.audit.privacy.installation_salt): the environment,
then a Prefect Secret block on the configured API, then this machine's file. Unit level, with the
block look-up replaced; two processes on a real server: tests/flows/test_prefect_deploy.py."""
from __future__ import annotations

import hashlib
import hmac

import pytest

from domainsr.audit import privacy
from domainsr.errors import ConfigError

API = "http://127.0.0.1:9/api"
SALT = "block-salt-0123456789abcdef"


class Loaded:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


@pytest.fixture
def blocks(monkeypatch, tmp_path) -> dict:
    """A fake Secret store: ``blocks["store"]`` name -> value (an exception to raise instead), and
    the names asked for in ``blocks["asked"]``; an API is configured, the file salt is under tmp."""
    from prefect.blocks.system import Secret

    state: dict = {"store": {}, "asked": []}

    def load(name, *args, _sync=None, **kwargs):
        state["asked"].append(name)
        value = state["store"].get(name)
        if value is None:
            raise ValueError(f"Unable to find block document named {name} for block type secret")
        if isinstance(value, BaseException):
            raise value
        return Loaded(value)

    monkeypatch.setattr(Secret, "load", staticmethod(load))
    monkeypatch.setattr(privacy, "_api_url", lambda: API)
    monkeypatch.setattr(privacy, "_BLOCK_SALTS", {})
    monkeypatch.delenv(privacy.SALT_ENV, raising=False)
    monkeypatch.delenv(privacy.SALT_BLOCK_ENV, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    return state


def _hmac(salt: str, value: str) -> str:
    return "anon-" + hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()[:12]


def test_the_block_gives_the_salt_and_is_read_once_per_process(blocks, tmp_path):
    blocks["store"][privacy.SALT_BLOCK] = SALT
    assert privacy.pseudonym("patient-42") == _hmac(SALT, "patient-42")
    assert privacy.pseudonym("patient-43") == _hmac(SALT, "patient-43")
    assert blocks["asked"] == [privacy.SALT_BLOCK]
    assert not privacy.salt_path().exists()  # no machine salt was made


def test_the_environment_wins_over_the_block(blocks, monkeypatch):
    blocks["store"][privacy.SALT_BLOCK] = SALT
    monkeypatch.setenv(privacy.SALT_ENV, "env-salt")
    assert privacy.pseudonym("x") == _hmac("env-salt", "x") and blocks["asked"] == []


def test_without_the_default_block_the_machine_file_is_used(blocks):
    salt = privacy.installation_salt()
    assert privacy.salt_path().read_bytes().strip() == salt and blocks["asked"] == [privacy.SALT_BLOCK]


def test_without_an_api_no_block_is_asked_for(blocks, monkeypatch):
    monkeypatch.setattr(privacy, "_api_url", lambda: None)
    privacy.installation_salt()
    assert blocks["asked"] == [] and privacy.salt_path().exists()


def test_none_turns_the_lookup_off(blocks, monkeypatch):
    blocks["store"][privacy.SALT_BLOCK] = SALT
    monkeypatch.setenv(privacy.SALT_BLOCK_ENV, "none")
    assert privacy.installation_salt() != SALT.encode() and blocks["asked"] == []


def test_a_named_block_is_used_and_must_exist(blocks, monkeypatch):
    monkeypatch.setenv(privacy.SALT_BLOCK_ENV, "site-salt")
    with pytest.raises(ConfigError, match="no Secret block of that name") as info:
        privacy.installation_salt()
    assert "site-salt" in str(info.value)
    blocks["store"]["site-salt"] = SALT
    monkeypatch.setattr(privacy, "_BLOCK_SALTS", {})
    assert privacy.installation_salt() == SALT.encode()


def test_a_named_block_without_an_api_is_an_error(blocks, monkeypatch):
    monkeypatch.setenv(privacy.SALT_BLOCK_ENV, "site-salt")
    monkeypatch.setattr(privacy, "_api_url", lambda: None)
    with pytest.raises(ConfigError, match="no Prefect API is configured"):
        privacy.installation_salt()


def test_an_unreachable_api_is_an_error_not_another_salt(blocks):
    import httpx

    blocks["store"][privacy.SALT_BLOCK] = httpx.ConnectError("connection refused")
    with pytest.raises(ConfigError, match="is the Prefect server up"):
        privacy.installation_salt()
    assert not privacy.salt_path().exists()


@pytest.mark.parametrize("value", ["", "   ", {"salt": "x"}])
def test_a_block_must_hold_a_non_empty_string_and_the_error_never_shows_it(blocks, value):
    blocks["store"][privacy.SALT_BLOCK] = value if value else "  "
    with pytest.raises(ConfigError, match="non-empty string") as info:
        privacy.installation_salt()
    assert "'x'" not in str(info.value)


def test_the_api_is_the_one_prefect_would_use(monkeypatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: API}):
        assert privacy._api_url() == API
    with temporary_settings(updates={PREFECT_API_URL: None}):
        assert privacy._api_url() is None  # Prefect's ephemeral mode: no block is looked up
