"""What is worth retrying, and how long to wait first: one rule for the flows, the app and
the stores.

What :func:`is_transient` decides (first match wins):

* ``StoreError``: transient unless its ``transient`` is false, as for a :class:`PermanentStoreError`
  (the store refused: HTTP 4xx, a rejected association); ``OutputError``: transient (a full disk
  or share may recover); any other ``DomainSRError`` (input, config, model, resource limit): not;
* a bug (``TypeError``, ``AttributeError``, ...): not;
* an HTTP answer (requests, urllib, pystac-client, GDAL text): 408, 425, 429, 500, 502, 503, 504;
* a TLS certificate problem anywhere in the chain: not;
* a network failure anywhere in the chain (refused, reset, timed out, a curl error) or a
  :class:`TransientError`: transient;
* bad data (``ValueError``, ``LookupError``), a missing module, a missing file or no permission,
  and a GDAL error with no status or network text: not;
* anything else (an I/O error, CUDA out of memory, ...): transient, as Prefect retries by default;
  ``KeyboardInterrupt`` and other non-``Exception`` errors never are.

So a store's :func:`~domainsr.stores.http.call_with_retries` retries a transient failure a few
times with backoff and then raises a ``StoreError`` that is still transient (the flow retries the
item later); a permanent failure becomes a :class:`PermanentStoreError`, which nothing retries.

:class:`RetryPolicy` waits with exponential backoff plus random jitter (tenacity), capped, and
honours the ``Retry-After`` of a 429/503 answer.
"""
from __future__ import annotations

import datetime as dt
import email.utils
import random
import re
import time
import urllib.error
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import tenacity

from domainsr.errors import (
    ConfigError,
    DomainSRError,
    InputError,
    ModelError,
    OutputError,
    PermanentStoreError,
    ResourceLimitError,
    StoreError,
)

TRANSIENT_HTTP_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
RETRY_AFTER_STATUS = frozenset({429, 503})


class TransientError(Exception):
    """Raised by store code for a failure worth retrying that no library exception describes
    (e.g. a DIMSE association that was aborted or rejected transiently)."""


#: Bugs: never retried, and stores let them through unchanged (they are not store failures).
BUGS: tuple[type[BaseException], ...] = (TypeError, AttributeError, NameError, AssertionError,
                                         NotImplementedError)
#: Never retried: retrying cannot fix bad input, config, model, a resource limit, a refusal, a
#: bug, bad data, a missing module or file.
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (
    InputError, ConfigError, ModelError, ResourceLimitError, PermanentStoreError, *BUGS,
    ImportError, ValueError, LookupError, ArithmeticError,
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)
#: Always retried (a ``StoreError`` unless its ``transient`` is false).
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (StoreError, OutputError, TransientError,
                                                     ConnectionError, TimeoutError)

_STATUS_TEXT = re.compile(r"HTTP (?:response )?(?:code|status)[: ]+(\d{3})", re.IGNORECASE)
_NETWORK_TEXT = ("curl error", "connection refused", "timed out")  # GDAL's /vsicurl/ has only text


# ----------------------------------------------------------------------------- classification

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
    m = _STATUS_TEXT.search(str(exc))
    return int(m.group(1)) if m else None


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc``, its causes and contexts, and the root causes urllib3 keeps in ``reason``/``args``."""
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    for e in list(seen):
        for inner in (getattr(e, "reason", None), *getattr(e, "args", ())):
            if isinstance(inner, BaseException) and inner not in seen:
                seen.append(inner)
    return seen


def _network_errors() -> tuple[type[BaseException], ...]:
    import http.client

    import requests

    return (TransientError, ConnectionError, TimeoutError, http.client.IncompleteRead, requests.ConnectionError,
            requests.Timeout, requests.exceptions.ChunkedEncodingError)


def _certificate_problem(e: BaseException) -> bool:
    import ssl

    return (isinstance(e, ssl.SSLError) or type(e).__name__ == "SSLError"
            or "ssl certificate problem" in str(e).lower())


def _network_failure(e: BaseException) -> bool:
    if isinstance(e, _network_errors()):
        return True
    if isinstance(e, urllib.error.URLError) and not isinstance(e, urllib.error.HTTPError):
        return True
    text = str(e).lower()
    return any(t in text for t in _NETWORK_TEXT)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying what failed with ``exc`` may succeed (see the module docstring's table)."""
    if not isinstance(exc, Exception):
        return False  # KeyboardInterrupt, SystemExit, a cancellation
    if isinstance(exc, DomainSRError):
        return isinstance(exc, TRANSIENT_ERRORS) and bool(getattr(exc, "transient", True))
    if isinstance(exc, BUGS):
        return False
    status = http_status(exc)
    if status is not None:
        return status in TRANSIENT_HTTP_STATUS
    chain = exception_chain(exc)
    if any(_certificate_problem(e) for e in chain):
        return False  # a certificate problem does not go away by retrying
    if any(_network_failure(e) for e in chain):
        return True
    if isinstance(exc, PERMANENT_ERRORS):
        return False
    return not type(exc).__module__.startswith("rasterio")  # GDAL errors say nothing more


