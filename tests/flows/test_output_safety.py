"""Outputs never replace inputs: the output suffix, the refusals made when a run is planned (an
output that is an input: always; an existing file that is not ours: unless overwrite), per item."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from flow_inputs import write_geotiff_crop, write_mr_series, write_nifti_crop

from domainsr.app.enhance import enhance_item
from domainsr.app.runs import RunSpec, plan_run, split_done
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.errors import ConfigError
from domainsr.stores.local import LocalStore, OutputRefused


def _fingerprint(path: Path) -> tuple[str, int, int]:
    st = path.stat()
    return hashlib.sha256(path.read_bytes()).hexdigest(), st.st_ino, st.st_mtime_ns


def _spec(**kw) -> RunSpec:
    return plan_run(EnhanceConfig(name="t", model=ModelRef(name="cubic", scale=2), run_audit=False, **kw))


@pytest.fixture
def scene_dir(sample_data, tmp_path) -> Path:
    write_geotiff_crop(sample_data, tmp_path / "lr.tif")
    return tmp_path


def test_default_suffix_keeps_outputs_beside_their_inputs(scene_dir):
    store = LocalStore(scene_dir / "lr.tif", scene_dir)
    (item,) = store.list_items()
    assert store.output_path(item) == scene_dir.resolve() / "lr_sr.tif"
    store.check_output(item)  # nothing there yet
    before = _fingerprint(scene_dir / "lr.tif")
    result = enhance_item(store, item, _spec())
    assert Path(result.output).name == "lr_sr.tif" and _fingerprint(scene_dir / "lr.tif") == before
    store.check_output(item)  # our own earlier output: may be redone


@pytest.mark.parametrize("overwrite", [False, True])
def test_an_output_that_is_an_input_is_always_refused(scene_dir, overwrite):
    store = LocalStore(scene_dir / "lr.tif", scene_dir, output_suffix="", overwrite=overwrite)
    (item,) = store.list_items()
    before = _fingerprint(scene_dir / "lr.tif")
    with pytest.raises(OutputRefused, match="write over an input") as err:
        store.check_output(item)
    assert str(scene_dir / "lr.tif") in str(err.value)
    with pytest.raises(OutputRefused):  # and the writer itself refuses, whatever the planning said
        store.open_output(item)
    todo, settled = split_done(store, [item], _spec())
    assert todo == [] and settled[0].status == "failed" and settled[0].error == "OutputRefused"
    assert _fingerprint(scene_dir / "lr.tif") == before


def test_a_hard_link_or_symlink_to_an_input_is_refused_even_with_overwrite(scene_dir):
    out = scene_dir / "out"
    out.mkdir()
    os.link(scene_dir / "lr.tif", out / "lr_sr.tif")  # the same file under the output name
    store = LocalStore(scene_dir / "lr.tif", out, overwrite=True)
    (item,) = store.list_items()
    with pytest.raises(OutputRefused, match="input"):
        store.check_output(item)
    (out / "lr_sr.tif").unlink()
    inside = out / "lr.tif"  # an input inside the output root, and a symlink to it at the output name
    shutil.copy(scene_dir / "lr.tif", inside)
    (out / "lr_sr.tif").symlink_to(inside)
    store = LocalStore(inside, out, overwrite=True)
    (item,) = store.list_items()
    with pytest.raises(OutputRefused, match="input"):
        store.check_output(item)


def test_a_file_that_is_not_ours_needs_overwrite(scene_dir):
    out = scene_dir / "out"
    out.mkdir()
    (out / "lr_sr.tif").write_bytes(b"someone else's file")
    (item,) = LocalStore(scene_dir / "lr.tif", out).list_items()
    with pytest.raises(OutputRefused, match="not a DomainSR output.*--overwrite") as err:
        LocalStore(scene_dir / "lr.tif", out).check_output(item)
    assert str(out / "lr_sr.tif") in str(err.value)
    (out / "lr_sr.tif").unlink()
    (out / "lr_sr.audit.html").write_text("<html>mine</html>")  # an extra's name counts too
    with pytest.raises(OutputRefused, match="lr_sr.audit.html"):
        LocalStore(scene_dir / "lr.tif", out).check_output(item)
    LocalStore(scene_dir / "lr.tif", out, overwrite=True).check_output(item)


def test_our_own_output_is_recognised_by_provenance_or_by_its_marker(sample_data, tmp_path):
    write_nifti_crop(sample_data, tmp_path / "in" / "head.nii.gz")
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    enhance_item(store, item, _spec())
    store.provenance_path(item).unlink()  # e.g. a run killed between the output and its provenance
    store.check_output(item)  # the NIfTI description says it is ours
    (tmp_path / "out" / "head_sr.nii.gz").write_bytes((tmp_path / "in" / "head.nii.gz").read_bytes())
    with pytest.raises(OutputRefused):  # a copy of the input is not ours
        store.check_output(item)


def test_a_dicom_output_folder_holding_inputs_is_refused(tmp_path):
    write_mr_series(tmp_path / "in" / "series")
    (item,) = LocalStore(tmp_path / "in", tmp_path / "elsewhere").list_items()
    folder = tmp_path / "in" / f"{item.id}_sr"  # the series sits where its output folder would go
    (tmp_path / "in" / "series").rename(folder)
    store = LocalStore(folder, tmp_path / "in", overwrite=True)
    (item,) = store.list_items()
    assert store.output_path(item) == folder.resolve()
    with pytest.raises(OutputRefused, match="input"):
        store.check_output(item)


def test_one_refused_item_does_not_stop_the_batch(sample_data, tmp_path):
    write_geotiff_crop(sample_data, tmp_path / "a.tif")
    write_geotiff_crop(sample_data, tmp_path / "b.tif")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "b_sr.tif").write_text("not ours")
    store = LocalStore([tmp_path / "a.tif", tmp_path / "b.tif"], tmp_path / "out")
    todo, settled = split_done(store, store.list_items(), _spec())
    assert [i.id for i in todo] == ["a"]
    assert [(r.item_id, r.status, r.error) for r in settled] == [("b", "failed", "OutputRefused")]


def test_output_suffix_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="suffix"):
        LocalStore(tmp_path, tmp_path / "out", output_suffix="../x")
    store = LocalStore(tmp_path, tmp_path / "out", output_suffix=".enhanced")
    from domainsr.stores.base import Item

    assert store.output_path(Item(id="x", uri="x.tif", kind="raster")).name == "x.enhanced.tif"


def test_build_run_takes_suffix_and_overwrite_from_config_and_command_line(scene_dir):
    from flows.enhance import build_run

    cfg = scene_dir / "task.yaml"
    cfg.write_text("name: t\nmodel: {name: bicubic, scale: 2}\nstore: {output_suffix: _x2, overwrite: true}\n")
    spec, store = build_run(str(cfg), inputs=[str(scene_dir / "lr.tif")], out=str(scene_dir / "o"))
    assert (store.output_suffix, store.overwrite) == ("_x2", True) and spec.model["name"] == "cubic"
    spec, store = build_run(model="cubic", scale=2, inputs=[str(scene_dir / "lr.tif")], out=str(scene_dir),
                            suffix="", overwrite=True)
    assert (store.output_suffix, store.overwrite) == ("", True)
    with pytest.raises(ConfigError, match="output_suffix"):
        build_run(model="cubic", scale=2, inputs=[str(scene_dir)], out=str(scene_dir), suffix="a/b")
    record = json.dumps(spec.config.model_dump(mode="json"))
    assert '"output_suffix": ""' in record
