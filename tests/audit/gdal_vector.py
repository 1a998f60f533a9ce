"""GDAL's own vector reader (the OGR GeoJSON driver QGIS opens files with), reached through the
libgdal that rasterio's wheel bundles (ctypes: no fiona/pyogrio/ogrinfo needed). ``read_vector``
returns what OGR sees: layer count, spatial reference, and per feature the geometry type,
validity (GEOS), envelope and fields."""
from __future__ import annotations

import ctypes
import glob
import os
from pathlib import Path
from typing import Any

_OF_VECTOR, _WKB_POLYGON = 0x04, 3


class _Envelope(ctypes.Structure):
    _fields_ = [("min_x", ctypes.c_double), ("max_x", ctypes.c_double), ("min_y", ctypes.c_double),
                ("max_y", ctypes.c_double)]


def libgdal() -> ctypes.CDLL | None:
    """rasterio's bundled libgdal (or the system's), or ``None``."""
    import rasterio

    found = sorted(glob.glob(os.path.join(os.path.dirname(rasterio.__file__) + ".libs", "libgdal*.so*")))
    found += sorted(glob.glob("/usr/lib/*/libgdal.so*"))
    if not found:
        return None
    lib = ctypes.CDLL(found[0])
    for name, res in (("GDALOpenEx", ctypes.c_void_p), ("GDALDatasetGetLayer", ctypes.c_void_p),
                      ("OGR_L_GetNextFeature", ctypes.c_void_p), ("OGR_F_GetGeometryRef", ctypes.c_void_p),
                      ("OGR_L_GetSpatialRef", ctypes.c_void_p), ("OGR_L_GetLayerDefn", ctypes.c_void_p),
                      ("OGR_FD_GetFieldDefn", ctypes.c_void_p), ("OGR_Fld_GetNameRef", ctypes.c_char_p),
                      ("OSRGetAuthorityCode", ctypes.c_char_p), ("OGR_F_GetFieldAsString", ctypes.c_char_p),
                      ("CPLGetLastErrorMsg", ctypes.c_char_p), ("OGR_F_GetFID", ctypes.c_longlong),
                      ("OGR_L_GetFeatureCount", ctypes.c_longlong)):
        getattr(lib, name).restype = res
    for name in ("GDALDatasetGetLayer", "OGR_L_GetNextFeature", "OGR_F_GetGeometryRef", "OGR_L_GetSpatialRef",
                 "OGR_L_GetLayerDefn", "OGR_G_IsValid", "OGR_G_GetGeometryType", "OGR_F_Destroy", "GDALClose",
                 "OGR_FD_GetFieldCount", "OGR_L_GetFeatureCount", "OGR_F_GetFID", "GDALDatasetGetLayerCount"):
        getattr(lib, name).argtypes = [ctypes.c_void_p] + ([ctypes.c_int] if name in (
            "GDALDatasetGetLayer", "OGR_L_GetFeatureCount") else [])
    lib.OGR_FD_GetFieldDefn.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.OGR_Fld_GetNameRef.argtypes = [ctypes.c_void_p]
    lib.OGR_F_GetFieldAsString.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.OGR_G_GetEnvelope.argtypes = [ctypes.c_void_p, ctypes.POINTER(_Envelope)]
    lib.OSRGetAuthorityCode.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.OGR_L_ResetReading.argtypes = [ctypes.c_void_p]
    lib.GDALAllRegister()
    return lib


def read_vector(path: Path) -> dict[str, Any]:
    """What GDAL/OGR reads from the vector file at ``path`` (AssertionError if it cannot open it)."""
    lib = libgdal()
    assert lib is not None, "no libgdal"
    ds = lib.GDALOpenEx(str(path).encode(), _OF_VECTOR, None, None, None)
    assert ds, f"GDAL cannot open {path}: {lib.CPLGetLastErrorMsg()!r}"
    try:
        layer = lib.GDALDatasetGetLayer(ds, 0)
        srs = lib.OGR_L_GetSpatialRef(layer)
        defn = lib.OGR_L_GetLayerDefn(layer)
        fields = [lib.OGR_Fld_GetNameRef(lib.OGR_FD_GetFieldDefn(defn, i)).decode()
                  for i in range(lib.OGR_FD_GetFieldCount(defn))]
        features = []
        lib.OGR_L_ResetReading(layer)
        while feat := lib.OGR_L_GetNextFeature(layer):
            geom = lib.OGR_F_GetGeometryRef(feat)
            env = _Envelope()
            lib.OGR_G_GetEnvelope(geom, ctypes.byref(env))
            features.append({
                "fid": lib.OGR_F_GetFID(feat), "polygon": lib.OGR_G_GetGeometryType(geom) == _WKB_POLYGON,
                "valid": bool(lib.OGR_G_IsValid(geom)),
                "envelope": (env.min_x, env.min_y, env.max_x, env.max_y),
                "fields": {name: lib.OGR_F_GetFieldAsString(feat, i).decode() for i, name in enumerate(fields)}})
            lib.OGR_F_Destroy(feat)
        return {"layers": lib.GDALDatasetGetLayerCount(ds), "count": lib.OGR_L_GetFeatureCount(layer, 1),
                "epsg": None if not srs else (lib.OSRGetAuthorityCode(srs, None) or b"").decode(),
                "fields": fields, "features": features}
    finally:
        lib.GDALClose(ds)
