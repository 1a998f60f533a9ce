"""A NIfTI file names no modality: with a CT model it is read in HU as CT, not refused as MRI."""
from __future__ import annotations

import nibabel as nib
import numpy as np

from domainsr.stores import open_store


def _nifti(path) -> str:
    hu = np.linspace(-1000, 1500, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 4.0, 1.0])), path)
    return str(path)


def test_a_nifti_input_takes_the_models_medical_domain_unless_the_task_names_one(tmp_path):
    path = _nifti(tmp_path / "thick.nii.gz")
    read = {}
    for label, kw in {"plain": {}, "ct model": {"nifti_domain": "ct"}, "optical model": {"nifti_domain": "optical"},
                      "mri task": {"domain": "mri", "nifti_domain": "ct"}}.items():
        store = open_store([path], output=str(tmp_path / "out"), **kw)
        (item,) = store.list_items()
        img = store.read(item)
        read[label] = (img.domain, img.units)
    assert read == {"plain": ("mri", "a.u."), "ct model": ("ct", "HU"), "optical model": ("mri", "a.u."),
                    "mri task": ("mri", "a.u.")}


def test_the_run_reads_nifti_as_its_checkpoints_domain(tmp_path):
    from flows.enhance import build_run

    path = _nifti(tmp_path / "thick.nii.gz")
    _, store = build_run(model="ct-slices-x4-3d", inputs=[path], out=str(tmp_path / "out"), run_audit=False)
    (item,) = store.list_items()
    assert store.read(item).domain == "ct"
    _, store = build_run(model="cubic", scale=2, inputs=[path], out=str(tmp_path / "out2"), run_audit=False)
    (item,) = store.list_items()
    assert store.read(item).domain == "mri"


def test_the_task_or_the_command_line_domain_wins_over_the_models(tmp_path):
    from typer.testing import CliRunner

    from domainsr.cli import app
    from flows.enhance import build_run

    path = _nifti(tmp_path / "thick.nii.gz")
    _, store = build_run(model="cubic", scale=2, inputs=[path], out=str(tmp_path / "out"), run_audit=False,
                         domain="ct")
    (item,) = store.list_items()
    assert store.read(item).domain == "ct"
    _, store = build_run(model="ct-slices-x4-3d", inputs=[path], out=str(tmp_path / "out2"), run_audit=False,
                         domain="mri")
    (item,) = store.list_items()
    assert store.read(item).domain == "mri"  # and the CT card then refuses it, naming the file

    res = CliRunner().invoke(app, ["enhance", path, "--model", "cubic", "--domain", "pet", "--out",
                                   str(tmp_path / "o")])
    assert res.exit_code != 0 and "--domain must be one of mri, ct, optical" in res.output


def test_the_domain_a_task_names_keys_its_runs():
    from domainsr.app.runs import config_from_model, run_key

    ident = {"kind": "registry", "name": "cubic"}
    plain = config_from_model("cubic", 2)
    assert run_key(plain, ident) != run_key(plain.model_copy(update={"domain": "ct"}), ident)
