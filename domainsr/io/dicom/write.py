"""An AI-derived DICOM series from an enhanced volume (pydicom + highdicom).

Writing
    :func:`write_derived_series` hand-builds classic CT/MR Image Storage instances with pydicom,
    one file per slice. highdicom's classes do not fit: ``SCImage`` (Secondary Capture) has no
    Image Plane module (only PatientOrientation letters), so viewers could neither stack nor
    measure the slices, and the Legacy Converted Enhanced classes produce one multi-frame
    "legacy converted" object, which misstates what a derived, resampled series is. highdicom's
    ``CodedConcept`` builds the coded items (derivation 113085 "Spatial resampling", purpose
    121322 "Source image for image processing operation") and its copy of the standard's module
    tables says which attributes are carried. Every module that still applies is copied from the
    source (patient, study, series context, frame of reference, equipment, acquisition,
    contrast/bolus, the CT/MR acquisition parameters); nothing at the patient, study, equipment or
    frame-of-reference level is added that the source lacks. Each derived slice references, in
    SourceImageSequence and ReferencedSeriesSequence, the source slices either side of it.
    pydicom's value validation is switched off during reads and writes (it logs offending values
    verbatim, which could be patient tags); that switch is process-global while it lasts.
"""
from __future__ import annotations

import datetime as _dt
import re
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pydicom.valuerep import format_number_as_ds

from domainsr.errors import GeometryError, OutputError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.io.dicom.frames import LPS_RAS, ORIENTATION_TOLERANCE, orthonormal
from domainsr.io.dicom.read import stack_axis
from domainsr.io.dicom.series import decode_dataset, quiet_pydicom

_SOP_CLASS_OF_MODALITY = {"CT": CTImageStorage, "MR": MRImageStorage}
#: ImageType value 4 of every derived instance: what marks a series as a DomainSR output.
DERIVED_IMAGE_TYPE = "AI ENHANCED"
# Image-level Type 1/2 attributes of the CT/MR Image modules: present in every derived instance.
_TYPE2_CT = ("KVP", "AcquisitionNumber")
_TYPE2_MR = ("ScanOptions", "MRAcquisitionType", "EchoTime", "EchoTrainLength")


def _ds_value(x: float) -> float:
    """``x`` as it survives a DICOM DS (decimal string, 16 characters)."""
    return float(format_number_as_ds(float(x)))


def _ds(x: float) -> str:
    """``x`` as a DS string at 12 significant digits, so that float noise (0.5000000000000001)
    never reaches the file: scaled spacings and positions are written as their exact decimals."""
    value = float(f"{float(x):.12g}") if abs(x) > 1e-12 else 0.0  # no "-1.2e-17" (or "-0")
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text if len(text) <= 16 else format_number_as_ds(value)


def choose_rescale(values: np.ndarray, dtype: np.dtype, slope: float | None,
                   intercept: float | None) -> tuple[float, float]:
    """RescaleSlope/Intercept so that ``values`` fit ``dtype`` without clipping.

    The source's own pair is kept when the range fits with it (values are then rounded to the
    source's quantisation); otherwise integer values get slope 1 and a shifted integer intercept,
    and anything else a slope spreading the range over the full dtype.
    """
    info = np.iinfo(dtype)
    lo, hi = float(values.min()), float(values.max())

    def fits(m: float, b: float) -> bool:
        return info.min <= np.rint((lo - b) / m) and np.rint((hi - b) / m) <= info.max

    if slope and intercept is not None and fits(slope, intercept):
        return float(slope), float(intercept)
    if np.all(values == np.rint(values)) and hi - lo <= info.max - info.min:
        b = _ds_value(np.floor(lo - info.min)) if lo < info.min else _ds_value(np.ceil(hi - info.max))
        if fits(1.0, b):
            return 1.0, b
    m = max(hi - lo, 1e-6) / (info.max - info.min - 2)  # 1 count margin each side for DS rounding
    m = _ds_value(m * (1 + 1e-9))
    b = _ds_value(lo - m * (info.min + 1))
    return m, b


