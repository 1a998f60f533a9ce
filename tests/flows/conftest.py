"""Fixtures of the flow tests: an isolated ephemeral Prefect, and small inputs cut from real data."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from flow_inputs import write_geotiff_crop, write_mr_series, write_nifti_crop


@pytest.fixture(scope="session")
def mixed_folder(sample_data, tmp_path_factory) -> Path:
    """A folder of mixed real inputs: a NIfTI, a DICOM series (in a sub-folder), a GeoTIFF and
    one corrupt file."""
    root = tmp_path_factory.mktemp("mixed")
    write_nifti_crop(sample_data, root / "brain.nii.gz")
    write_mr_series(root / "series")
    write_geotiff_crop(sample_data, root / "scene.tif")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08\x00not really a volume")
    (root / "notes.txt").write_text("not an image: skipped by the listing\n")
    return root


@pytest.fixture
def fresh_copy(mixed_folder, tmp_path) -> Path:
    dst = tmp_path / "inputs"
    shutil.copytree(mixed_folder, dst)
    return dst
