"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) via nibabel.

Reading gives ``data`` of shape ``(C, i, j, k)`` (a 4D file's last axis becomes channels) holding
the *physical* values: ``scl_slope``/``scl_inter`` are applied (float32) when they mean anything
other than identity, otherwise the on-disk dtype is kept. ``geometry.affine`` is the affine
nibabel picks (sform if its code is > 0, else qform, else pixdim), converted to millimetres when
``xyzt_units`` says metres or microns.

``img.meta["nifti"]`` keeps the raw header fields (sform/qform, their codes, the quaternion, pixdim,
scaling, units, intent, description, slice timing, display range) as plain JSON-able values, so
``write_nifti(read_nifti(f))`` reproduces the header geometry bit for bit (a form left at code 0 is
filled in from the other, "unknown" units become mm: every file written has both forms, both codes
and mm); ``meta["storage_dtype"]`` is the on-disk dtype. Header extensions are not carried over.
:func:`risk_map_meta` gives a map on an image's grid (the audit risk map) the same forms and codes,
with an intent and a description of its volumes.
"""
from __future__ import annotations

import copy
import math
import zlib
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from nibabel.filebasedimages import ImageFileError
from nibabel.spatialimages import HeaderDataError

from domainsr.errors import InputError, OutputError, UnsupportedFormatError
from domainsr.image import DOMAINS, MedicalGeometry, SpatialImage
from domainsr.io.atomic import atomic_path
from domainsr.io.formats import FORMATS
from domainsr.limits import check_fits, decoded_bytes

DERIVED_DESCRIP = "DomainSR AI-enhanced (derived)"
# Deflate cannot compress better than ~1032:1, so a .nii.gz whose header claims more bytes than
# that is corrupt (or hostile) and is refused before anything is allocated.
_MAX_DEFLATE_RATIO = 1032
_UNIT_TO_MM = {"meter": 1000.0, "mm": 1.0, "micron": 1e-3}
_READ_ERRORS = (ImageFileError, HeaderDataError, OSError, EOFError, ValueError, zlib.error)


def _is_gz(path: Path) -> bool:
    return path.name.lower().endswith(".gz")


def _check_suffix(path: Path, error: type[Exception]) -> None:
    if not path.name.lower().endswith(FORMATS["nifti"].suffixes):
        raise error("not a NIfTI file name (expected .nii or .nii.gz)", path)


def _scaling(slope: float | None, inter: float | None) -> tuple[float, float] | None:
    """``(slope, inter)`` when they change values, ``None`` for identity or 'no scaling'."""
    if slope is None or not math.isfinite(slope) or slope == 0:
        return None
    inter = 0.0 if inter is None or not math.isfinite(inter) else float(inter)
    if slope == 1.0 and inter == 0.0:
        return None
    return float(slope), inter


def _header_meta(hdr: nib.Nifti1Header, shape: tuple[int, ...]) -> dict[str, Any]:
    def f(name: str) -> Any:
        return hdr[name].tolist()

    def text(name: str) -> str:
        return bytes(hdr[name]).split(b"\x00")[0].decode("latin-1")

    sform, scode = hdr.get_sform(coded=True)
    qform, qcode = hdr.get_qform(coded=True)
    return {
        "version": 2 if isinstance(hdr, nib.Nifti2Header) else 1,
        "shape": list(shape),
        "sform": None if sform is None else sform.tolist(),
        "sform_code": int(scode),
        "qform": None if qform is None else qform.tolist(),
        "qform_code": int(qcode),
        "srow": [f("srow_x"), f("srow_y"), f("srow_z")],
        "quatern": [f("quatern_b"), f("quatern_c"), f("quatern_d")],
        "qoffset": [f("qoffset_x"), f("qoffset_y"), f("qoffset_z")],
        "pixdim": f("pixdim"),
        "scl_slope": f("scl_slope"),
        "scl_inter": f("scl_inter"),
        "xyzt_units": int(hdr["xyzt_units"]),
        "descrip": text("descrip"),
        "aux_file": text("aux_file"),
        "intent": {"code": int(hdr["intent_code"]), "name": text("intent_name"),
                   "params": [f("intent_p1"), f("intent_p2"), f("intent_p3")]},
        "dim_info": int(hdr["dim_info"]),
        "slice": {"code": int(hdr["slice_code"]), "start": int(hdr["slice_start"]),
                  "end": int(hdr["slice_end"]), "duration": f("slice_duration")},
        "cal": [f("cal_min"), f("cal_max")],
        "toffset": f("toffset"),
    }


def _mm_per_unit(xyzt_units: int) -> float:
    hdr = nib.Nifti1Header()
    hdr["xyzt_units"] = xyzt_units
    return _UNIT_TO_MM.get(hdr.get_xyzt_units()[0], 1.0)


def read_nifti(path: str | Path, domain: str = "mri") -> SpatialImage:
    """Read a NIfTI volume as ``(C, i, j, k)`` physical values with its RAS+ mm affine."""
    p = Path(path)
    if domain not in DOMAINS:
        raise InputError(f"unknown domain {domain!r}; expected one of {DOMAINS}", p)
    if not p.is_file():
        raise InputError("file not found", p)
    _check_suffix(p, UnsupportedFormatError)
    try:
        nii = nib.load(p, mmap=False)  # voxels are copied into memory anyway; no file-backed views
    except _READ_ERRORS as exc:
        raise InputError(f"not a readable NIfTI file: {exc}", p) from exc
    if not isinstance(nii, (nib.Nifti1Image, nib.Nifti2Image)):
        raise UnsupportedFormatError(f"{type(nii).__name__} is not a single-file NIfTI image", p)
    # nibabel moves scl_slope/inter out of ``nii.header`` into the data proxy; the raw header, as
    # stored, is read once more (348/540 bytes) so that meta keeps every field as it was.
    try:
        with nii.file_map["image"].get_prepare_fileobj("rb") as fobj:
            hdr = type(nii.header).from_fileobj(fobj, check=False)
    except _READ_ERRORS as exc:
        raise InputError(f"cannot read the NIfTI header: {exc}", p) from exc
    shape = tuple(int(s) for s in nii.shape)
    if not shape or any(s <= 0 for s in shape):
        raise InputError(f"header has a zero-size dimension: shape {shape}", p)
    dtype = np.dtype(hdr.get_data_dtype())
    if dtype.fields is not None or dtype.kind not in "uif":
        raise UnsupportedFormatError(f"voxel data type {dtype} is not supported (integer or real voxels only; "
                                     "complex and RGB NIfTI images are not intensity volumes)", p)
    need = math.prod(shape) * dtype.itemsize
    size = p.stat().st_size
    if _is_gz(p):
        if need > _MAX_DEFLATE_RATIO * size + 65536:
            raise InputError(
                f"header claims shape {shape} {dtype} ({need} bytes), impossible in a {size}-byte gzip file", p)
    elif int(nii.dataobj.offset) + need > size:
        raise InputError(
            f"file truncated: header claims shape {shape} {dtype} needing "
            f"{int(nii.dataobj.offset) + need} bytes, file has {size}", p)
    scaled = _scaling(*hdr.get_slope_inter()) is not None
    check_fits(decoded_bytes(shape, dtype) + (decoded_bytes(shape, np.float32) if scaled else 0),
               f"decoding shape {shape} {dtype}", p)
    try:
        raw = np.asanyarray(nii.dataobj.get_unscaled())
    except _READ_ERRORS as exc:  # truncated gzip stream, short read, corrupt deflate data
        raise InputError(f"cannot read voxel data (truncated or corrupt file): {exc}", p) from exc
    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)

    scale = _scaling(*hdr.get_slope_inter())
    if scale is None:
        values = raw
    else:
        values = raw.astype(np.float32) * np.float32(scale[0]) + np.float32(scale[1])

    if values.ndim == 2:
        values = values[..., None]
    spatial = values.shape[:3]
    values = np.moveaxis(values.reshape(*spatial, -1), -1, 0)

    meta = _header_meta(hdr, shape)
    affine = np.array(hdr.get_best_affine(), dtype=np.float64)
    affine[:3, :] *= _mm_per_unit(meta["xyzt_units"])
    return SpatialImage(
        data=np.ascontiguousarray(values),
        domain=domain,  # type: ignore[arg-type]
        geometry=MedicalGeometry(affine, spatial),
        units="HU" if domain == "ct" else "a.u.",
        provenance={"source": str(p), "format": "nifti"},
        meta={"nifti": meta, "storage_dtype": str(dtype.newbyteorder("="))},
    )


def _header_from_meta(nm: dict[str, Any], shape: tuple[int, ...], dtype: np.dtype,
                      version: int) -> nib.Nifti1Header:
    hdr = nib.Nifti2Header() if version == 2 else nib.Nifti1Header()
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    if not nm:
        return hdr
    pixdim = list(nm["pixdim"])
    pixdim[1 + len(shape):] = [1.0] * (7 - len(shape))
    hdr["pixdim"] = pixdim
    for key, vals in zip(("quatern_b", "quatern_c", "quatern_d"), nm["quatern"]):
        hdr[key] = vals
    for key, vals in zip(("qoffset_x", "qoffset_y", "qoffset_z"), nm["qoffset"]):
        hdr[key] = vals
    for key, row in zip(("srow_x", "srow_y", "srow_z"), nm["srow"]):
        hdr[key] = row
    hdr["qform_code"] = nm["qform_code"]
    hdr["sform_code"] = nm["sform_code"]
    hdr["xyzt_units"] = nm["xyzt_units"]
    hdr["aux_file"] = nm["aux_file"].encode("latin-1")[:24]
    hdr["intent_code"] = nm["intent"]["code"]
    hdr["intent_name"] = nm["intent"]["name"].encode("latin-1")[:16]
    hdr["intent_p1"], hdr["intent_p2"], hdr["intent_p3"] = nm["intent"]["params"]
    hdr["dim_info"] = nm["dim_info"]
    sl = nm["slice"]
    hdr["slice_code"], hdr["slice_start"], hdr["slice_end"] = sl["code"], sl["start"], sl["end"]
    hdr["slice_duration"] = sl["duration"]
    hdr["cal_min"], hdr["cal_max"] = nm["cal"]
    hdr["toffset"] = nm["toffset"]
    return hdr


def _to_storage(arr: np.ndarray, dtype: np.dtype, scale: tuple[float, float] | None,
                path: Path) -> np.ndarray:
    """Physical values -> on-disk values: undo scaling, round, clip to the dtype's range."""
    if scale is not None:
        arr = (arr.astype(np.float64) - scale[1]) / scale[0]
    if dtype.kind == "f":
        return arr.astype(dtype)
    if dtype.kind not in "iub":
        raise OutputError(f"unsupported NIfTI storage dtype {dtype}", path)
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        if bad:
            raise OutputError(f"{bad} non-finite values cannot be stored as {dtype}", path)
        arr = np.rint(arr)
    info = np.iinfo(dtype) if dtype.kind != "b" else np.iinfo(np.uint8)
    return np.clip(arr, info.min, info.max).astype(dtype)


def _in_mm(affine: np.ndarray, mm: float) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, :] *= mm
    return out