def _scale_label(img: SpatialImage, src_affine: np.ndarray) -> str:
    src = np.linalg.norm(src_affine[:3, :3], axis=0)
    new = np.asarray(img.geometry.spacing)
    f = [float(v) for v in np.round(src / new, 3)]
    non_unit = {v for v in f if v != 1.0}
    fmt = "{:g}".format
    if len(non_unit) <= 1:
        return f"x{fmt(non_unit.pop() if non_unit else 1)}"
    return "x" + "x".join(fmt(v) for v in f)


def _code_item(code: Any) -> Dataset:
    return CodedConcept(code.value, code.scheme_designator, code.meaning)


def _ref_item(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def _source_template(dm: dict[str, Any]) -> Dataset:
    """The carried source attributes, exactly as encoded in the source when known."""
    if dm.get("template_b64"):
        ds = decode_dataset(dm["template_b64"])
        return Dataset({elem.tag: elem for elem in ds})  # iterating converts the raw elements
    return Dataset.from_json(dm["template"])


def _series_dataset(dm: dict[str, Any], factors: str, model_name: str, description: str) -> Dataset:
    """Everything the derived instances share: source modules, new series, derivation, refs."""
    modality = dm["modality"]
    ds = _source_template(dm)
    for kw in ("PatientPosition",) + (_TYPE2_CT if modality == "CT" else _TYPE2_MR):  # series/image level
        if kw not in ds:
            setattr(ds, kw, None)
    if "Laterality" not in ds and "ImageLaterality" not in ds:  # Type 2C: empty = unknown (new series)
        ds.Laterality = None
    if modality == "MR":
        ds.ScanningSequence = ds.get("ScanningSequence") or "RM"  # research mode
        ds.SequenceVariant = ds.get("SequenceVariant") or "NONE"
    now = _dt.datetime.now()
    ds.SOPClassUID = _SOP_CLASS_OF_MODALITY[modality]
    ds.Modality = modality
    ds.SeriesInstanceUID = generate_uid()
    number = dm.get("series_number")
    ds.SeriesNumber = (int(number) if number is not None else 0) + 1000
    ds.SeriesDescription = (f"SR {factors} {model_name}" + (f" {description}" if description else ""))[:64]
    ds.SeriesDate = ds.ContentDate = ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.SeriesTime = ds.ContentTime = ds.InstanceCreationTime = now.strftime("%H%M%S.%f")
    src_type = dm["image_type"]
    value3 = src_type[2] if len(src_type) > 2 and src_type[2] else ("AXIAL" if modality == "CT" else "OTHER")
    ds.ImageType = ["DERIVED", "SECONDARY", value3, DERIVED_IMAGE_TYPE]
    volume = f" of volume {dm['volume_label']} of the source series" if dm.get("volume_label") else ""
    ds.DerivationDescription = (
        f"AI-enhanced (super-resolution {factors}) by DomainSR model {model_name}{volume}; derived image, "
        "not acquired" + (f". {description}" if description else ""))[:1024]
    ds.DerivationCodeSequence = [_code_item(codes.DCM.SpatialResampling)]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = dm.get("lossy_image_compression") or "00"
    if dm.get("window_center") is not None and dm.get("window_width") is not None:
        ds.WindowCenter = format_number_as_ds(dm["window_center"])
        ds.WindowWidth = format_number_as_ds(dm["window_width"])
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    return ds


def _add_references(ds: Dataset, dm: dict[str, Any], src_k: float) -> None:
    """SourceImageSequence: the source slices either side of (fractional) source index ``src_k``
    (the nearest one when outside; a mosaic once); ReferencedSeriesSequence: the source series with
    those instances (the Common Instance Reference module lists what the instance references)."""
    uids, frames, n = dm["sop_instance_uids"], dm["frame_numbers"], len(dm["sop_instance_uids"])
    near = sorted({int(np.floor(src_k)), int(np.ceil(src_k))} & set(range(n))) or [
        int(np.clip(round(src_k), 0, n - 1))]
    near = list({(uids[s], frames[s]): s for s in near}.values())
    purpose = _code_item(codes.DCM.SourceImageForImageProcessingOperation)
    sources = []
    for s in near:
        item = _ref_item(dm["sop_class_uid"], uids[s])
        if frames[s] is not None:
            item.ReferencedFrameNumber = frames[s]
        item.PurposeOfReferenceCodeSequence = [purpose]
        sources.append(item)
    ds.SourceImageSequence = sources
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = dm["series_instance_uid"]
    ref_series.ReferencedInstanceSequence = [
        _ref_item(dm["sop_class_uid"], uid) for uid in dict.fromkeys(uids[s] for s in near)]
    ds.ReferencedSeriesSequence = [ref_series]


def _check_derivable(img: SpatialImage, dm: dict[str, Any] | None, out: Path, overwrite: bool) -> dict[str, Any]:
    if not dm:
        raise OutputError("image has no DICOM source metadata (meta['dicom']); a derived series "
                          "needs a source series read by read_dicom_series", out)
    if not isinstance(img.geometry, MedicalGeometry) or img.geometry.ndim != 3 or img.channels != 1:
        raise OutputError(f"a DICOM series needs one channel on a 3D grid, got {img.data.shape}", out)
    if dm["modality"] not in _SOP_CLASS_OF_MODALITY:
        raise OutputError(f"derived series are written for CT and MR only, not {dm['modality']!r}", out)
    axis = stack_axis(img)
    if dm.get("n_source_slices") == 1 and axis is not None and img.geometry.shape[axis] > 1:
        raise GeometryError(f"the source is a single slice (2D) but the image has {img.geometry.shape[axis]} "
                            "slices along its normal: scale a single slice in-plane only (e.g. scale 2,2,1)", out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise OutputError("output folder exists and is not empty (pass overwrite=True)", out)
    return dm


@quiet_pydicom()
def write_derived_series(img: SpatialImage, out_dir: str | Path, *, model_name: str | None = None,
                         description: str = "", overwrite: bool = False) -> Path:
    """Write ``img`` (read by :func:`read_dicom_series`, then enhanced) as a new DICOM series.

    One classic CT/MR Image Storage file per slice ``k`` in ``out_dir``, written atomically as a
    whole folder: new Series/SOP Instance UIDs, the source's modules that still apply (patient,
    study, frame of reference, equipment, acquisition, contrast/bolus; nothing added at those
    levels), ImageType ``DERIVED\\SECONDARY\\<value 3>\\AI ENHANCED``, a DerivationDescription naming
    the model, references to the source series and instances, plane geometry from
    ``img.geometry`` (unit, orthogonal cosines; SliceThickness = SpacingBetweenSlices = the new
    slice step, a single source slice keeps its thickness), and a RescaleSlope/Intercept under
    which the values fit the stored 16-bit integers without clipping (:func:`choose_rescale`).
    ``model_name`` defaults to the name in ``img.provenance["model"]``. An existing non-empty
    ``out_dir`` is refused unless ``overwrite`` (OutputError); a single source slice scaled along
    its normal is refused with a GeometryError (a single slice is 2D; not retried).
    """
    out = Path(out_dir)
    if model_name is None:
        model_name = str((img.provenance.get("model") or {}).get("name", "unknown"))
    dm = _check_derivable(img, img.meta.get("dicom"), out, overwrite)
    values = np.asarray(img.data[0], dtype=np.float64)
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise OutputError(f"{bad} non-finite values cannot be stored in DICOM", out)
    src_dtype = np.dtype(dm["storage_dtype"])
    dtype = src_dtype if src_dtype.itemsize == 2 else np.dtype(np.int16)
    slope, intercept = choose_rescale(values, dtype, dm.get("rescale_slope"), dm.get("rescale_intercept"))
    info = np.iinfo(dtype)
    stored = np.clip(np.rint((values - intercept) / slope), info.min, info.max).astype(dtype.newbyteorder("<"))

    lps = LPS_RAS @ img.geometry.affine
    col_spacing, row_spacing = (float(v) for v in np.linalg.norm(lps[:3, :2], axis=0))
    row_cos, col_cos = lps[:3, 0] / col_spacing, lps[:3, 1] / row_spacing
    if abs(row_cos @ col_cos) > ORIENTATION_TOLERANCE:
        raise OutputError("in-plane axes i, j are not orthogonal; not a DICOM image plane", out)
    row_cos, col_cos = orthonormal(np.concatenate([row_cos, col_cos]))
    normal = np.cross(row_cos, col_cos)
    slice_gap = abs(float(lps[:3, 2] @ normal))
    ni, nj, nk = img.geometry.shape
    thickness = dm.get("slice_thickness") if dm.get("n_source_slices") == 1 else None

    src_affine = np.asarray(dm["source_affine"])
    to_source = np.linalg.inv(src_affine) @ img.geometry.affine
    base = _series_dataset(dm, _scale_label(img, src_affine), model_name, description)
    base.ImageOrientationPatient = [_ds(v) for v in (*row_cos, *col_cos)]
    base.PixelSpacing = [_ds(row_spacing), _ds(col_spacing)]
    base.SliceThickness = _ds(thickness or slice_gap)
    base.SpacingBetweenSlices = _ds(slice_gap)
    base.Rows, base.Columns = nj, ni
    base.BitsAllocated = base.BitsStored = 16
    base.HighBit = 15
    base.PixelRepresentation = 1 if dtype.kind == "i" else 0
    base.RescaleSlope = _ds(slope)
    base.RescaleIntercept = _ds(intercept)
    if dm["modality"] == "CT":
        base.RescaleType = "HU"

    with atomic_path(out, is_dir=True) as tmp:
        for k in range(nk):
            ds = Dataset(base)  # shallow: every per-slice element below is a new element
            ds.SOPInstanceUID = generate_uid()
            ds.InstanceNumber = k + 1
            position = lps[:3, 3] + k * lps[:3, 2]
            ds.ImagePositionPatient = [_ds(v) for v in position]
            ds.SliceLocation = _ds(float(position @ normal))
            _add_references(ds, dm, float((to_source @ [(ni - 1) / 2, (nj - 1) / 2, k, 1.0])[2]))
            ds.PixelData = np.ascontiguousarray(stored[:, :, k].T).tobytes()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds.save_as(tmp / f"IM{k + 1:05d}.dcm", enforce_file_format=True)
    return out


_MODEL_IN_DERIVATION = re.compile(r"by DomainSR model ([^\s;]+)")


@quiet_pydicom()
def marker_model(folder: str | Path) -> str | None:
    """The model the series' DerivationDescription names ("... by DomainSR model NAME"), or ``None``
    (``folder``: the series folder, or one of its files)."""
    p = Path(folder)
    first = min((f for f in (p.iterdir() if p.is_dir() else [p]) if f.is_file()), default=None)
    if first is None:
        return None
    ds = pydicom.dcmread(first, stop_before_pixels=True, specific_tags=["DerivationDescription"])
    m = _MODEL_IN_DERIVATION.search(str(ds.get("DerivationDescription", "")))
    return m.group(1) if m else None


@quiet_pydicom()
def carries_marker(folder: str | Path) -> bool:
    """Whether the series in ``folder`` is a DomainSR output (its first instance's ImageType holds
    :data:`DERIVED_IMAGE_TYPE`)."""
    first = min(Path(folder).glob("*.dcm"), default=None)
    ds = None if first is None else pydicom.dcmread(first, stop_before_pixels=True)
    return ds is not None and DERIVED_IMAGE_TYPE in list(ds.get("ImageType", []))
