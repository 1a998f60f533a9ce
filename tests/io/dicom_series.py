"""Test DICOM series built the way scanners write them (rounded decimal strings, real vendor
headers), and the real validators run on them: dicom3tools' dciodvfy / dcentvfy and dcm2niix.

Series (each returns what it was built from, so tests can compare):
* :func:`oblique_ct_series`: a 12 degree oblique CT with cosines stored to 6 digits and positions
  to 5 decimals (the float noise that made spacing read 1.0000004548), pixels from MNI152;
* :func:`ge_rounded_series`: GE-style thick oblique MR slices whose positions are rounded to 0.1 mm,
  so the gaps along the normal read 6.96-7.07 mm around 7 mm;
* :func:`header_series`: a series on a real vendor header (pydicom's CT_small.dcm: GE contrast
  CT; MR_small.dcm: Toshiba MR), one slice per MNI152 plane;
* :func:`siemens_mosaic_series`: nibabel's real Siemens DWI mosaics (b=0 and b=1000 of one series).
"""
from __future__ import annotations

import copy
import gzip
import io
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

LPS_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIBABEL_DATA = Path(nib.__file__).parent / "nicom" / "tests" / "data"
MOSAICS = ("siemens_dwi_0.dcm.gz", "siemens_dwi_1000.dcm.gz")


