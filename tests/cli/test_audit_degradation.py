"""``domainsr audit --degradation SPEC`` (parsing, the operator each spec makes, ``auto`` from the SR
file's DomainSR provenance) and how ``--sr``/``--lr`` folders are paired; no flow runs here."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from domainsr.app.audit_items import plan_audits
from domainsr.app.degradation import (
    DegradationSpec,
    choose_operator,
    parse_degradation,
    provenance_model,
)
from domainsr.cli import EXIT_USAGE, MTF_SENSORS, app
from domainsr.errors import ConfigError, InputError

runner = CliRunner()


@pytest.mark.parametrize("text, spec", [
    (None, DegradationSpec("auto")), ("auto", DegradationSpec("auto")), (" AREA ", DegradationSpec("area")),
    ("gaussian:1.5", DegradationSpec("gaussian", 1.5)), ("gaussian:0", DegradationSpec("gaussian", 0.0)),
    ("mtf:Sentinel2", DegradationSpec("mtf", "sentinel2")), ("mtf:landsat8", DegradationSpec("mtf", "landsat8")),
    ("card:mri-t1-x2", DegradationSpec("card", "mri-t1-x2")), ("card:mri_t1_x2", DegradationSpec("card", "mri_t1_x2")),
])
def test_degradation_specs_parse(text, spec):
    assert parse_degradation(text) == spec
    assert parse_degradation(spec.text) == spec  # the text written in the report parses back


@pytest.mark.parametrize("text, message", [
    ("box", "not a degradation spec"), ("gaussian", "not a degradation spec"), ("gaussian:-1", "SIGMA"),
    ("gaussian:wide", "SIGMA"), ("gaussian:nan", "SIGMA"), ("mtf:spot7", "spot7"), ("area:2", "not a degradation"),
    ("card:no-such-model", "no checkpoint"), ("card:cubic", "registered model without a model card"),
])
def test_bad_degradation_specs_are_config_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_degradation(text)


def test_help_lists_every_sensor_the_degrade_package_knows():
    from domainsr.degrade.optical import SENSORS

    assert tuple(sorted(SENSORS)) == MTF_SENSORS
    text = " ".join(runner.invoke(app, ["audit", "--help"]).output.split())
    for form in ("auto", "area", "gaussian:SIGMA", "card:MODEL", *(f"mtf:{s}" for s in MTF_SENSORS)):
        assert form in text.replace("│ ", "").replace(" │", "")


def test_a_bad_spec_exits_2_before_any_work(small_inputs, tmp_path):
    tif = small_inputs / "field.tif"
    for spec, message in (("gauss:2", "gaussian:SIGMA"), ("mtf:spot7", "spot7"), ("card:nope", "nope")):
        res = runner.invoke(app, ["audit", "--sr", str(tif), "--lr", str(tif), "--degradation", spec,
                                  "--out", str(tmp_path / "o")])
        assert res.exit_code == EXIT_USAGE and message in res.output, res.output
        res = runner.invoke(app, ["audit", "output", str(tif), str(tif), "-d", spec, "--out", str(tmp_path / "o")])
        assert res.exit_code == EXIT_USAGE and message in res.output, res.output
    assert not (tmp_path / "o").exists()


def test_each_spec_makes_its_operator():
    x = np.random.default_rng(0).normal(100, 10, (4, 16, 16)).astype(np.float32)
    bands = ["B02", "B03", "B04", "B08"]
    area = choose_operator("area", None, (2, 2), 4, bands)
    assert area.spec == "area" and np.allclose(area(x), x.reshape(4, 8, 2, 8, 2).mean(axis=(2, 4)), atol=1e-4)
    assert area.describe()["operator"] == {"name": "area-average", "scale": [2, 2]}
    g0 = choose_operator("gaussian:0", None, (2, 2), 4, bands)
    assert np.allclose(g0(x), area(x), atol=1e-4)  # sigma 0 is the block mean
    g = choose_operator("gaussian:1.5", None, (2, 2), 4, bands)
    assert g.describe()["operator"]["sigma"] == 1.5 and not np.allclose(g(x), area(x), atol=1e-2)
    m = choose_operator("mtf:sentinel2", None, (2, 2), 4, bands)
    assert m.describe()["operator"]["kind"] == "optical" and list(m.describe()["operator"]["mtf"]) == \
        [0.26, 0.28, 0.24, 0.26]
    assert m(x).shape == (4, 8, 8)
    with pytest.raises(ConfigError, match="B99"):
        choose_operator("mtf:sentinel2", None, (2, 2), 1, ["B99"])
    c = choose_operator("card:sentinel2-rgbn-x2", None, (2, 2), 2, ["B04", "B08"])  # the card's MTFs of these bands
    assert c.spec == "card:sentinel2-rgbn-x2" and list(c.describe()["operator"]["mtf"]) == [0.24, 0.26]
    assert c.describe()["operator"]["noise_sigma"] == 0.0  # the noise-free form
    with pytest.raises(ConfigError, match="x\\[2, 2, 2\\]"):
        choose_operator("card:mri-t1-x2", None, (2, 2, 1), 1)
    t1 = choose_operator("card:mri-t1-x2", None, (2, 2, 2), 1)
    assert t1.describe()["operator"]["kind"] == "gaussian_mean" and "asked for" in t1.why


def _sr_of(lr, model_name: str | None):
    sr = lr.derive(np.repeat(np.repeat(lr.data, 2, axis=-1), 2, axis=-2) if lr.spatial_dims == 2 else
                   lr.data.repeat(2, axis=1).repeat(2, axis=2).repeat(2, axis=3),
                   geometry=lr.geometry.scaled(2), mask=None)
    if model_name:
        sr.provenance["model"] = {"name": model_name, "kind": "checkpoint"}
    return sr


def test_auto_reads_the_model_from_the_sr_files_provenance(small_inputs, tmp_path):
    from domainsr.io import read_image
    from domainsr.io.nifti import write_nifti
    from domainsr.io.raster import write_raster

    lr = read_image(small_inputs / "field.tif")
    tagged = write_raster(_sr_of(lr, "sentinel2-rgbn-x2"), tmp_path / "tagged_sr.tif")
    plain = write_raster(_sr_of(lr, None), tmp_path / "plain_sr.tif")
    assert provenance_model(tagged) == ("sentinel2-rgbn-x2", "its DomainSR marker")
    assert provenance_model(plain) is None
    op = choose_operator("auto", tagged, (2, 2), 4, list(lr.band_names))
    d = op.describe()
    assert (d["spec"], d["asked"]) == ("card:sentinel2-rgbn-x2", "auto") and "sentinel2-rgbn-x2" in d["why"]
    assert d["operator"]["kind"] == "optical"
    op = choose_operator("auto", plain, (2, 2), 4, list(lr.band_names))
    assert op.spec == "area" and "no DomainSR provenance" in op.why
    assert choose_operator("area", tagged, (2, 2), 4).spec == "area"  # an explicit spec wins over provenance

    # the provenance file beside an output (what `domainsr enhance` writes) is read first
    (tmp_path / "plain_sr.tif.provenance.json").write_text(json.dumps(
        {"provenance": {"model": {"kind": "registry", "name": "cubic"}}}))
    assert provenance_model(plain) == ("cubic", "its provenance file plain_sr.tif.provenance.json")
    op = choose_operator("auto", plain, (2, 2), 4, list(lr.band_names))
    assert op.spec == "area" and "cubic" in op.why and "no model card" in op.why

    head = read_image(small_inputs / "head.nii.gz")
    nii = write_nifti(_sr_of(head, "mri-t1-x2"), tmp_path / "head_sr.nii.gz")
    assert provenance_model(nii) == ("mri-t1-x2", "its DomainSR marker")
    assert choose_operator("auto", nii, (2, 2, 2), 1).spec == "card:mri-t1-x2"


def _touch_images(folder: Path, names: list[str], src: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        (folder / n).write_bytes(src.read_bytes())


def test_folders_pair_by_stem_and_unmatched_items_are_problems(small_inputs, tmp_path):
    tif = small_inputs / "field.tif"
    _touch_images(tmp_path / "lr", ["a.tif", "b.tif", "c.tif"], tif)
    _touch_images(tmp_path / "sr", ["a_sr.tif", "b.tif", "a_sr.risk.tif", "zz_sr.tif"], tif)
    (tmp_path / "sr" / "a_sr.audit.json").write_text("{}")
    plan = plan_audits([tmp_path / "sr"], [tmp_path / "lr"])
    assert plan.per_item and [(p.item, Path(p.sr).name, Path(p.lr).name) for p in plan.pairs] == [
        ("a", "a_sr.tif", "a.tif"), ("b", "b.tif", "b.tif")]
    assert len(plan.problems) == 1 and plan.problems[0].startswith("c: no SR image c_sr.* or c.*")

    _touch_images(tmp_path / "hr", ["a_hr.tif"], tif)
    plan = plan_audits([tmp_path / "sr"], [tmp_path / "lr"], [tmp_path / "hr"])
    assert [(p.item, Path(p.reference).name) for p in plan.pairs] == [("a", "a_hr.tif")]
    assert [p.split(":")[0] for p in plan.problems] == ["b", "c"]

    _touch_images(tmp_path / "both", ["a.tif", "a_sr.tif", "a_sr.risk.tif", "b.tif"], tif)  # outputs beside inputs
    plan = plan_audits([tmp_path / "both"], [tmp_path / "both"])
    assert [(p.item, Path(p.sr).name) for p in plan.pairs] == [("a", "a_sr.tif")]
    assert [p.split(":")[0] for p in plan.problems] == ["b"]  # b.tif is not its own SR

    one = plan_audits([tmp_path / "sr" / "a_sr.tif"], [tif])  # one pair: reports straight into DIR
    assert not one.per_item and one.pairs[0].item == "a" and not one.problems
    two = plan_audits([tmp_path / "sr" / "a_sr.tif", tmp_path / "sr" / "b.tif"], [tif, tif])
    assert two.per_item and [p.item for p in two.pairs] == ["a", "b"]
    nii = plan_audits([small_inputs / "head.nii.gz"] * 2, [small_inputs / "head.nii.gz"] * 2)
    names = [p.item for p in nii.pairs]  # medical names are pseudonyms, made unique
    assert names[0].startswith("anon-") and names[1] == names[0] + "-2"


@pytest.mark.parametrize("args, error, message", [
    (lambda d: ([d / "sr"], []), ConfigError, "one --lr per --sr"),
    (lambda d: ([d / "sr"], [d / "lr", d / "lr"]), ConfigError, "one --lr per --sr"),
    (lambda d: ([d / "sr"], [d / "missing"]), InputError, "no such file"),
    (lambda d: ([d / "sr"], [d / "lr" / "a.tif"]), ConfigError, "all be folders"),
    (lambda d: ([d / "sr"], [d / "empty"]), InputError, "no images found"),
])
def test_plan_usage_errors(small_inputs, tmp_path, args, error, message):
    _touch_images(tmp_path / "lr", ["a.tif"], small_inputs / "field.tif")
    _touch_images(tmp_path / "sr", ["a_sr.tif"], small_inputs / "field.tif")
    (tmp_path / "empty").mkdir()
    srs, lrs = args(tmp_path)
    with pytest.raises(error, match=message):
        plan_audits(srs, lrs)


def test_cli_usage_errors_of_the_contract_exit_2(small_inputs, tmp_path):
    tif = str(small_inputs / "field.tif")
    for args, message in ((["audit", "--sr", tif], "--sr SR --lr LR"),
                          (["audit", "--sr", tif, "--sr", tif, "--lr", tif], "one --lr per --sr"),
                          (["audit", "--sr", tif, "--lr", str(tmp_path / "nope.tif")], "no such file"),
                          (["audit", "--sr", tif, "heldout", tif, "--model", "cubic"], "not options of")):
        res = runner.invoke(app, [*args, "--out", str(tmp_path / "o")] if args[-1] != "cubic" else args)
        assert res.exit_code == EXIT_USAGE and message in res.output, res.output


def test_auto_reads_a_derived_dicom_series(tmp_path):
    import pydicom
    from pydicom.data import get_testdata_file

    series = tmp_path / "mr_sr"
    series.mkdir()
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.DerivationDescription = ("AI-enhanced (super-resolution x2) by DomainSR model mri-t1-x2; derived image, "
                                "not acquired")
    ds.save_as(series / "IM00001.dcm")
    assert provenance_model(series) == ("mri-t1-x2", "its DomainSR marker")
    del ds.DerivationDescription
    ds.save_as(series / "IM00001.dcm")
    assert provenance_model(series) is None
