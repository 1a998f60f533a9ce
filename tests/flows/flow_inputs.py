"""Small inputs cut from the real sample data for the flow tests (imported by conftest and tests)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np


def crop(img, start, shape):
    sl = (slice(None),) + tuple(slice(a, a + n) for a, n in zip(start, shape))
    mask = None if img.mask is None else img.mask[sl[1:]]
    return img.derive(np.ascontiguousarray(img.data[sl]), geometry=img.geometry.cropped(start, shape), mask=mask)


def write_nifti_crop(sample_data, path: Path) -> Path:
    """A 40x44x32 block of the real MNI152 T1 volume (brain tissue), as NIfTI."""
    from domainsr.io.nifti import read_nifti, write_nifti

    return write_nifti(crop(read_nifti(sample_data["mni152"]), (78, 96, 70), (40, 44, 32)), path)


def write_geotiff_crop(sample_data, path: Path) -> Path:
    """A 96x80 window of the real Sentinel-2 10 m bands B02, B03, B04, B08 (uint16 DN), as a COG."""
    from domainsr.io import read_image
    from domainsr.io.raster import write_raster

    rgbn = read_image(sample_data["sentinel2"]).select(["B02", "B03", "B04", "B08"])
    return write_raster(crop(rgbn, (600, 700), (96, 80)), path)


def write_mr_series(folder: Path, n_slices: int = 6, step_mm: float = 3.0, prefix: str = "slice") -> Path:
    """A thick-slice MR series: pydicom's real MR_small.dcm header, pixels from a real MNI152
    block (every third 1 mm slice, so 3 mm slices), new series and instance UIDs."""
    import nibabel as nib
    import pydicom
    from nilearn.datasets import MNI152_FILE_PATH
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    vol = np.asanyarray(nib.load(MNI152_FILE_PATH).dataobj)
    block = vol[66:130, 84:148, 80:80 + 3 * n_slices:3].astype(np.int16) * 8  # (i, j, k)
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    series_uid, origin = generate_uid(), np.array([-30.0, -20.0, 10.0])
    folder.mkdir(parents=True, exist_ok=True)
    for k in range(block.shape[2]):
        ds = copy.deepcopy(template)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = k + 1
        ds.PixelSpacing = [1.0, 1.0]
        ds.SliceThickness = step_mm
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [float(v) for v in origin + [0, 0, k * step_mm]]
        ds.Rows, ds.Columns = block.shape[1], block.shape[0]
        ds.PixelData = np.ascontiguousarray(block[:, :, k].T).astype("<i2").tobytes()
        ds.save_as(folder / f"{prefix}{k:03d}.dcm")
    return folder
