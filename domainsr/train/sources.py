"""The training source of a config: where ``data.source`` is, reading it, and the file records
(with hashes) a model card keeps of it."""
from __future__ import annotations

from pathlib import Path

from domainsr.errors import ConfigError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.models.checkpoints import FileRecord, sha256_file
from domainsr.train.config import TrainConfig


def source_path(config: TrainConfig) -> Path:
    """Where ``data.source`` is: a sample name (fetched), ``pydicom:<test file>`` or a path."""
    return resolve_source(config.data.source)


def resolve_source(src: str) -> Path:
    """Where training source ``src`` is: a core sample name (fetched when missing), an extra sample
    already in the cache (``domainsr data fetch``), ``pydicom:<test file>`` or a path."""
    if src.startswith("pydicom:"):
        from pydicom.data import get_testdata_file

        found = get_testdata_file(src.split(":", 1)[1], download=False)
        if found is None:
            raise ConfigError(f"pydicom has no test file {src.split(':', 1)[1]!r}")
        return Path(str(found))
    if "/" not in src and not Path(src).exists():
        from domainsr.data import NAMES, available_samples, fetch_sample_data, sample_path

        if src in NAMES:
            return Path(fetch_sample_data()[src])
        if src in available_samples():
            return sample_path(src)
        raise ConfigError(f"data source {src!r} is neither a file nor a sample ({', '.join(NAMES)}, or an "
                          "extra in the cache: run `domainsr data fetch`)")
    return Path(src)


def open_source(src: str) -> SpatialImage | MultiResolutionImage:
    """Source ``src`` read as it is (a band set stays one): a sample with the domain its manifest
    records, a ``pydicom:`` test file or a path."""
    return _open(src)[1]


def _open(src: str) -> tuple[Path, SpatialImage | MultiResolutionImage]:
    from domainsr.io import read_image

    path = resolve_source(src)
    options: dict[str, str] = {}
    if "/" not in src and not src.startswith("pydicom:") and not Path(src).exists():
        from domainsr.data import sample_domain

        domain = sample_domain(src)
        if domain:
            options["domain"] = domain
    return path, read_image(path, **options)


def read_source(src: str, bands: list[str] | None = None) -> SpatialImage:
    """Training source ``src`` (:func:`open_source`) with ``bands`` selected (required for a band set)."""
    path, img = _open(src)
    bands = list(bands or [])
    if isinstance(img, MultiResolutionImage):
        if not bands:
            raise ConfigError(f"{path} holds bands {list(img.band_names)}: name data.bands to train on")
        return img.select(bands)
    if bands:
        missing = [b for b in bands if b not in img.band_names]
        if missing:
            raise ConfigError(f"bands {missing} not in {list(img.band_names)}", path)
        idx = [img.band_names.index(b) for b in bands]
        img = img.derive(img.data[idx], band_names=tuple(bands))
    img.provenance.setdefault("source", str(path))
    return img


def load_source(config: TrainConfig) -> SpatialImage:
    """The HR training image of single-grid training: ``data.source`` with ``data.bands`` selected."""
    return read_source(config.data.source, config.data.bands)


def source_files(img: SpatialImage, bands: list[str]) -> list[FileRecord]:
    """The files ``img`` was read from (those of ``bands`` for a band folder), hashed."""
    files = img.provenance.get("files") or [img.source]
    if isinstance(files, dict):  # band -> file (band-set readers)
        files = [f for b, f in files.items() if not bands or b in bands]
    paths = []
    for f in files:
        p = Path(str(f))
        if p.is_dir():
            paths += [q for q in sorted(p.iterdir()) if q.is_file()
                      and (not bands or any(b.upper() in q.name.upper() for b in bands))]
        elif p.is_file():
            paths.append(p)
    return [FileRecord(path=str(p), sha256=sha256_file(p)) for p in paths]


__all__ = ["load_source", "open_source", "read_source", "resolve_source", "source_files", "source_path"]
