"""What every networked store shares: store URLs and their options, secrets, TLS, retries.

Store URLs carry *where* a store is and its non-secret options as query parameters; secrets are
never written in a URL or a config file, only *named* there:

* ``env:NAME`` - the environment variable ``NAME``;
* ``prefect:NAME`` - the Prefect ``Secret`` block ``NAME`` (``prefect.blocks.system.Secret``).

A literal password or token is refused. Secrets live in :class:`HttpAuth`, whose ``repr`` hides
them, and reach the wire only through ``requests`` auth hooks (never through URLs or headers that
clients log). Error messages name the store by :func:`redact_url` (no user info, no secret-looking
query values).

Transient failures (connection refused or reset, timeouts, HTTP 408/425/429/5xx, a DIMSE
association that cannot be opened; :func:`domainsr.retry.is_transient`) are retried by
:func:`call_with_retries`: a bounded number of tries, capped exponential backoff with jitter, and
the ``Retry-After`` of a 429/503 answer honoured. The last failed try becomes a :class:`StoreError`
(still transient: the flow retries the item later), a permanent failure (HTTP 4xx, a certificate
problem) a :class:`~domainsr.retry.PermanentStoreError` at once. ``RetryPolicy``,
``TransientError``, ``http_status`` and ``is_transient`` (:mod:`domainsr.retry`) can be imported
from here too.
TLS certificates are verified unless a store is told ``verify=false`` explicitly.
"""
from __future__ import annotations

import logging
import os
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import tenacity

from domainsr.errors import ConfigError, DomainSRError, StoreError
from domainsr.retry import (
    BUGS,
    PermanentStoreError,
    RetryPolicy,
    TransientError,
    exception_chain,
    http_status,
    is_transient,
    retry_after,
)

log = logging.getLogger("domainsr.stores")
T = TypeVar("T")

_SECRET_PARAM = re.compile(r"pass|token|secret|key|auth|sig|credential", re.IGNORECASE)
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


# ----------------------------------------------------------------------------------- store URLs

def redact_url(url: str) -> str:
    """``url`` without user info and with secret-looking query values replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return _USERINFO.sub("", url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = urlencode([(k, "***" if _SECRET_PARAM.search(k) else v)
                       for k, v in parse_qsl(parts.query, keep_blank_values=True)], safe="*:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def split_store_url(url: str, known: set[str], opts: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a store URL into ``(url without its options, options)``.

    Query parameters named in ``known`` are options; keyword ``opts`` (a config block) override
    them. Other query parameters stay on the URL. An unknown keyword option is an error.
    """
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ConfigError(f"unknown store option(s) {unknown}; options are {sorted(known)}", redact_url(url))
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ConfigError("credentials do not belong in a store URL; use the username/password/token "
                          "options with env:NAME or prefect:NAME", redact_url(url))
    found: dict[str, Any] = {}
    rest = []
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if k in known:
            found[k] = v
        else:
            rest.append((k, v))
    found.update(opts)
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, urlencode(rest), parts.fragment))
    return clean, found


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"option {name}={value!r} is not a boolean (true/false)")


def tls_verify(value: Any) -> bool | str:
    """``verify`` option: ``True`` (default), ``False`` (explicit opt-out) or a CA bundle path."""
    if value is None:
        return True
    if isinstance(value, bool):
        return value
    text = str(value).strip()
    if text.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return as_bool(text, "verify")
    if not os.path.isfile(text):
        raise ConfigError("verify must be true, false or the path of a CA bundle file", text)
    return text


# -------------------------------------------------------------------------------------- secrets

def resolve_secret(ref: str | None, what: str, *, literal_ok: bool = False) -> str | None:
    """The value named by ``ref`` (``env:NAME`` or ``prefect:NAME``); ``None`` passes through.

    With ``literal_ok`` (user names, AE titles) any other string is the value itself; otherwise
    a literal is refused, so a password never sits in a URL, a config file or a shell history.
    """
    if ref is None or ref == "":
        return None
    ref = str(ref)
    if ref.startswith("env:"):
        name = ref[4:]
        if name not in os.environ:
            raise ConfigError(f"{what}: environment variable {name} is not set")
        return os.environ[name]
    if ref.startswith("prefect:"):
        name = ref[8:]
        try:
            from prefect.blocks.system import Secret

            value = Secret.load(name).get()
        except Exception as exc:  # noqa: BLE001 - any failure to load the block is a config problem
            raise ConfigError(f"{what}: cannot load Prefect Secret block {name!r} "
                              f"({type(exc).__name__})") from None
        return str(value)
    if literal_ok:
        return ref
    raise ConfigError(f"{what} must be given as env:NAME (an environment variable) or prefect:NAME "
                      "(a Prefect Secret block), never literally")


