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
association that cannot be opened) are retried by :func:`call_with_retries` with bounded
exponential backoff; anything else, or the last failed try, becomes a :class:`StoreError`.
TLS certificates are verified unless a store is told ``verify=false`` explicitly.
"""
from __future__ import annotations

import logging
import os
import re
import ssl
import time
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from domainsr.errors import ConfigError, DomainSRError, StoreError

log = logging.getLogger("domainsr.stores")
T = TypeVar("T")

# Bugs are not store failures: these propagate unchanged instead of becoming a StoreError.
_PROGRAMMING_ERRORS = (TypeError, AttributeError, NameError, AssertionError, NotImplementedError)
TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
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

class TransientError(Exception):
    """Raised by store code for a failure worth retrying that no library exception describes
    (e.g. a DIMSE association that was aborted or rejected transiently)."""


@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` attempts in all; the wait before retry ``n`` (1-based) is
    ``min(max_delay, base_delay * factor**(n-1))`` seconds."""

    tries: int = 3
    base_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 8.0

    def __post_init__(self) -> None:
        if self.tries < 1 or self.base_delay < 0 or self.factor < 1 or self.max_delay < 0:
            raise ConfigError(f"invalid retry policy {self}")

    def delay(self, retry: int) -> float:
        return min(self.max_delay, self.base_delay * self.factor ** (retry - 1))

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> RetryPolicy:
        try:
            return cls(tries=int(opts.get("retries", cls.tries)),
                       base_delay=float(opts.get("backoff", cls.base_delay)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"retries/backoff options must be numbers ({exc})") from None


def http_status(exc: BaseException) -> int | None:
    """The HTTP status carried by ``exc`` (requests, urllib or GDAL curl errors), if any."""
    response = getattr(exc, "response", None)
    if response is not None and getattr(response, "status_code", None) is not None:
        return int(response.status_code)
    if isinstance(exc, urllib.error.HTTPError):
        return int(exc.code)
    code = getattr(exc, "status_code", None)  # pystac-client's APIError
    if isinstance(code, int):
        return code
    m = re.search(r"HTTP (?:response )?(?:code|status)[: ]+(\d{3})", str(exc), re.IGNORECASE)
    return int(m.group(1)) if m else None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in list(seen):  # urllib3 keeps the root cause in .reason / args
        for inner in (getattr(e, "reason", None), *getattr(e, "args", ())):
            if isinstance(inner, BaseException) and inner not in seen:
                seen.append(inner)
    return seen


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (network trouble or a 408/425/429/5xx answer)."""
    if isinstance(exc, DomainSRError):
        return False
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_HTTP_STATUS
    try:
        import requests

        network: tuple[type[BaseException], ...] = (requests.ConnectionError, requests.Timeout)
    except ImportError:  # pragma: no cover - requests comes with every networked store
        network = ()
    chain = _chain(exc)
    if any(isinstance(e, ssl.SSLError) or type(e).__name__ == "SSLError" or "ssl certificate problem" in
           str(e).lower() for e in chain):
        return False  # a certificate problem does not go away by retrying
    for e in chain:
        if isinstance(e, (TransientError, ConnectionError, TimeoutError, *network)):
            return True
        if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
            return True
        text = str(e).lower()
        if "curl error" in text or "connection refused" in text or "timed out" in text:
            return True  # GDAL's /vsicurl/ reports network failures as text only
    return False


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
    for e in _chain(exc):
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
    """Run ``fn``; retry transient failures per ``policy``; raise :class:`StoreError` naming
    ``what`` and the (redacted) store ``url`` when it still fails or fails permanently.
    A :class:`DomainSRError` from ``fn`` passes through unchanged."""
    safe = redact_url(url)
    for attempt in range(1, policy.tries + 1):
        try:
            return fn()
        except (DomainSRError, *_PROGRAMMING_ERRORS):
            raise
        except Exception as exc:
            if not is_transient(exc):
                raise StoreError(f"{what} failed: {describe(exc)}", safe) from exc
            if attempt == policy.tries:
                raise StoreError(f"{what} failed after {policy.tries} tries: {describe(exc)}; "
                                 "the store looks unavailable", safe) from exc
            wait = policy.delay(attempt)
            log.warning("%s at %s: %s; retry %d of %d in %.2f s", what, safe, describe(exc),
                        attempt, policy.tries - 1, wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
