"""A store over local files and folders: inputs in place, outputs under one output root.

Listing walks the given files and folders (hidden names and the output root are skipped):

* ``*.nii`` / ``*.nii.gz``: one NIfTI item each;
* ``*.tif`` / ``*.tiff`` / ``*.jp2`` / ``*.vrt`` / ``*.img``: one raster item each;
* a folder that is a Sentinel-2 or Landsat 8 band set: one item (the whole folder);
* DICOM files (``*.dcm``, or any file with the ``DICM`` preamble), anywhere below the inputs:
  grouped into one item per series (SeriesInstanceUID). A file that claims to be DICOM but cannot
  be parsed becomes an item of its own that fails when read, so it is reported, not lost.

Item ids are safe file names: the input's path relative to the folder it was found in (``/``
becomes ``_``, the image suffix dropped), with a short hash of the path appended when two would
collide; a DICOM series is ``<modality>-<hash of its SeriesInstanceUID>`` and an unreadable DICOM
file ``dicom-file-<hash of its path>``, never a patient name, ID or DICOM file name. An explicitly given file of an unknown type is still an item (it fails when read).

Outputs are named ``<id><output_suffix>`` (suffix default ``_sr``) and keep the input's format
(``output_format="same"``): NIfTI -> ``<id>_sr.nii.gz`` (``.nii`` stays ``.nii``), DICOM -> a
derived series folder ``<id>_sr/``, rasters and band sets -> a COG ``<id>_sr.tif``; ``"nifti"``,
``"dicom"`` or ``"cog"`` force one format. Extras (audit report, risk map) land beside it as
``<id>_sr.<label>``; a derived DICOM series whose extras hold the audit's risk map (and region
label map and report) also gets them as DICOM on its planes: ``<id>_sr.risk.dcm`` (Parametric Map)
and ``<id>_sr.regions.seg.dcm`` (Segmentation) (:mod:`domainsr.stores.maps`).
Every file is written atomically (temporary sibling, rename), and
``<output>.provenance.json`` is written last: an output without it, or whose ``run_key`` differs,
is not done, so an interrupted run is simply redone. Nothing can be written outside the output root.

Outputs never replace inputs. :meth:`LocalStore.check_output` (called when a run is planned,
before any work) refuses an item whose output files would be an input (the same path, a path
inside or above one, or the same file through a hard link), always; and one whose output files
exist but are not an earlier DomainSR output unless ``overwrite``. An earlier output is ours when
its provenance file names it, or when it carries our derived marker: the NIfTI description
``DomainSR AI-enhanced``, the DICOM ImageType ``AI ENHANCED``, the GeoTIFF tag ``DOMAINSR_DERIVED``.

Besides the Store interface, ``open_output(item)`` / ``commit(item, run_key, extras, provenance)``
let a writer produce the output file in place (the streaming raster path of
:mod:`domainsr.app.enhance`), with the same provenance-last rule.

Formats (suffixes, DICOM sniffing, readers, writers, output names, derived markers) come from the
format table :mod:`domainsr.io.formats`.

Size: one module (about 450 lines) because listing, naming and the never-over-an-input rules are
one contract: output names are checked against the listing that produced them.
"""
from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domainsr.errors import ConfigError, InputError, OutputError, PermanentStoreError, UnsupportedFormatError
from domainsr.image import DOMAINS, MultiResolutionImage, SpatialImage, now_iso
from domainsr.io.atomic import atomic_path
from domainsr.io.formats import (
    FORMATS,
    MEDICAL_DOMAINS,
    OUTPUTS,
    RISK_LABELS,
    default_output,
    detect_format,
    file_format,
    folder_format,
    strip_suffix,
    suffix_of,
)
from domainsr.stores.base import Item, Store, WriteResult
from domainsr.stores.maps import EXPORT_LABELS, dicom_maps

PROVENANCE_SUFFIX = ".provenance.json"
DEFAULT_SUFFIX = "_sr"
#: Labels of the extras an enhanced item gets (checked before a run like the output).
EXTRA_LABELS = ("audit.html", "audit.json", *RISK_LABELS, *EXPORT_LABELS)
KINDS = (*FORMATS, "unknown")
OUTPUT_FORMATS = ("same", *OUTPUTS)
QUERY_KEYS = ("kinds", "glob", "modified_within_hours")
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
_SAFE_SUFFIX = re.compile(r"^[A-Za-z0-9._-]{1,40}$")


