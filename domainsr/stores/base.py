"""The Store interface: where inputs come from and where enhanced outputs go back.

A store lists items, reads one into a SpatialImage (or a band set), writes an enhanced image back
next to / linked to its source, and says whether an output for a given *run key* (a hash of model,
checkpoint and config) already exists, so re-running a flow creates no duplicates.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainsr.image import MultiResolutionImage, SpatialImage


@dataclass(frozen=True)
class Item:
    """One input in a store.

    ``id`` is stable within the store and safe to log and to use in file names: it never contains
    patient identifiers (PACS items use a hash of the series UID, never names or patient IDs).
    """

    id: str
    uri: str
    kind: str  # "nifti" | "dicom" | "raster" | "sentinel2" | "landsat8" | store-specific
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class WriteResult:
    """Where an output landed: ``uri`` of the image, plus any extra artefacts (audit report ...)."""

    uri: str
    extras: dict[str, str] = field(default_factory=dict, hash=False, compare=False)


class Store(ABC):
    """A place that holds inputs and receives outputs."""

    url: str

    @property
    def public_name(self) -> str:
        """What logs and artifacts may call this store (no credentials, no patient paths)."""
        return self.url

    @abstractmethod
    def list_items(self, query: dict[str, Any] | None = None) -> list[Item]:
        """Items matching ``query`` (store-specific keys: modality, dates, bbox, ...)."""

    @abstractmethod
    def read(self, item: Item) -> SpatialImage | MultiResolutionImage:
        """Read one item; raises a DomainSRError naming the item on failure."""

    @abstractmethod
    def write(self, item: Item, image: SpatialImage, run_key: str,
              extras: dict[str, Path] | None = None) -> WriteResult:
        """Write ``image`` (derived from ``item``) atomically; ``extras`` are files to attach
        (audit report HTML/JSON, risk maps). Writing the same ``run_key`` twice must not create a
        duplicate."""

    @abstractmethod
    def existing(self, item: Item, run_key: str) -> WriteResult | None:
        """The output already written for ``item`` with ``run_key``, or ``None``."""
