"""What ``domainsr audit --sr SR --lr LR [--reference HR]`` audits: one pair, or a batch.

* one SR file (or DICOM series / band-set folder) and its LR: one audit, reports in ``DIR``;
* ``--sr`` and ``--lr`` folders of images: items matched by stem (an LR ``<id>.*`` with the SR
  ``<id>_sr.*``, else the SR of the same stem ``<id>.*``; a ``--reference`` folder: ``<id>.*`` or
  ``<id>_hr.*``), reports in ``DIR/<item>/``;
* several ``--sr``/``--lr`` (and ``--reference``) given in order: one item per pair, reports in
  ``DIR/<item>/``.

Images in a folder: files of a known image format (NIfTI, GeoTIFF/COG/JP2...) and sub-folders (a
DICOM series, a band set); a folder that itself holds DICOM files, or is a band set, is one image.
An LR without its SR (or reference) is a problem of that item only: the batch runs the others. In
an LR folder that also holds the outputs, ``<id>_sr*`` (an output and its extras) is no LR.
Item names (the report folders) follow the audit's privacy rule: a raster's stem as it is, a
medical image's a pseudonym (:func:`~domainsr.audit.privacy.public_stem`; medical file and folder
names often carry the patient's name).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from domainsr.errors import ConfigError, DomainSRError, InputError

MEDICAL_FORMATS = ("nifti", "dicom")


@dataclass(frozen=True)
class AuditPair:
    """One audit of a batch: its name (the report folder) and its files."""

    item: str
    sr: str
    lr: str
    reference: str | None = None


@dataclass(frozen=True)
class AuditBatch:
    """The pairs to audit, the items that cannot be (one message each), and whether the reports go
    into one folder per item (folders or several pairs were given) or straight into ``DIR``."""

    pairs: list[AuditPair]
    problems: list[str]
    per_item: bool


def is_image_folder(path: Path) -> bool:
    """Whether folder ``path`` is one image (a band set, or a folder that holds DICOM files)."""
    from domainsr.io.formats import FOLDER_DEFAULT, file_format, folder_format

    if folder_format(path) != FOLDER_DEFAULT:
        return True
    return any(f.is_file() and not f.name.startswith(".") and file_format(f) == "dicom" for f in path.iterdir())


def folder_images(folder: Path) -> dict[str, Path]:
    """The images of a batch folder by stem (``brain.nii.gz`` -> ``brain``), sorted."""
    from domainsr.io.formats import file_format, strip_suffix

    found: dict[str, Path] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            found.setdefault(entry.name, entry)
        elif file_format(entry) not in (None, "dicom"):
            found.setdefault(strip_suffix(entry.name), entry)
    return found


def item_name(path: str | Path, stem: str | None = None) -> str:
    """The report folder of an item: ``stem`` (default: the file's) for a raster, a pseudonym for a
    medical image (or anything whose format is unknown)."""
    from domainsr.audit.privacy import public_stem
    from domainsr.io import detect_format
    from domainsr.io.formats import strip_suffix

    try:
        medical = detect_format(path) in MEDICAL_FORMATS
    except DomainSRError:
        medical = True
    if medical:
        return public_stem(path, "mri")
    return stem or strip_suffix(Path(str(path).rstrip("/")).name)


def _sr_stem(stem: str) -> str:
    return stem[:-3] if stem.endswith("_sr") and len(stem) > 3 else stem


def _is_batch_folder(path: Path) -> bool:
    return path.is_dir() and not is_image_folder(path)


def plan_audits(srs: Sequence[str | Path], lrs: Sequence[str | Path],
                references: Sequence[str | Path] = ()) -> AuditBatch:
    """The audits of ``--sr``/``--lr``/``--reference`` (see the module doc). A ConfigError (a usage
    error: nothing is audited) when the counts differ, a folder is paired with a file, a path is
    missing, or the folders hold no image at all."""
    srs, lrs, refs = [Path(p) for p in srs], [Path(p) for p in lrs], [Path(p) for p in references]
    if not srs or len(srs) != len(lrs):
        raise ConfigError(f"give one --lr per --sr (got {len(srs)} --sr and {len(lrs)} --lr)")
    if refs and len(refs) != len(srs):
        raise ConfigError(f"give one --reference per --sr, or none (got {len(refs)} for {len(srs)} --sr)")
    for p in (*srs, *lrs, *refs):
        if not p.exists():
            raise InputError("no such file or folder", p)
    pairs: list[AuditPair] = []
    problems: list[str] = []
    per_item = len(srs) > 1
    for k, (sr, lr) in enumerate(zip(srs, lrs)):
        ref = refs[k] if refs else None
        folders = [_is_batch_folder(p) for p in (sr, lr, *([ref] if ref else []))]
        if any(folders) and not all(folders):
            raise ConfigError("--sr, --lr (and --reference) must all be folders of images or all be images", sr)
        if not folders[0]:
            pairs.append(AuditPair(item_name(sr, _sr_stem(_stem(sr))), str(sr), str(lr),
                                   None if ref is None else str(ref)))
            continue
        per_item = True
        found, missing = _match_folder(sr, lr, ref)
        if not found and not missing:
            raise InputError("no images found in the --lr folder", lr)
        pairs += found
        problems += missing
    return AuditBatch(_unique(pairs), problems, per_item)


def _stem(path: Path) -> str:
    from domainsr.io.formats import strip_suffix

    return strip_suffix(path.name) if path.is_file() else path.name


def _match_folder(sr: Path, lr: Path, ref: Path | None) -> tuple[list[AuditPair], list[str]]:
    srs, lrs = folder_images(sr), folder_images(lr)
    refs = folder_images(ref) if ref is not None else {}
    # an LR folder that also holds the outputs (`domainsr enhance DIR --out DIR`): <id>_sr* is no LR
    lrs = {stem: p for stem, p in lrs.items() if not any(stem.startswith(f"{o}_sr") for o in lrs if o != stem)}
    pairs, problems = [], []
    for stem, lr_path in lrs.items():
        sr_path = next((srs[s] for s in (f"{stem}_sr", stem) if s in srs and srs[s] != lr_path), None)
        name = item_name(lr_path, stem)
        if sr_path is None:
            problems.append(f"{name}: no SR image {stem}_sr.* or {stem}.* in the --sr folder")
            continue
        ref_path = next((refs[s] for s in (stem, f"{stem}_hr") if s in refs), None)
        if ref is not None and ref_path is None:
            problems.append(f"{name}: no reference {stem}.* or {stem}_hr.* in the --reference folder")
            continue
        pairs.append(AuditPair(name, str(sr_path), str(lr_path), None if ref_path is None else str(ref_path)))
    return pairs, problems


def heldout_items(references: Sequence[str | Path]) -> list[tuple[str, str]]:
    """``(item name, reference)`` of each reference of a held-out batch (names made unique)."""
    pairs = _unique([AuditPair(item_name(r), str(r), str(r)) for r in references])
    return [(p.item, p.sr) for p in pairs]


def _unique(pairs: list[AuditPair]) -> list[AuditPair]:
    """Item names made unique (``name``, ``name-2``, ...): two folders of the same stem."""
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        n = seen[p.item] = seen.get(p.item, 0) + 1
        out.append(p if n == 1 else AuditPair(f"{p.item}-{n}", p.sr, p.lr, p.reference))
    return out


__all__ = ["AuditBatch", "AuditPair", "folder_images", "heldout_items", "is_image_folder", "item_name",
           "plan_audits"]