def _time_unit(hdr: nib.Nifti1Header) -> str:
    unit = hdr.get_xyzt_units()[1]
    return "sec" if unit == "unknown" else unit


def _fill_forms(hdr: nib.Nifti1Header) -> None:
    """Unchanged geometry: keep both forms as they are; a form the source left unset (code 0) gets
    the other one (and its code); neither set: both get the affine read, as scanner (1)."""
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    if scode and qcode:
        pass
    elif scode:
        hdr.set_qform(hdr.get_sform(), code=scode)
    elif qcode:
        hdr.set_sform(hdr.get_qform(), code=qcode)
    else:
        affine = hdr.get_best_affine()
        hdr.set_qform(affine, code=1)
        hdr.set_sform(affine, code=1)
    if hdr.get_xyzt_units()[0] == "unknown":  # read as mm: say so
        hdr.set_xyzt_units("mm", _time_unit(hdr))


def _moved_qform(hdr: nib.Nifti1Header, mm: float, new: np.ndarray) -> np.ndarray:
    """A source qform that is a frame of its own (differs from the sform) moved with the grid
    change ``sform_old -> new``; otherwise ``new``."""
    s_old, q_old = _in_mm(hdr.get_sform(), mm), _in_mm(hdr.get_qform(), mm)
    if np.allclose(q_old, s_old, rtol=0, atol=1e-4):
        return new
    try:
        return q_old @ np.linalg.inv(s_old) @ new
    except np.linalg.LinAlgError:
        return new


