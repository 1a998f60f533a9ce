"""The format table: one place for suffixes, magic bytes, readers, writers and output names."""
from __future__ import annotations

import gzip
import importlib
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
from affine import Affine

from domainsr.errors import InputError, UnsupportedFormatError
from domainsr.io import read_image, write_image
from domainsr.io.formats import (
    FORMATS,
    OUTPUTS,
    RISK_LABELS,
    default_output,
    detect_format,
    file_format,
    has_dicom_preamble,
    output_for_path,
    risk_label,
    sniff,
    strip_suffix,
    suffix_of,
)

ROOT = Path(__file__).resolve().parents[2] / "domainsr"
DICOM_HEAD = b"\0" * 128 + b"DICM"


def nifti_file(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), path)
    return path


def tiff_file(path: Path) -> Path:
    with rasterio.open(path, "w", driver="GTiff", width=8, height=8, count=1, dtype="uint8", crs="EPSG:32618",
                       transform=Affine(10, 0, 400000, 0, -10, 4500000)) as dst:
        dst.write(np.ones((1, 8, 8), np.uint8))
    return path


def _resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def test_every_entry_names_importable_readers_writers_and_known_outputs():
    for fmt in FORMATS.values():
        assert callable(_resolve(fmt.reader)) and fmt.output in OUTPUTS
        assert all(s == s.lower() and s.startswith(".") for s in (*fmt.suffixes, *fmt.member_suffixes))
    for out in OUTPUTS.values():
        assert callable(_resolve(out.writer)) and callable(_resolve(out.marker)) and out.risk in OUTPUTS
    assert default_output("stac") == "cog" and default_output("dicom") == "dicom"


@pytest.mark.parametrize(("output", "source_suffix", "suffix"), [
    ("nifti", ".nii.gz", ".nii.gz"), ("nifti", ".nii", ".nii"), ("nifti", "", ".nii.gz"), ("dicom", "", ""),
    ("cog", ".tiff", ".tif"), ("cog", ".jp2", ".tif"), ("cog", "", ".tif"),
])
def test_output_names_stay_as_they_were(output, source_suffix, suffix):
    assert OUTPUTS[output].name_suffix(source_suffix) == suffix
    assert OUTPUTS[output].folder == (suffix == "")


def test_each_input_is_written_in_its_own_family():
    assert {k: default_output(k) for k in FORMATS} == {"nifti": "nifti", "dicom": "dicom", "raster": "cog",
                                                       "sentinel2": "cog", "landsat8": "cog"}


def test_risk_maps_are_nifti_for_volumes_and_cog_for_rasters():
    assert risk_label("optical") == "risk.tif"
    assert risk_label("mri") == risk_label("ct") == OUTPUTS["dicom"].risk_label == "risk.nii.gz"
    assert set(RISK_LABELS) == {"risk.tif", "risk.nii.gz"}


def test_suffixes_are_matched_case_insensitively_longest_first():
    assert suffix_of("Brain.NII.GZ") == ".nii.gz" and suffix_of("scene.TIF") == ".tif" and suffix_of("x.txt") == ""
    assert strip_suffix("brain.nii.gz") == "brain" and strip_suffix("s2_B02.jp2") == "s2_B02"
    assert strip_suffix("notes.txt") == "notes.txt"


def test_sniffing_reads_magic_bytes_not_names(tmp_path):
    assert sniff(nifti_file(tmp_path / "a.nii")) == "nifti"
    gz = tmp_path / "a.bin"
    gz.write_bytes(gzip.compress((tmp_path / "a.nii").read_bytes()))
    assert sniff(gz) == "nifti"
    assert sniff(tiff_file(tmp_path / "a.tif")) == "raster"
    (tmp_path / "a.jp2").write_bytes(b"\0\0\0\x0cjP  \r\n\x87\n" + b"\0" * 40)
    assert sniff(tmp_path / "a.jp2") == "raster"
    (tmp_path / "IM0001").write_bytes(DICOM_HEAD + b"\x02\x00")
    assert sniff(tmp_path / "IM0001") == "dicom" and has_dicom_preamble(tmp_path / "IM0001")
    (tmp_path / "noise").write_bytes(np.random.default_rng(0).bytes(400))
    assert sniff(tmp_path / "noise") is None and not has_dicom_preamble(tmp_path / "noise")
    assert sniff(tmp_path / "missing") is None and sniff(tmp_path) is None


def test_files_are_recognised_by_suffix_and_dicom_also_by_its_preamble(tmp_path):
    (tmp_path / "IM0001").write_bytes(DICOM_HEAD)
    assert file_format(tmp_path / "IM0001") == "dicom"
    for name, kind in (("a.nii.gz", "nifti"), ("a.NII", "nifti"), ("a.dcm", "dicom"), ("a.TIFF", "raster"),
                       ("a.jp2", "raster"), ("a.vrt", "raster")):
        (tmp_path / name).write_bytes(b"")
        assert file_format(tmp_path / name) == kind, name
    tiff_file(tmp_path / "scene.tif.ovr")  # a GDAL overview sidecar is TIFF, but no input
    assert file_format(tmp_path / "scene.tif.ovr") is None


def test_folders_are_band_sets_by_their_file_names_else_dicom(tmp_path):
    for folder, names, kind in (("s2", ("T1_B02.jp2", "T1_B04.jp2"), "sentinel2"), ("s2a", ("x_B8A.jp2",), "sentinel2"),
                                ("l8", ("LC08_B8.TIF",), "landsat8"), ("dcm", ("IM1", "IM2"), "dicom")):
        (tmp_path / folder).mkdir()
        for n in names:
            (tmp_path / folder / n).write_bytes(b"")
        assert detect_format(tmp_path / folder) == kind
        assert FORMATS[kind].band_set == (kind in ("sentinel2", "landsat8"))


def test_unknown_files_are_refused_with_a_hint_from_their_content(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        detect_format(tmp_path / "missing.nii")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UnsupportedFormatError, match=r"unrecognised file type \(expected NIfTI, DICOM, GeoTIFF"):
        detect_format(tmp_path / "notes.txt")
    nifti_file(tmp_path / "brain.nii").rename(tmp_path / "brain.dat")
    with pytest.raises(UnsupportedFormatError, match=r"its content is NIfTI: give it one of the suffixes \.nii\.gz"):
        detect_format(tmp_path / "brain.dat")


def test_writers_are_chosen_by_the_output_name(tmp_path):
    assert output_for_path("x.nii.gz").name == output_for_path("X.NII").name == "nifti"
    assert output_for_path("x.tiff").name == "cog"
    assert output_for_path(tmp_path / "series", "ct").name == "dicom"
    with pytest.raises(UnsupportedFormatError, match="cannot choose a writer"):
        output_for_path(tmp_path / "series", "optical")
    img = read_image(tiff_file(tmp_path / "in.tif"))
    with pytest.raises(UnsupportedFormatError):
        write_image(img, tmp_path / "out.png")
    assert OUTPUTS["cog"].problem(img) is None and OUTPUTS["nifti"].problem(img) == OUTPUTS["nifti"].requirement
    assert OUTPUTS["dicom"].problem(img) == "a DICOM output needs a DICOM input series"
    out = write_image(img, tmp_path / "out.tif")
    assert not OUTPUTS["cog"].carries_marker(out)  # not enhanced: no derived tags
    assert not OUTPUTS["nifti"].carries_marker(out)  # unreadable as NIfTI: not ours


def test_the_dicm_check_is_written_once():
    holders = [p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*.py") if 'b"DICM"' in p.read_text()]
    assert holders == ["io/formats.py"]