def rotation(about_x_deg: float, about_y_deg: float = 0.0) -> np.ndarray:
    """An LPS frame tilted about x then y: columns are row cosine, column cosine, slice normal."""
    a, b = np.deg2rad(about_x_deg), np.deg2rad(about_y_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    return ry @ rx


def decimals(values, places: int) -> list[str]:
    """``values`` as a scanner writes them: fixed decimals (``-0.000000`` written ``0.000000``)."""
    return [f"{v + 0.0:.{places}f}".replace("-0.000000", "0.000000") for v in values]


def mni_block(shape: tuple[int, int, int], start=(50, 70, 60), step: int = 1) -> np.ndarray:
    """A real MRI block ``(i, j, k)`` (every ``step``-th plane along k), as uint16 stored values."""
    from nilearn.datasets import MNI152_FILE_PATH

    vol = np.asanyarray(nib.load(MNI152_FILE_PATH).dataobj)
    ni, nj, nk = shape
    i0, j0, k0 = start
    block = vol[i0:i0 + ni, j0:j0 + nj, k0:k0 + nk * step:step].astype(np.uint16) * 12
    assert block.shape == shape and block.max() > 500
    return block


def _plane(template: Dataset, pixels_ij: np.ndarray, k: int, uids: dict, iop: list[str], ipp: list[str],
           pixel_spacing: list[str]) -> Dataset:
    ds = copy.deepcopy(template)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = uids["study"], uids["series"], uids["for"]
    ds.InstanceNumber = k + 1
    ds.ImageOrientationPatient, ds.ImagePositionPatient, ds.PixelSpacing = iop, ipp, pixel_spacing
    ds.Rows, ds.Columns = pixels_ij.shape[1], pixels_ij.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for kw in ("SmallestImagePixelValue", "LargestImagePixelValue", "SliceLocation", "DataSetTrailingPadding"):
        if kw in ds:
            delattr(ds, kw)
    ds.PixelData = np.ascontiguousarray(pixels_ij.T).astype("<u2").tobytes()
    return ds


def write_planes(folder: Path, template: Dataset, block: np.ndarray, rot: np.ndarray, origin: np.ndarray,
                 gap: float, pixel_spacing: tuple[float, float], cosine_places: int = 6,
                 position_places: int = 5, skip: int | None = None, shift: dict[int, float] | None = None) -> dict:
    """One file per plane ``k`` of ``block`` on ``template``'s header: cosines and positions written
    as rounded decimal strings; plane ``skip`` left out; plane ``k`` moved ``shift[k]`` mm along the
    normal. Returns the exact geometry (LPS->RAS affine) and the UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    uids = {"study": generate_uid(), "series": generate_uid(), "for": generate_uid()}
    iop = decimals([*rot[:, 0], *rot[:, 1]], cosine_places)
    spacing = [f"{v:g}" for v in pixel_spacing]  # (between rows, between columns)
    for k in range(block.shape[2]):
        if k == skip:
            continue
        position = origin + (k * gap + (shift or {}).get(k, 0.0)) * rot[:, 2]
        ds = _plane(template, block[:, :, k], k, uids, iop, decimals(position, position_places), spacing)
        ds.save_as(folder / f"IM{(k * 7919) % 10007:05d}.dcm", enforce_file_format=True)  # scrambled names
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1] = rot[:, 0] * pixel_spacing[1], rot[:, 1] * pixel_spacing[0]
    lps[:3, 2], lps[:3, 3] = rot[:, 2] * gap, origin
    return {"affine": LPS_RAS @ lps, "uids": uids, "block": block}


def oblique_ct_series(folder: Path, shape=(80, 80, 80), tilt_deg: float = 12.0, **kw) -> dict:
    """A 12 degree oblique CT (``shape`` = 80 slices of 80x80, 1 mm isotropic) on CT_small's header."""
    template = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    template.RescaleIntercept, template.RescaleSlope = "-1024", "1"
    template.SliceThickness = template.SpacingBetweenSlices = "1.000000"
    block = mni_block(shape, start=(50, 60, 40))
    return write_planes(folder, template, block, rotation(tilt_deg), np.array([-40.0, -61.3, -25.7]),
                        gap=1.0, pixel_spacing=(1.0, 1.0), **kw)


def ge_rounded_series(folder: Path, n_slices: int = 24, **kw) -> dict:
    """GE-style oblique MR: 7 mm slices, positions rounded to 0.1 mm (gaps 6.96-7.07 mm)."""
    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    template.Manufacturer = "GE MEDICAL SYSTEMS"
    template.SliceThickness, template.SpacingBetweenSlices = "6.0", "7.0"
    block = mni_block((40, 48, n_slices), start=(60, 80, 20), step=3)
    return write_planes(folder, template, block, rotation(21.0, 10.0), np.array([-30.0, -52.3, -40.2]),
                        gap=7.0, pixel_spacing=(0.9375, 0.9375), cosine_places=6, position_places=1, **kw)


def header_series(folder: Path, source: str, n_slices: int, gap: float, **kw) -> dict:
    """An axial series on the real header of pydicom's ``source`` file (CT_small.dcm, MR_small.dcm),
    its own orientation and pixel spacing, one MNI152 plane per slice."""
    template = pydicom.dcmread(get_testdata_file(source))
    spacing = tuple(float(v) for v in template.PixelSpacing)
    template.SliceThickness = f"{gap:.6f}"
    block = mni_block((64, 56, n_slices), start=(60, 80, 30), step=2)
    rot = np.column_stack([np.asarray(template.ImageOrientationPatient[:3], float),
                           np.asarray(template.ImageOrientationPatient[3:], float), [0.0, 0.0, 1.0]])
    origin = np.asarray(template.ImagePositionPatient, float)
    return write_planes(folder, template, block, rot, origin, gap=gap, pixel_spacing=spacing, **kw)


def mosaic_pixels(block: np.ndarray) -> np.ndarray:
    """Siemens mosaic pixels ``(rows, cols)`` holding ``block`` ``(i, j, k)``: tile ``k`` at tile row
    ``k // n``, tile column ``k % n`` of an ``n x n`` grid, ``n = ceil(sqrt(slices))``."""
    ni, nj, nk = block.shape
    n = int(np.ceil(np.sqrt(nk)))
    mosaic = np.zeros((n * nj, n * ni), block.dtype)
    for k in range(nk):
        r, c = divmod(k, n)
        mosaic[r * nj:(r + 1) * nj, c * ni:(c + 1) * ni] = block[:, :, k].T
    return mosaic


def siemens_mosaic_series(folder: Path, names=MOSAICS) -> dict:
    """nibabel's real Siemens DWI mosaics (ImageType MOSAIC, CSA header; b=0 and b=1000 of one
    series), written into ``folder`` with real pixels (nibabel's copies carry zeros): volume ``n``
    holds an MNI152 block divided by ``n + 1``. Returns the files and the blocks ``(i, j, k)``."""
    folder.mkdir(parents=True, exist_ok=True)
    files, blocks = [], []
    for n, name in enumerate(names):
        ds = pydicom.dcmread(io.BytesIO(gzip.decompress((NIBABEL_DATA / name).read_bytes())))
        block = np.minimum(mni_block((128, 128, 48), start=(30, 40, 20), step=3) // (n + 1), 4095)  # 12 bits
        ds.PixelData = mosaic_pixels(block).astype("<u2").tobytes()
        path = folder / name.removesuffix(".gz")
        ds.save_as(path)
        files.append(path)
        blocks.append(block)
    return {"files": files, "blocks": blocks}


# ---------------------------------------------------------------------------------------------
# validators


def tool(name: str) -> str | None:
    return shutil.which(name)


def _run(args: list[str]) -> str:
    proc = subprocess.run(args, check=False, capture_output=True, text=True, timeout=300)  # validators exit 1 on findings
    return proc.stdout + proc.stderr


def _key(line: str) -> str:
    """A validator message without the values and file names in it (so source and derived compare)."""
    line = re.sub(r" = <[^>]*>", " = <>", line)
    line = re.sub(r"for file <[^>]*> versus <[^>]*>", "", line)
    return re.sub(r"\d+", "#", line).strip()


def dciodvfy(path: Path) -> dict[str, list[str]]:
    """dciodvfy's ``Error``/``Warning`` lines for one file, by kind."""
    lines = _run(["dciodvfy", str(path)]).splitlines()
    return {kind: [ln for ln in lines if ln.startswith(f"{kind} - ")] for kind in ("Error", "Warning")}


def new_errors(source: Path, derived: Path) -> list[str]:
    """dciodvfy Errors on ``derived`` that the source does not have."""
    have = {_key(e) for e in dciodvfy(source)["Error"]}
    return [e for e in dciodvfy(derived)["Error"] if _key(e) not in have]


def dcentvfy(files: list[Path]) -> list[str]:
    """dcentvfy's messages on ``files`` (source and derived together: one patient, one study)."""
    return [ln for ln in _run(["dcentvfy", *map(str, files)]).splitlines() if ln.strip()]


def dcm2niix(folder: Path, out: Path) -> nib.Nifti1Image:
    """dcm2niix's NIfTI of the one series in ``folder``."""
    out.mkdir(parents=True, exist_ok=True)
    log = _run(["dcm2niix", "-z", "n", "-b", "n", "-f", "series", "-o", str(out), str(folder)])
    found = sorted(out.glob("*.nii"))
    assert len(found) == 1, f"dcm2niix wrote {[p.name for p in found]}:\n{log}"
    return nib.load(found[0])


def canonical(affine: np.ndarray, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``affine`` and ``data`` reoriented to the closest RAS axes (so two readers' voxel orders compare)."""
    data = data.reshape(data.shape + (1,) * (3 - data.ndim))
    ornt = nib.io_orientation(affine)
    return affine @ nib.orientations.inv_ornt_aff(ornt, data.shape), nib.orientations.apply_orientation(data, ornt)
