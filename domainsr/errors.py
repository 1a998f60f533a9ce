"""Typed errors. Every error names the file (or item) it is about and what is wrong with it."""
from __future__ import annotations

from os import PathLike


class DomainSRError(Exception):
    """Base class of every error DomainSR raises on purpose."""

    def __init__(self, message: str, path: str | PathLike[str] | None = None) -> None:
        self.path = None if path is None else str(path)
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class InputError(DomainSRError):
    """An input file or folder cannot be read: missing, truncated, corrupt or not an image."""


class UnsupportedFormatError(InputError):
    """The file is readable but its format, dtype or layout is not supported."""


class GeometryError(InputError):
    """The spatial metadata is inconsistent (missing slice, mixed orientations, no CRS, ...)."""


class OutputError(DomainSRError):
    """An output cannot be written."""


class ConfigError(DomainSRError):
    """A configuration file or option is invalid."""


class ModelError(DomainSRError):
    """A model cannot be built or loaded, or its checkpoint fails verification."""


class ModelCardMismatch(ModelError):
    """The input does not match what the model card says the model expects."""


class ResourceLimitError(DomainSRError):
    """The work would exceed a configured resource budget (memory, size)."""


class StoreError(DomainSRError):
    """A data store (PACS, STAC, folder) failed or refused a request; retried unless ``transient``
    is false (see :func:`domainsr.retry.is_transient`)."""

    transient = True


class PermanentStoreError(StoreError):
    """A store failure that retrying cannot fix: the store refused the request (HTTP 4xx, a
    rejected association, an unsupported SOP class, an output name it will not write)."""

    transient = False
