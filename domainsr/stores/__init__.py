"""Where data lives: ``open_store(url_or_config)`` gives a :class:`~domainsr.stores.base.Store`.

Local paths and ``file://`` URLs open a :class:`~domainsr.stores.local.LocalStore`. Other schemes
are served by modules imported only when such a URL is opened, so a missing optional dependency
(``pip install 'domainsr[stores]'``) breaks only that scheme:

==========================================  ==========================
scheme                                      module
==========================================  ==========================
``dicomweb://``, ``dicomweb+http(s)://``    ``domainsr.stores.pacs``
``dimse://``                                ``domainsr.stores.pacs``
``stac+http://``, ``stac+https://``,        ``domainsr.stores.stac``
``stac+file://``
==========================================  ==========================

Such a module provides ``from_url(url: str, *, output: str | None = None, **options) -> Store``.

Outputs: ``output`` (``--out``, ``store.output``) is where outputs go; a store URL's own
``?output=`` option and ``output`` must then agree (a contradiction is a ConfigError naming both).
``default_output`` (e.g. the config's ``output.dir``) applies only when neither names one.
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlparse, urlsplit

from domainsr.config import StoreConfig
from domainsr.errors import ConfigError, StoreError
from domainsr.stores.base import Item, Store, WriteResult

__all__ = ["SCHEMES", "Item", "Store", "WriteResult", "expand", "open_store", "url_option"]

#: URL scheme -> module with a ``from_url`` function (imported lazily).
SCHEMES: dict[str, str] = {
    "dicomweb": "domainsr.stores.pacs",
    "dicomweb+http": "domainsr.stores.pacs",
    "dicomweb+https": "domainsr.stores.pacs",
    "dimse": "domainsr.stores.pacs",
    "stac+http": "domainsr.stores.stac",
    "stac+https": "domainsr.stores.stac",
    "stac+file": "domainsr.stores.stac",
}


def expand(value: str) -> str:
    """``~`` and ``$VARS`` expanded; a variable that is not set is an error, not a literal."""
    out = os.path.expanduser(os.path.expandvars(value))
    if "$" in out:
        raise ConfigError(f"environment variable not set in {value!r}")
    return out


def url_option(url: str, key: str) -> str | None:
    """The last value of query parameter ``key`` of ``url`` (None when absent)."""
    values = [v for k, v in parse_qsl(urlsplit(str(url)).query, keep_blank_values=True) if k == key]
    return values[-1] if values else None


def _scheme(value: str) -> str:
    if "://" not in value:
        return ""
    return value.split("://", 1)[0].lower()


def open_store(url_or_config: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | StoreConfig, *,
               output: str | os.PathLike[str] | None = None, default_output: str | os.PathLike[str] | None = None,
               domain: str | None = None, output_format: str = "same", nifti_domain: str | None = None,
               **options: Any) -> Store:
    """Open the store a path, a list of local paths, a URL or a ``StoreConfig`` names.

    ``output`` is the output root (overrides the config's; must agree with a URL's ``?output=``);
    ``default_output`` is used when nothing else names one. ``domain`` and ``output_format`` are
    passed to the local store (the domain of NIfTI inputs, and ``same``/``nifti``/``dicom``/``cog``);
    ``nifti_domain`` is the domain of NIfTI inputs when ``domain`` is not set (a NIfTI file has no
    modality: the model's, e.g. ``ct`` for a CT model; else MRI).
    """
    if isinstance(url_or_config, StoreConfig):
        cfg = url_or_config
        if cfg.input is None:
            raise ConfigError("store.input is not set: give inputs on the command line or in the config")
        out = output if output is not None else (expand(cfg.output) if cfg.output else None)
        return open_store(expand(cfg.input), output=out, default_output=default_output, domain=domain,
                          output_format=output_format, nifti_domain=nifti_domain, **{**cfg.options, **options})
    if isinstance(url_or_config, (str, os.PathLike)):
        sources = [url_or_config]
    else:
        sources = list(url_or_config)
        if not sources:
            raise ConfigError("no inputs given")
    schemes = {_scheme(str(s)) for s in sources}
    remote = schemes - {"", "file"}
    if remote:
        if len(sources) != 1:
            raise ConfigError(f"a store URL ({min(remote)}://) must be the only input")
        url = str(sources[0])
        if output is None and url_option(url, "output") is None and "output" not in options:
            output = default_output
        return _open_remote(url, output=output, **options)
    from domainsr.stores.local import LocalStore

    paths = [Path(unquote(urlparse(str(s)).path)) if _scheme(str(s)) == "file" else Path(s) for s in sources]
    return LocalStore(paths, output if output is not None else default_output, domain=domain,
                      output_format=output_format, nifti_domain=nifti_domain, **options)


def _open_remote(url: str, *, output: str | os.PathLike[str] | None, **options: Any) -> Store:
    scheme = _scheme(url)
    module_name = SCHEMES.get(scheme)
    if module_name is None:
        raise ConfigError(f"unknown store scheme {scheme + '://'!r}; known: file://, "
                          + ", ".join(f"{s}://" for s in SCHEMES))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise StoreError(f"the {scheme}:// store is not available ({exc}); "
                         "install it with: pip install 'domainsr[stores]'") from exc
    from_url = getattr(module, "from_url", None)
    if from_url is None:
        raise StoreError(f"{module_name} has no from_url(url, output=..., **options)")
    return from_url(url, output=None if output is None else str(output), **options)
