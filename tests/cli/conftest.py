"""Fixtures of the CLI tests: an isolated ephemeral Prefect and small real inputs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest


@pytest.fixture(scope="session")
def small_inputs(sample_data, tmp_path_factory) -> Path:
    """A folder with a block of the real MNI152 volume (NIfTI) and a window of the real Sentinel-2
    10 m bands (GeoTIFF)."""
    from domainsr.io import read_image
    from domainsr.io.nifti import read_nifti, write_nifti
    from domainsr.io.raster import write_raster

    root = tmp_path_factory.mktemp("cli-inputs")
    mni = read_nifti(sample_data["mni152"])
    start, shape = (80, 100, 70), (32, 36, 28)
    sl = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, shape))
    write_nifti(mni.derive(np.ascontiguousarray(mni.data[sl]), geometry=mni.geometry.cropped(start, shape)),
                root / "head.nii.gz")
    s2 = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    start, shape = (900, 900), (64, 72)
    sl = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, shape))
    mask = None if s2.mask is None else s2.mask[sl[1:]]
    write_raster(s2.derive(np.ascontiguousarray(s2.data[sl]), geometry=s2.geometry.cropped(start, shape),
                           mask=mask), root / "field.tif")
    return root