@dataclass(frozen=True)
class HttpAuth:
    """HTTP authentication: ``kind`` is ``"none"``, ``"basic"`` or ``"bearer"``. ``repr`` hides secrets."""

    kind: str = "none"
    username: str | None = None
    password: str | None = None
    token: str | None = None

    def __repr__(self) -> str:
        return f"HttpAuth(kind={self.kind!r}, username={'set' if self.username else None})"

    @classmethod
    def from_options(cls, opts: Mapping[str, Any], env_prefix: str) -> HttpAuth:
        """From ``auth``/``username``/``password``/``token`` options; each defaults to the
        environment variable ``{env_prefix}_USERNAME`` / ``_PASSWORD`` / ``_TOKEN`` when set."""
        def ref(key: str) -> str | None:
            if opts.get(key) not in (None, ""):
                return str(opts[key])
            env = f"{env_prefix}_{key.upper()}"
            return f"env:{env}" if env in os.environ else None

        user = resolve_secret(ref("username"), "username", literal_ok=True)
        password = resolve_secret(ref("password"), "password")
        token = resolve_secret(ref("token"), "token")
        kind = str(opts.get("auth") or ("bearer" if token else "basic" if user or password else "none"))
        if kind == "basic" and (user is None or password is None):
            raise ConfigError(f"basic authentication needs a username and a password "
                              f"(options username/password, or {env_prefix}_USERNAME/_PASSWORD)")
        if kind == "bearer" and not token:
            raise ConfigError(f"bearer authentication needs a token (option token, or {env_prefix}_TOKEN)")
        if kind not in ("none", "basic", "bearer"):
            raise ConfigError(f"auth={kind!r}: expected none, basic or bearer")
        return cls(kind, user, password, token)

    def header(self) -> str | None:
        """The ``Authorization`` header value (for clients that take a header file, e.g. GDAL)."""
        if self.kind == "basic":
            import base64

            raw = f"{self.username}:{self.password}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        if self.kind == "bearer":
            return f"Bearer {self.token}"
        return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme.lower(), (parts.hostname or "").lower(), port


def same_origin(url: str, base: str) -> bool:
    """Whether ``url`` is on the scheme, host and port of ``base`` (credentials go nowhere else)."""
    return _origin(url) == _origin(base)


def http_session(auth: HttpAuth, verify: bool | str, origin: str) -> Any:
    """A ``requests.Session`` for a store at ``origin``: TLS verification on unless opted out, and
    ``auth`` added by the transport adapter to requests for that origin only.

    Adding the Authorization header in the adapter (not as ``session.auth``) keeps it out of what
    clients log: pystac-client logs each prepared request's headers at DEBUG level. The origin
    check keeps it off redirects and assets on other hosts. ``verify`` set on the store is
    authoritative: plain requests lets ``REQUESTS_CA_BUNDLE`` / ``CURL_CA_BUNDLE`` (and callers
    such as pystac-client passing ``verify=True``) override a session's CA bundle or opt-out; with
    ``verify=True`` those variables still choose the bundle.
    """
    import requests
    from requests.adapters import HTTPAdapter

    from domainsr import __version__

    header = auth.header()

    class AuthAdapter(HTTPAdapter):
        def add_headers(self, request: Any, **kwargs: Any) -> None:
            if header is not None and same_origin(request.url, origin):
                request.headers["Authorization"] = header

        def __repr__(self) -> str:
            return "AuthAdapter(***)"

    class StoreSession(requests.Session):
        def merge_environment_settings(self, url: Any, proxies: Any, stream: Any, verify: Any,
                                       cert: Any) -> dict[str, Any]:
            settings = super().merge_environment_settings(url, proxies, stream, verify, cert)
            if self.verify is not True:
                settings["verify"] = self.verify
            return settings

    session = StoreSession()
    adapter = AuthAdapter()
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = verify
    session.headers["User-Agent"] = f"domainsr/{__version__}"
    if verify is False:
        log.warning("TLS certificate verification is switched off for %s (verify=false)", redact_url(origin))
    return session