# ---------------------------------------------------------------------------------- Retry-After

def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date (relative to
    ``now``, a POSIX time, default the current time); ``None`` when absent or unreadable."""
    text = (value or "").strip()
    if not text:
        return None
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def retry_after(exc: BaseException | None, now: float | None = None) -> float | None:
    """The wait a 429/503 answer in ``exc`` asks for with ``Retry-After``, if any."""
    if exc is None or http_status(exc) not in RETRY_AFTER_STATUS:
        return None
    headers = getattr(getattr(exc, "response", None), "headers", None) or getattr(exc, "headers", None)
    return parse_retry_after(headers.get("Retry-After"), now) if headers is not None else None


# ------------------------------------------------------------------------------------- policy

@dataclass(frozen=True)
class RetryPolicy:
    """``tries`` attempts in all. Before retry ``n`` (1-based) it waits
    ``min(max_delay, base_delay * factor**(n-1))`` seconds plus a random jitter of up to
    ``jitter * base_delay``; when a 429/503 answer's ``Retry-After`` asks for longer, that (plus
    the jitter). An answer asking for more than ``max_retry_after`` seconds ends the retries at
    once: the flow's own, later retry of the item is the better place to wait that long."""

    tries: int = 3
    base_delay: float = 0.5
    factor: float = 2.0
    max_delay: float = 8.0
    jitter: float = 1.0
    max_retry_after: float = 60.0

    def __post_init__(self) -> None:
        if (self.tries < 1 or self.base_delay < 0 or self.factor < 1 or self.max_delay < 0
                or self.jitter < 0 or self.max_retry_after < 0):
            raise ConfigError(f"invalid retry policy {self}")

    @classmethod
    def from_options(cls, opts: Mapping[str, Any]) -> RetryPolicy:
        """From a store's ``retries`` (tries in all) and ``backoff`` (first wait, s) options."""
        try:
            return cls(tries=int(opts.get("retries", cls.tries)),
                       base_delay=float(opts.get("backoff", cls.base_delay)))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"retries/backoff options must be numbers ({exc})") from None

    def backoff(self) -> tenacity.wait.wait_base:
        """Capped exponential backoff plus jitter, as a tenacity wait strategy."""
        return (tenacity.wait_exponential(multiplier=self.base_delay, exp_base=self.factor, max=self.max_delay)
                + tenacity.wait_random(0, self.jitter * self.base_delay))

    def wait(self, state: tenacity.RetryCallState) -> float:
        """Seconds before the next try: the backoff, or longer if ``Retry-After`` asks for it."""
        wait = self.backoff()(state)
        asked = retry_after(state.outcome.exception() if state.outcome else None)
        if asked is None:
            return wait
        return max(wait, asked + random.uniform(0, self.jitter * self.base_delay))

    def stop(self, state: tenacity.RetryCallState) -> bool:
        """After ``tries`` attempts, or when the server asks to wait more than ``max_retry_after``."""
        asked = retry_after(state.outcome.exception() if state.outcome else None)
        return state.attempt_number >= self.tries or (asked is not None and asked > self.max_retry_after)

    def retrying(self, retry_if: Callable[[BaseException], bool], *,
                 sleep: Callable[[float], None] = time.sleep,
                 before_sleep: Callable[[tenacity.RetryCallState], None] | None = None) -> tenacity.Retrying:
        """A tenacity ``Retrying`` that retries exceptions for which ``retry_if`` holds and
        re-raises the last one when it stops."""
        return tenacity.Retrying(stop=self.stop, wait=self.wait, retry=tenacity.retry_if_exception(retry_if),
                                 sleep=sleep, before_sleep=before_sleep, reraise=True)