def _sha(text: str, n: int = 12) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _slug(rel: str) -> str:
    parts = [strip_suffix(p) if i == len(rel.split("/")) - 1 else p for i, p in enumerate(rel.split("/"))]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", "_".join(parts)).strip("-._")
    return (slug or "item")[:120]


def check_name(name: str, what: str = "name") -> str:
    """``name`` if it is one safe path component (no separators, no ``..``), else StoreError."""
    if not _SAFE.match(name) or ".." in name:
        raise PermanentStoreError(f"unsafe {what} {name!r}: only letters, digits, '.', '_' and '-' are allowed, "
                                  "no path separators or '..'")
    return name


class OutputRefused(ConfigError):
    """An output would write over an input, or replace a file that is not an earlier DomainSR
    output (a setting to change: ``--out``, ``--suffix`` or ``--overwrite``; never retried)."""


@dataclass
class _InputIndex:
    """Every input path of a listing, for the never-write-over-an-input check."""

    paths: set[Path] = field(default_factory=set)  # files and band-set folders (resolved)
    parents: set[Path] = field(default_factory=set)  # every folder above them
    folders: list[Path] = field(default_factory=list)  # band-set folders: all below is input
    inodes: set[tuple[int, int]] = field(default_factory=set)  # (device, inode): hard links

    def add(self, path: Path, folder: bool = False) -> None:
        rp = path.resolve()
        self.paths.add(rp)
        self.parents.update(rp.parents)
        if folder:
            self.folders.append(rp)
        try:
            st = rp.stat()
        except OSError:
            return
        self.inodes.add((st.st_dev, st.st_ino))

    def holds(self, path: Path) -> bool:
        """Whether writing ``path`` (a file, or a folder replaced whole) would replace an input."""
        rp = path.resolve()
        if rp in self.paths or rp in self.parents or any(rp.is_relative_to(f) for f in self.folders):
            return True
        try:
            st = path.stat()
        except OSError:
            return False
        return (st.st_dev, st.st_ino) in self.inodes