def _regrid_forms(hdr: nib.Nifti1Header, mm: float, new: np.ndarray) -> None:
    """Changed geometry ``new`` (mm): sform = ``new`` exactly, qform = ``new`` too (or the
    source's own qform frame moved with the grid), both codes set (the source's, the other form's
    where one was 0, scanner where both were), zooms and units mm.

    A qform cannot hold a shear (a gantry-tilted CT): nibabel then stores its nearest rigid
    transform (polar decomposition; the origin is exact) under the same code, as
    ``set_qform(strip_shears=True)`` does; the sform keeps the sheared grid exactly and wins
    wherever its code is read (nibabel, FSL, SPM, ITK for a non-sheared sform).
    """
    scode, qcode = int(hdr["sform_code"]), int(hdr["qform_code"])
    qform = _moved_qform(hdr, mm, new) if scode and qcode else new
    code = scode or qcode or 1
    time_unit = _time_unit(hdr)
    hdr.set_qform(qform, code=qcode or code)  # also sets pixdim[0] (qfac) and the zooms
    hdr.set_sform(new, code=code)
    hdr.set_xyzt_units("mm", time_unit)


def _descrip(img: SpatialImage, nm: dict[str, Any]) -> bytes:
    descrip = nm.get("descrip", "")
    if img.provenance.get("model"):
        model = img.provenance["model"]
        name = model.get("name", "") if isinstance(model, dict) else str(model)
        descrip = f"{DERIVED_DESCRIP} {name}".strip()
    return descrip.encode("latin-1", "replace")[:80]