# --------------------------------------------------------------------------------------- extras

def extra_file_name(name: str, path: str | os.PathLike[str]) -> str:
    """File name of an extra: ``name`` when it has the file's suffix (``audit.html``), else
    ``name`` + the file's suffixes; made safe for any file system."""
    suffix = "".join(Path(path).suffixes[-2:]) if str(path).endswith(".nii.gz") else Path(path).suffix
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "extra"
    return safe if safe.endswith(suffix) else safe + suffix


# -------------------------------------------------------------------------------------- retries

def describe(exc: BaseException) -> str:
    """A short, credential-free description of ``exc``."""
    if isinstance(exc, TransientError):
        return str(exc)
    status = http_status(exc)
    if status is not None:
        response = getattr(exc, "response", None)
        reason = getattr(response, "reason", "") or getattr(exc, "reason", "") or ""
        if not (isinstance(reason, str) and reason):
            try:
                reason = HTTPStatus(status).phrase
            except ValueError:
                reason = ""
        return f"HTTP {status}{' ' + reason if reason else ''}"
    for e in exception_chain(exc):
        if (isinstance(e, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY_FAILED" in str(e)
                or "SSL certificate problem" in str(e)):
            return "TLS certificate verification failed"
        if isinstance(e, ssl.SSLError):
            return f"TLS error ({e.reason or type(e).__name__})"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, (TimeoutError,)) or "timed out" in str(e).lower():
            return "timed out"
        if isinstance(e, ConnectionError) and not type(e).__module__.startswith("requests"):
            return f"connection failed ({e.strerror or type(e).__name__})"
    text = str(exc) or type(exc).__name__
    text = _USERINFO.sub("", text)
    text = re.sub(r"(?i)(authorization:?\s*)(basic|bearer)\s+\S+", r"\1***", text)
    return text if len(text) <= 300 else text[:297] + "..."


def call_with_retries(fn: Callable[[], T], *, what: str, url: str, policy: RetryPolicy,
                      sleep: Callable[[float], None] = time.sleep) -> T:
    """Run ``fn``; retry transient failures per ``policy`` (backoff with jitter, ``Retry-After``).

    A failure that is still there after the last try raises a (transient) :class:`StoreError`,
    a permanent one at once a :class:`PermanentStoreError`; both name ``what`` and the redacted
    store ``url``. A :class:`DomainSRError` or a bug raised by ``fn`` passes through unchanged.
    """
    safe = redact_url(url)
    retrying = policy.retrying(_retry_in_store, sleep=sleep, before_sleep=partial(_log_retry, what, safe, policy))
    try:
        return retrying(fn)
    except (DomainSRError, *BUGS):
        raise
    except Exception as exc:
        raise _store_error(exc, what, safe, policy, retrying.statistics.get("attempt_number", 1)) from exc


def _retry_in_store(exc: BaseException) -> bool:
    return not isinstance(exc, DomainSRError) and is_transient(exc)


def _log_retry(what: str, url: str, policy: RetryPolicy, state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    wait = state.next_action.sleep if state.next_action else 0.0
    asked = " (Retry-After)" if exc is not None and retry_after(exc) is not None else ""
    log.warning("%s at %s: %s; retry %d of %d in %.2f s%s", what, url, describe(exc) if exc else "?",
                state.attempt_number, policy.tries - 1, wait, asked)


def _store_error(exc: Exception, what: str, url: str, policy: RetryPolicy, tries: int) -> StoreError:
    if not is_transient(exc):
        return PermanentStoreError(f"{what} failed: {describe(exc)}", url)
    asked = retry_after(exc)
    if asked is not None and asked > policy.max_retry_after:
        return StoreError(f"{what} failed: {describe(exc)}; the store asks to retry in {asked:.0f} s "
                          f"(more than {policy.max_retry_after:.0f} s)", url)
    return StoreError(f"{what} failed after {tries} {'try' if tries == 1 else 'tries'}: {describe(exc)}; "
                      "the store looks unavailable", url)