class LocalStore(Store):
    """Inputs: files and folders (see the module doc); outputs: files under ``output``, named
    ``<item id><output_suffix>``; ``overwrite`` lets an output replace a file that is not ours."""

    def __init__(self, inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 output: str | os.PathLike[str] | None = None, *, domain: str | None = None,
                 output_format: str = "same", recursive: bool = True, output_suffix: str = DEFAULT_SUFFIX,
                 overwrite: bool = False, nifti_domain: str | None = None) -> None:
        paths = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
        if not paths:
            raise ConfigError("no inputs given")
        self.inputs = [Path(p).expanduser() for p in paths]
        self.output = None if output is None else Path(output).expanduser()
        if output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"unknown output format {output_format!r}; expected one of {OUTPUT_FORMATS}")
        if domain not in (None, *DOMAINS):
            raise ConfigError(f"unknown domain {domain!r}")
        if output_suffix and (not _SAFE_SUFFIX.match(output_suffix) or ".." in output_suffix):
            raise ConfigError(f"output suffix {output_suffix!r} may hold only letters, digits, '.', '_' and '-'")
        self.domain = domain
        self.nifti_domain = nifti_domain
        self.output_format = output_format
        self.recursive = recursive
        self.output_suffix = output_suffix
        self.overwrite = overwrite
        self.url = self.inputs[0].resolve().as_uri()
        self.skipped: list[str] = []  # files seen by the last listing that are not images
        self._seen: list[tuple[Path, bool]] = []  # (path, is a band-set folder) of the last listing
        self._index: _InputIndex | None = None

    def __repr__(self) -> str:
        return f"LocalStore({[str(p) for p in self.inputs]!r}, output={str(self.output)!r})"

    @property
    def public_name(self) -> str:
        """The input paths are left out: medical export folders are often named after the patient."""
        return f"local files ({len(self.inputs)} input path(s)) -> {self.output}"

    # ---- listing ----------------------------------------------------------------------------------
    def list_items(self, query: dict[str, Any] | None = None) -> list[Item]:
        """Items under the inputs, filtered by ``query``: ``kinds`` (list of kinds), ``glob`` (a
        pattern, or list, matched against the item's relative path), ``modified_within_hours``
        (newest file of the item modified within that many hours)."""
        query = dict(query or {})
        unknown = sorted(set(query) - set(QUERY_KEYS))
        if unknown:
            raise ConfigError(f"unknown local store query key(s) {unknown}; known: {list(QUERY_KEYS)}")
        found: list[tuple[str, str, Path, dict[str, Any]]] = []  # (kind, relative path, path, meta)
        dicom_files: list[Path] = []
        self.skipped = []
        out_root = self.output.resolve() if self.output is not None else None
        for inp in self.inputs:
            if not inp.exists():
                raise InputError("no such file or folder", inp)
            if inp.is_file():
                kind = file_format(inp)
                if kind == "dicom":
                    dicom_files.append(inp)
                else:
                    found.append((kind or "unknown", inp.name, inp, {}))
            else:
                self._walk(inp, inp, found, dicom_files, out_root)
        self._seen = [(p, _is_band_set(kind)) for kind, _, p, _ in found]
        self._seen += [(p, False) for p in (*dicom_files, *map(Path, self.skipped))]
        self._index = None
        items = self._named(found)
        items += self._dicom_items(dicom_files)
        return [i for i in sorted(items, key=lambda i: i.id) if self._matches(i, query)]

    def _walk(self, root: Path, folder: Path, found: list, dicom_files: list[Path], out_root: Path | None) -> None:
        if out_root is not None and folder.resolve() == out_root:
            return
        fmt = folder_format(folder)
        if _is_band_set(fmt):
            rel = folder.relative_to(root).as_posix() if folder != root else folder.name
            found.append((fmt, rel, folder, {}))
            return
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                if self.recursive:
                    self._walk(root, entry, found, dicom_files, out_root)
                continue
            kind = file_format(entry)
            if kind == "dicom":
                dicom_files.append(entry)
            elif kind is not None:
                found.append((kind, entry.relative_to(root).as_posix(), entry, {}))
            else:
                self.skipped.append(str(entry))

    @staticmethod
    def _named(found: list[tuple[str, str, Path, dict[str, Any]]]) -> list[Item]:
        slugs = [_slug(rel) for _, rel, _, _ in found]
        counts = Counter(slugs)
        items = []
        for (kind, rel, path, meta), slug in zip(found, slugs):
            if counts[slug] > 1:
                slug = f"{slug}-{_sha(str(path.resolve()), 6)}"
            fmt = FORMATS.get(kind)
            kept = fmt is not None and OUTPUTS[fmt.output].keeps_suffix
            extra = {"suffix": suffix_of(path.name)} if kept else {}
            items.append(Item(id=slug, uri=str(path), kind=kind, meta={"path": str(path), **extra, **meta}))
        return items

    def _dicom_items(self, files: list[Path]) -> list[Item]:
        if not files:
            return []
        from domainsr.io.dicom import list_series

        listing = list_series(files)
        items = []
        for s in listing:
            id_ = f"{(s.modality or 'dicom').lower()}-{_sha(s.series_uid)}"
            if s.volume is not None:  # one item per volume of a multi-volume series (b-values, time points)
                id_ += f"-v{s.volume}"
            folder = Path(os.path.commonpath([str(f.parent) for f in s.files]))
            items.append(Item(id=check_name(id_), uri=str(folder), kind="dicom",
                              meta={"files": [str(f) for f in s.files], "series_uid": s.series_uid,
                                    "modality": s.modality, "slices": s.n_frames, "volume": s.volume}))
        for path, problem in listing.errors.items():  # named by a hash: DICOM file names may carry names
            id_ = f"dicom-file-{_sha(str(Path(path).resolve()))}"
            items.append(Item(id=id_, uri=path, kind="dicom", meta={"files": [path], "error": problem}))
        return items

    @staticmethod
    def _matches(item: Item, query: dict[str, Any]) -> bool:
        kinds = query.get("kinds")
        if kinds is not None and item.kind not in ([kinds] if isinstance(kinds, str) else kinds):
            return False
        patterns = query.get("glob")
        if patterns is not None:
            pats = [patterns] if isinstance(patterns, str) else list(patterns)
            if not any(fnmatch.fnmatch(item.uri, p) or fnmatch.fnmatch(Path(item.uri).name, p) for p in pats):
                return False
        hours = query.get("modified_within_hours")
        if hours is not None:
            files = [Path(f) for f in item.meta.get("files", [item.uri])]
            paths = [p for f in files for p in ([*f.iterdir()] if f.is_dir() else [f])]
            newest = max((p.stat().st_mtime for p in paths if p.exists()), default=0.0)
            if time.time() - newest > float(hours) * 3600.0:
                return False
        return True

    # ---- reading ----------------------------------------------------------------------------------
    def read(self, item: Item) -> SpatialImage | MultiResolutionImage:
        if item.meta.get("error"):
            raise InputError(str(item.meta["error"]), item.uri)
        fmt = FORMATS.get(item.kind)
        if fmt is None:
            detect_format(item.uri)  # raises the precise error for a missing or unknown file
            raise UnsupportedFormatError(f"not an image this store can read (kind {item.kind!r})", item.uri)
        # a medical reader takes the store's domain; without one NIfTI (no modality in the file) is read
        # as ``nifti_domain`` (the model's medical domain) else MRI, DICOM as its Modality says
        domain = self.domain if self.domain in MEDICAL_DOMAINS else (
            self.nifti_domain if item.kind == "nifti" and self.nifti_domain in MEDICAL_DOMAINS else None)
        options: dict[str, Any] = {"domain": domain} if fmt.medical and domain else {}
        if item.kind == "dicom":  # a series: its listed files, and which series and volume of them
            return fmt.read([Path(f) for f in item.meta["files"]], series_uid=item.meta.get("series_uid"),
                            volume=item.meta.get("volume"), **options)
        return fmt.read(item.uri, **options)

    # ---- outputs ----------------------------------------------------------------------------------
    def output_format_of(self, item: Item) -> str:
        """``nifti``, ``dicom`` or ``cog``: the format ``item``'s output is written in."""
        return default_output(item.kind) if self.output_format == "same" else self.output_format

    def output_stem(self, item: Item) -> str:
        """``<item id><output suffix>``: the output's name without its extension; extras are
        ``<stem>.<label>``."""
        return check_name(check_name(item.id, "item id") + self.output_suffix, "output name")

    def output_path(self, item: Item) -> Path:
        """Where ``item``'s output goes (inside the output root)."""
        ext = OUTPUTS[self.output_format_of(item)].name_suffix(item.meta.get("suffix", ""))
        return self._inside(self.output_stem(item) + ext)

    def provenance_path(self, item: Item) -> Path:
        out = self.output_path(item)
        return out.with_name(out.name + PROVENANCE_SUFFIX)

    def _root(self) -> Path:
        if self.output is None:
            raise ConfigError("this store has no output folder (give --out or store.output)")
        return self.output

    def _inside(self, name: str) -> Path:
        if Path(name).is_absolute() or "/" in name or "\\" in name or ".." in name:
            raise PermanentStoreError(f"refused output name {name!r}: it must stay inside the output folder")
        root = self._root().resolve()
        path = root / name
        if not path.resolve().is_relative_to(root):
            raise PermanentStoreError(f"refused output name {name!r}: it resolves outside the output folder", root)
        return path

    # ---- never over an input, never over a file that is not ours --------------------------------
    def check_output(self, item: Item) -> None:
        """Refuse ``item`` (:class:`OutputRefused`, naming the file) when one of its output files
        (output, provenance, extras) would replace an input (always, even with ``overwrite``), or
        would replace an existing file that is not an earlier DomainSR output (unless ``overwrite``)."""
        files = self._output_files(item)
        for path in files:
            self._refuse_input(path)
        present = [p for p in files if p.exists() or p.is_symlink()]
        if present and not self.overwrite and not self._ours(item):
            raise OutputRefused("refused to replace this existing file: it is not a DomainSR output "
                                "(pass --overwrite or store.overwrite: true to replace it, or choose another "
                                "--out or --suffix)", present[0])

    def _output_files(self, item: Item) -> list[Path]:
        stem = self.output_stem(item)
        return [self.output_path(item), self.provenance_path(item),
                *(self._inside(f"{stem}.{label}") for label in EXTRA_LABELS)]

    def _refuse_input(self, path: Path) -> None:
        if self._input_index().holds(path):
            raise OutputRefused("refused to write over an input (choose another --out or --suffix; "
                                "--overwrite never replaces an input)", path)

    def _input_index(self) -> _InputIndex:
        if self._index is None:
            index = _InputIndex()
            for path, folder in self._seen or [(p, False) for p in self.inputs]:  # not listed: as given
                index.add(path, folder)
            self._index = index
        return self._index

    def _ours(self, item: Item) -> bool:
        """Whether ``item``'s existing output files are an earlier DomainSR output: named by its
        provenance record (complete or not), or the output carries our derived marker."""
        out = self.output_path(item)
        try:
            record = json.loads(self.provenance_path(item).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            record = None
        if isinstance(record, dict) and record.get("output") == out.name:
            return True
        return out.exists() and OUTPUTS[self.output_format_of(item)].carries_marker(out)

    def existing(self, item: Item, run_key: str) -> WriteResult | None:
        """The finished output of ``item`` for ``run_key``: its provenance file exists, names the
        run key and is complete, and every file it lists is there."""
        try:
            prov_path = self.provenance_path(item)
            record = json.loads(prov_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("run_key") != run_key or not record.get("complete"):
            return None
        out = self.output_path(item)
        extras = {k: str(self._inside(Path(v).name)) for k, v in (record.get("extras") or {}).items()}
        if not out.exists() or not all(Path(p).exists() for p in extras.values()):
            return None
        return WriteResult(uri=str(out), extras=extras)

    def write(self, item: Item, image: SpatialImage, run_key: str,
              extras: dict[str, Path] | None = None) -> WriteResult:
        """Write ``image`` in ``item``'s output format, then the extras, then the provenance file."""
        fmt = OUTPUTS[self.output_format_of(item)]
        problem = fmt.problem(image)
        if problem:  # a config error, not worth a retry
            raise ConfigError(f"output format {fmt.name!r} does not fit this {item.kind} item: {problem}", item.id)
        out = fmt.write(image, self.open_output(item), replace=True)  # check_output decided it may be replaced
        with tempfile.TemporaryDirectory(prefix="domainsr-map-") as tmp:
            extras = dict(extras or {})
            if self.output_format_of(item) == "dicom":  # the audit's risk and regions beside the series, as DICOM
                extras.update(dicom_maps(extras, image.domain, sorted(Path(out).glob("*.dcm")), Path(tmp),
                                         item_id=item.id))
            return self.commit(item, run_key, extras, _public(image.provenance, image.domain, item))

    def open_output(self, item: Item) -> Path:
        """Where to write ``item``'s output (e.g. by a streaming writer, atomically); from now on any
        earlier output of the item is not 'done' for any run key. Finish with :meth:`commit`.
        OutputRefused when that path is an input (whatever the planning said)."""
        out = self.output_path(item)
        self._refuse_input(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        self.provenance_path(item).unlink(missing_ok=True)
        return out

    def commit(self, item: Item, run_key: str, extras: dict[str, Path] | None = None,
               provenance: dict[str, Any] | None = None) -> WriteResult:
        """Place the extras beside the finished output, then write its provenance file (last)."""
        out = self.output_path(item)
        if not out.exists():
            raise OutputError("output is missing; nothing to commit", out)
        placed: dict[str, str] = {}
        for label, src in (extras or {}).items():
            dst = self._inside(f"{self.output_stem(item)}.{check_name(label, 'extra label')}")
            self._refuse_input(dst)
            with atomic_path(dst) as tmp:
                shutil.copyfile(src, tmp)
            placed[label] = str(dst)
        record = {
            "run_key": run_key,
            "complete": True,
            "item": {"id": item.id, "kind": item.kind},
            "output": out.name,
            "format": self.output_format_of(item),
            "extras": {k: Path(v).name for k, v in placed.items()},
            "written": now_iso(),
            "provenance": provenance or {},
        }
        prov_path = self.provenance_path(item)
        try:
            with atomic_path(prov_path) as tmp:
                tmp.write_text(json.dumps(record, indent=1, default=str) + "\n", encoding="utf-8")
        except (TypeError, ValueError) as exc:
            raise OutputError(f"cannot record provenance: {exc}", prov_path) from exc
        return WriteResult(uri=str(out), extras=placed)



def _is_band_set(kind: str | None) -> bool:
    return kind in FORMATS and FORMATS[kind].band_set


def _public(provenance: dict[str, Any], domain: str, item: Item) -> dict[str, Any]:
    """Provenance without anything that could identify a patient: medical inputs are named by
    item id only (paths of medical files often carry names)."""
    prov = {k: v for k, v in provenance.items() if k != "source"}
    medical = item.kind in FORMATS and FORMATS[item.kind].medical
    prov["source"] = item.id if medical or domain in MEDICAL_DOMAINS else item.uri
    return prov