def write_nifti(img: SpatialImage, path: str | Path) -> Path:
    """Write ``img`` as NIfTI (atomically) in its storage dtype; returns the path written.

    The storage dtype is ``meta["storage_dtype"]`` of an image read from NIfTI, else the data's
    dtype; values are rounded and clipped to it, after undoing the source's scl_slope/inter.

    Every file written has both sform and qform set, with codes > 0, and spatial units. An
    unchanged geometry keeps the source's sform/qform fields bit for bit (a form the source left
    at code 0 is filled in from the other; units "unknown", read as mm, become mm). A changed
    one (e.g. ``geometry.scaled``) is written in mm as sform and qform, see :func:`_regrid_forms`.
    """
    p = Path(path)
    _check_suffix(p, OutputError)
    if not isinstance(img.geometry, MedicalGeometry) or img.geometry.ndim != 3:
        raise OutputError("NIfTI output needs a 3D MedicalGeometry", p)
    nm: dict[str, Any] = img.meta.get("nifti", {})
    # Another format's storage dtype (DICOM's uint16 before its rescale) says nothing about
    # NIfTI storage: without NIfTI metadata the values are stored in the data's own dtype.
    dtype = np.dtype(img.meta.get("storage_dtype") if nm else img.data.dtype)
    spatial = img.geometry.shape
    arr = img.data[0] if img.channels == 1 else np.moveaxis(img.data, 0, -1)
    src_shape = tuple(nm.get("shape", ()))
    if len(src_shape) > 4 and math.prod(src_shape[3:]) == img.channels:
        arr = arr.reshape(*spatial, *src_shape[3:])
    elif len(src_shape) == 2 and spatial[2] == 1 and img.channels == 1:
        arr = arr[..., 0]
    scale = _scaling(nm.get("scl_slope"), nm.get("scl_inter")) if nm else None
    stored = _to_storage(arr, dtype, scale, p)

    version = 2 if nm.get("version") == 2 or max(stored.shape) > 32767 else 1
    hdr = _header_from_meta(nm, stored.shape, dtype, version)
    mm = _mm_per_unit(nm["xyzt_units"]) if nm else 1.0
    unchanged = bool(nm) and tuple(src_shape[:3]) == tuple(spatial) and np.allclose(
        _in_mm(hdr.get_best_affine(), mm), img.geometry.affine, rtol=0, atol=1e-6)
    if unchanged:
        _fill_forms(hdr)
    else:
        _regrid_forms(hdr, mm, img.geometry.affine)
    if nm:  # as in the source: its scaling, or its own way of saying 'none' (NaN, 0 or 1/0)
        hdr["scl_slope"], hdr["scl_inter"] = nm["scl_slope"], nm["scl_inter"]
    else:
        hdr.set_slope_inter(1.0, 0.0)
    hdr["descrip"] = _descrip(img, nm)

    cls = nib.Nifti2Image if version == 2 else nib.Nifti1Image
    # No affine given, so nibabel keeps our sform/qform fields untouched. Its constructor resets
    # the scaling (NaN = 'choose on write'); set the source's values on the image's header.
    out = cls(stored, None, header=hdr)
    out.header["scl_slope"], out.header["scl_inter"] = hdr["scl_slope"], hdr["scl_inter"]
    with atomic_path(p) as tmp:
        nib.save(out, tmp)
    return p


