"""LocalStore: listing (series grouping, safe ids), atomic outputs with a provenance file written
last, run-key skipping, the output-root fence, queries; and open_store's scheme hook."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
from flow_inputs import write_geotiff_crop, write_mr_series, write_nifti_crop

from domainsr.config import StoreConfig, load_enhance_config
from domainsr.errors import ConfigError, InputError, StoreError
from domainsr.stores import SCHEMES, open_store
from domainsr.stores.base import Item
from domainsr.stores.local import EXTRA_LABELS, LocalStore

PATIENT = ("CompressedSamples", "4MR1")  # PatientName / PatientID of the MR_small.dcm header


def test_listing_groups_series_and_names_items_safely(fresh_copy, tmp_path):
    write_mr_series(fresh_copy / "series", prefix="second")  # same folder, a second series
    store = LocalStore(fresh_copy, tmp_path / "out")
    items = store.list_items()
    kinds = sorted((i.kind, i.id.split("-")[0]) for i in items)
    assert kinds == [("dicom", "mr"), ("dicom", "mr"), ("nifti", "brain"), ("nifti", "broken"), ("raster", "scene")]
    series = [i for i in items if i.kind == "dicom"]
    assert len({i.meta["series_uid"] for i in series}) == 2 and all(len(i.meta["files"]) == 6 for i in series)
    for i in items:
        assert all(p not in i.id for p in PATIENT)
        store.output_path(i)  # every id makes a legal output name
    assert store.skipped == [str(fresh_copy / "notes.txt")]


def test_output_root_is_fenced(tmp_path):
    store = LocalStore(tmp_path, tmp_path / "out")
    for bad in ("../evil", "/etc/passwd", "a/b", "..", ".hidden", ""):
        with pytest.raises(StoreError):
            store.output_path(Item(id=bad, uri="x", kind="nifti"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "trap_sr.tif").symlink_to(tmp_path / "elsewhere.tif")
    with pytest.raises(StoreError, match="outside"):
        store.output_path(Item(id="trap", uri="x", kind="raster"))


def test_outputs_keep_format_and_provenance_decides_done(sample_data, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    write_nifti_crop(sample_data, src / "head.nii")
    write_geotiff_crop(sample_data, src / "tile.tif")
    store = LocalStore(src, tmp_path / "out")
    items = {i.id: i for i in store.list_items()}
    nii, tif = items["head"], items["tile"]
    assert store.output_path(nii).name == "head_sr.nii" and store.output_path(tif).name == "tile_sr.tif"

    img = store.read(tif)
    report = tmp_path / "report.html"
    report.write_text("<html>audit</html>")
    res = store.write(tif, img, "key-1", extras={"audit.html": report})
    assert res.extras == {"audit.html": str(tmp_path / "out" / "tile_sr.audit.html")}
    prov = json.loads(store.provenance_path(tif).read_text())
    assert prov["run_key"] == "key-1" and prov["complete"] and prov["output"] == "tile_sr.tif"
    assert store.existing(tif, "key-1") == res and store.existing(tif, "key-2") is None
    assert store.existing(nii, "key-1") is None

    # an output without its provenance file (a crash before the end) is not done
    store.provenance_path(tif).unlink()
    assert (tmp_path / "out" / "tile_sr.tif").exists() and store.existing(tif, "key-1") is None
    # nor is one whose extras went missing
    store.write(tif, img, "key-1", extras={"audit.html": report})
    (tmp_path / "out" / "tile_sr.audit.html").unlink()
    assert store.existing(tif, "key-1") is None
    # no temporary siblings are left behind
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]


def test_medical_provenance_names_no_patient(mixed_folder, tmp_path):
    store = LocalStore(mixed_folder / "series", tmp_path / "out")
    (item,) = store.list_items()
    img = store.read(item)
    store.write(item, img, "k")
    text = store.provenance_path(item).read_text()
    assert all(p not in text for p in PATIENT) and str(mixed_folder) not in text
    assert json.loads(text)["provenance"]["source"] == item.id


def test_queries(fresh_copy, tmp_path):
    store = LocalStore(fresh_copy, tmp_path / "out")
    assert {i.kind for i in store.list_items({"kinds": ["dicom"]})} == {"dicom"}
    assert [i.id for i in store.list_items({"glob": "*.tif"})] == ["scene"]
    old = time.time() - 3 * 86400
    os.utime(fresh_copy / "scene.tif", (old, old))
    recent = {i.id for i in store.list_items({"modified_within_hours": 24})}
    assert "scene" not in recent and "brain" in recent
    with pytest.raises(ConfigError, match="unknown local store query"):
        store.list_items({"modality": "CT"})


def test_output_folder_inside_input_is_not_listed(sample_data, tmp_path):
    write_geotiff_crop(sample_data, tmp_path / "a.tif")
    write_geotiff_crop(sample_data, tmp_path / "out" / "a.tif")  # an earlier output
    assert [i.uri for i in LocalStore(tmp_path, tmp_path / "out").list_items()] == [str(tmp_path / "a.tif")]


def test_corrupt_dicom_is_an_item_that_fails(tmp_path):
    (tmp_path / "cut.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00")
    store = LocalStore(tmp_path, tmp_path / "out")
    (item,) = store.list_items()
    with pytest.raises(InputError, match="cut.dcm"):
        store.read(item)


def test_open_store_schemes(tmp_path, monkeypatch):
    assert isinstance(open_store(str(tmp_path), output=tmp_path / "o"), LocalStore)
    assert open_store(tmp_path.as_uri()).inputs == [tmp_path]
    with pytest.raises(ConfigError, match="unknown store scheme"):
        open_store("ftp://host/data")
    # a remote scheme loads its module lazily and calls its from_url
    mod = tmp_path / "fake_store_mod.py"
    mod.write_text("def from_url(url, output=None, **options):\n    return ('fake', url, output, options)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(SCHEMES, "stac+https", "fake_store_mod")
    assert open_store("stac+https://example.org/stac", output="o", collection="s2") == (
        "fake", "stac+https://example.org/stac", "o", {"collection": "s2"})
    monkeypatch.setitem(SCHEMES, "dimse", "no_such_store_module_xyz")
    sys.modules.pop("no_such_store_module_xyz", None)
    with pytest.raises(StoreError, match="not available"):
        open_store("dimse://pacs:104/AET")


def test_store_config_expands_variables(tmp_path, monkeypatch):
    from flows.enhance import build_run

    monkeypatch.setenv("DOMAINSR_TEST_INBOX", str(tmp_path))
    store = open_store(StoreConfig(input="$DOMAINSR_TEST_INBOX", output="$DOMAINSR_TEST_INBOX/out"))
    assert store.inputs == [tmp_path] and store.output == tmp_path / "out"
    cfg = tmp_path / "task.yaml"  # as a scheduled deployment runs it: store paths from the environment
    cfg.write_text("name: t\nmodel: {name: cubic, scale: 2}\n"
                   "store: {input: $DOMAINSR_TEST_INBOX, output: $DOMAINSR_TEST_INBOX/enhanced}\n")
    spec, store = build_run(str(cfg))
    assert store.inputs == [tmp_path] and store.output == tmp_path / "enhanced" and spec.source == str(cfg)
    with pytest.raises(ConfigError, match="not set"):
        open_store(StoreConfig(input="$DOMAINSR_UNSET_VARIABLE_XYZ/in"))


def test_shipped_enhance_configs_are_strict_and_valid(tmp_path):
    from pathlib import Path

    from domainsr.app.audits import audit_thresholds

    configs = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        cfg = load_enhance_config(path)
        audit_thresholds(cfg, str(path))
        assert cfg.store.input and cfg.runner.task_runner in ("threads", "dask")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmodel: {name: cubic, scale: 2}\nrunner: {task_runer: dask}\n")
    with pytest.raises(ConfigError, match="task_runer"):
        load_enhance_config(bad)


def test_a_forced_output_format_that_cannot_fit_is_refused(sample_data, tmp_path):
    write_geotiff_crop(sample_data, tmp_path / "in" / "tile.tif")
    store = LocalStore(tmp_path / "in", tmp_path / "out", output_format="dicom")
    (item,) = store.list_items()
    assert store.output_path(item).name == "tile_sr"
    with pytest.raises(ConfigError, match="DICOM input"):
        store.write(item, store.read(item), "k")
    assert not (tmp_path / "out").exists()


def test_output_and_extra_names_of_every_kind_come_from_the_format_table(tmp_path):
    src = tmp_path / "in"
    write_mr_series(src / "series")
    (src / "s2").mkdir()
    for band in ("T1_B02.jp2", "T1_B04.jp2", "T1_B8A.jp2"):
        (src / "s2" / band).write_bytes(b"")
    for name in ("brain.nii.gz", "head.nii", "scene.TIFF", "ortho.jp2"):
        (src / name).write_bytes(b"")
    store = LocalStore(src, tmp_path / "out")
    names = {i.kind + ":" + i.id.split("-")[0]: store.output_path(i).name for i in store.list_items()}
    assert names == {"dicom:mr": names["dicom:mr"], "nifti:brain": "brain_sr.nii.gz", "nifti:head": "head_sr.nii",
                     "raster:scene": "scene_sr.tif", "raster:ortho": "ortho_sr.tif", "sentinel2:s2": "s2_sr.tif"}
    assert names["dicom:mr"].startswith("mr-") and names["dicom:mr"].endswith("_sr")
    assert EXTRA_LABELS == ("audit.html", "audit.json", "risk.nii.gz", "risk.tif",  # <stem>.<label> beside it
                            "regions.geojson", "regions.nii.gz", "regions.tif", "risk.dcm", "regions.seg.dcm")
    forced = LocalStore(src, tmp_path / "out", output_format="nifti")
    assert {forced.output_path(i).name for i in forced.list_items() if i.kind == "raster"} == {"scene_sr.nii.gz",
                                                                                             "ortho_sr.nii.gz"}