# --------------------------------------------------------------------------------- companion maps

#: What the two volumes of an audit risk map hold (NIfTI descrip, at most 80 characters).
RISK_DESCRIP = "DomainSR risk map: vol1 risk; vol2 class 0 n/a 1 same 2 better 3 omit 4 halluc"
RISK_TAGS = {"DOMAINSR_PRODUCT": "audit risk map: band 1 hallucination risk (relative excess error), band 2 "
                                 "class (0 invalid, 1 unchanged, 2 improved, 3 omitted, 4 hallucinated)"}


def _file_descrip(path: str | Path) -> str:
    return bytes(nib.load(path).header["descrip"].item()).split(b"\0")[0].decode("latin-1").strip()


def carries_marker(path: str | Path) -> bool:
    """Whether the NIfTI file at ``path`` is a DomainSR output (its description starts with
    :data:`DERIVED_DESCRIP`)."""
    return _file_descrip(path).startswith(DERIVED_DESCRIP)


def marker_model(path: str | Path) -> str | None:
    """The model named after :data:`DERIVED_DESCRIP` in the file's description, or ``None``."""
    text = _file_descrip(path)
    return (text[len(DERIVED_DESCRIP):].strip() or None) if text.startswith(DERIVED_DESCRIP) else None


def companion_meta(like: SpatialImage, *, descrip: str, intent: str = "estimate",
                   intent_name: str = "") -> dict[str, Any]:
    """``meta["nifti"]`` for a map on ``like``'s grid (a risk map next to an SR output): written
    with :func:`write_nifti` it gets the same sform/qform and codes as ``like`` has when written,
    float values without scaling, and ``intent`` / ``descrip`` saying what its volumes are."""
    shape = tuple(like.spatial_shape)
    nm = copy.deepcopy(like.meta.get("nifti") or _header_meta(nib.Nifti1Header(), shape))
    code = int(nib.nifti1.intent_codes.code[intent])
    pixdim = list(nm["pixdim"])
    pixdim[4:] = [1.0] * (len(pixdim) - 4)  # the 4th axis holds maps, not time points
    nm.update({
        "shape": list(nm["shape"][:3]), "pixdim": pixdim, "scl_slope": 1.0, "scl_inter": 0.0,
        "descrip": descrip[:80], "aux_file": "", "cal": [0.0, 0.0], "toffset": 0.0, "dim_info": 0,
        "intent": {"code": code, "name": intent_name[:16], "params": [0.0, 0.0, 0.0]},
        "slice": {"code": 0, "start": 0, "end": 0, "duration": 0.0},
    })
    return {"nifti": nm}


def risk_map_meta(like: SpatialImage) -> dict[str, Any]:
    """Metadata of the audit risk map of ``like`` (the SR image), for both writers: the NIfTI
    header (:func:`companion_meta`, intent estimate "risk;class") and GeoTIFF tags."""
    return {**companion_meta(like, descrip=RISK_DESCRIP, intent="estimate", intent_name="risk;class"),
            "raster": {"tags": dict(RISK_TAGS)}}
