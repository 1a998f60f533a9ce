"""The audit's exports, each read back by the tool people open it with: GeoJSON (GDAL's OGR
GeoJSON driver, the reader QGIS uses; RFC 7946 structure), the NIfTI label map (nibabel: the SR
output's grid), the DICOM Parametric Map (dicom3tools' dciodvfy: no Error; references the
derived series)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pydicom
import pytest
from pyproj import Transformer

from domainsr.audit import AuditThresholds, audit_heldout, audit_output
from domainsr.audit.exports import (
    GEOJSON,
    LABELS_NIFTI,
    LABELS_RASTER,
    PARAMETRIC_MAP,
    SEGMENTATION,
    region_labels,
    regions_geojson,
    write_exports,
)
from domainsr.image import GeoGeometry
from domainsr.io import read_image, write_image

from .conftest import OpticalDegradation, VolumeDegradation, planted

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "io"))
from dicom_series import header_series
from gdal_vector import libgdal, read_vector

TH = AuditThresholds(tta="off")
S2_BOXES = ((slice(40, 52), slice(70, 82)), (slice(90, 100), slice(20, 34)))

_POSITION = {"type": "array", "minItems": 2, "maxItems": 3, "items": {"type": "number"}}
_RING = {"type": "array", "minItems": 4, "items": _POSITION}
#: RFC 7946 FeatureCollection of Polygon features (the parts this export uses), as JSON Schema.
GEOJSON_SCHEMA = {
    "type": "object", "required": ["type", "features"], "not": {"required": ["crs"]},
    "properties": {
        "type": {"const": "FeatureCollection"},
        "bbox": {"type": "array", "minItems": 4, "maxItems": 4, "items": {"type": "number"}},
        "features": {"type": "array", "items": {
            "type": "object", "required": ["type", "geometry", "properties"],
            "properties": {
                "type": {"const": "Feature"}, "id": {"type": ["integer", "string"]},
                "bbox": {"type": "array", "minItems": 4, "maxItems": 4},
                "geometry": {"type": "object", "required": ["type", "coordinates"], "properties": {
                    "type": {"const": "Polygon"}, "coordinates": {"type": "array", "minItems": 1, "items": _RING}}},
                "properties": {"type": "object", "required": [
                    "id", "kind", "verdict", "peak_risk", "mean_risk", "score", "size", "physical_size",
                    "bbox_index"]}}}}}}


def _amplitude(img, fraction=0.2):
    lo, hi = np.percentile(img.data.reshape(img.channels, -1), [1, 99], axis=1)
    return fraction * (hi - lo)


def _planted_twice(base, boxes, amplitude):
    one = planted(base, boxes[0], amplitude)
    return planted(lambda lr: one(lr), boxes[1], amplitude)


@pytest.fixture(scope="module")
def s2_result(s2_crop):
    from domainsr.audit import interpolation_enhancer

    cubic = interpolation_enhancer("cubic", 4, (2, 2))
    model = _planted_twice(cubic, S2_BOXES, _amplitude(s2_crop))
    res = audit_heldout(s2_crop, model, OpticalDegradation(), scale=(2, 2), thresholds=TH, baseline=cubic)
    assert len(res.regions) >= 2
    return res


def _ccw(ring) -> bool:
    x, y = np.asarray(ring).T
    return float(np.sum(x[:-1] * y[1:] - x[1:] * y[:-1])) > 0


def test_geojson_polygons_are_the_regions_world_boxes(s2_result, tmp_path):
    res = s2_result
    out = write_exports(res, tmp_path)
    assert set(out) == {GEOJSON, LABELS_RASTER}
    doc = json.loads(out[GEOJSON].read_text())
    jsonschema.validate(doc, GEOJSON_SCHEMA)
    assert len(doc["features"]) == len(res.regions)
    back = Transformer.from_crs("EPSG:4326", res.sr.geometry.crs.to_wkt(), always_xy=True)
    for feature, region in zip(doc["features"], res.regions):
        props = feature["properties"]
        assert (props["id"], props["kind"], props["verdict"], props["size"]) == (
            region.id, region.kind, region.verdict, region.size)
        assert props["peak_risk"] == pytest.approx(region.peak_risk) and props["bbox_index"] == region.bbox_index
        (ring,) = feature["geometry"]["coordinates"]
        assert ring[0] == ring[-1] and _ccw(ring)  # closed, right-hand rule
        lon, lat = np.asarray(ring).T
        assert np.all(np.abs(lon) <= 180) and np.all(np.abs(lat) <= 90)
        assert len(ring) > 5  # densified edges, not just the corners
        # back in the raster CRS the ring is the box's outer edges: the region's world box (1 cm)
        x, y = back.transform(lon, lat)
        np.testing.assert_allclose([x.min(), y.min()], region.world.min, atol=0.02)
        np.testing.assert_allclose([x.max(), y.max()], region.world.max, atol=0.02)
        np.testing.assert_allclose(feature["bbox"], [*region.world.lonlat_min, *region.world.lonlat_max], atol=2e-7)


@pytest.mark.skipif(libgdal() is None, reason="no libgdal (rasterio's wheel bundles one)")
def test_gdal_reads_the_geojson_as_valid_wgs84_polygons(s2_result, tmp_path):
    bowtie = tmp_path / "bowtie.geojson"  # the validity check can fail: a self-intersecting ring
    bowtie.write_text(json.dumps({"type": "FeatureCollection", "features": [{"type": "Feature", "properties": {},
                      "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]]}}]}))
    assert read_vector(bowtie)["features"][0]["valid"] is False
    path = write_exports(s2_result, tmp_path)[GEOJSON]
    seen = read_vector(path)
    assert seen["layers"] == 1 and seen["count"] == len(s2_result.regions) and seen["epsg"] == "4326"
    assert {"id", "kind", "verdict", "peak_risk", "mean_risk", "score", "size", "bbox_index"} <= set(seen["fields"])
    for feat, region in zip(seen["features"], s2_result.regions):
        assert feat["polygon"] and feat["valid"]
        assert feat["fields"]["verdict"] == region.verdict
        np.testing.assert_allclose(feat["envelope"], [*region.world.lonlat_min, *region.world.lonlat_max], atol=2e-7)


def test_raster_label_map_is_on_the_sr_grid(s2_result, tmp_path):
    res = s2_result
    path = write_exports(res, tmp_path)[LABELS_RASTER]
    img = read_image(path)
    assert img.data.dtype == np.uint16 and img.data.shape == (1, *res.sr.spatial_shape)
    assert img.geometry.almost_equal(res.sr.geometry, atol=1e-9)
    labels = img.data[0]
    for region in res.regions:
        inside = labels[region.slices()] == region.id
        assert inside.sum() == region.size  # exactly the region's flagged pixels
    assert (labels > 0).sum() == sum(r.size for r in res.regions)


def test_raster_without_geographic_crs_gets_no_geojson_and_says_why(s2_result, tmp_path):
    from rasterio.crs import CRS

    local = CRS.from_wkt('LOCAL_CS["lab bench",UNIT["metre",1],AXIS["x",EAST],AXIS["y",NORTH]]')
    g = s2_result.sr.geometry
    sr = s2_result.sr.derive(s2_result.sr.data, geometry=GeoGeometry(local, g.transform, g.shape))
    res = dataclasses.replace(s2_result, sr=sr)
    out = write_exports(res, tmp_path)
    assert GEOJSON not in out and "no geographic position" in out.skipped[GEOJSON]
    assert not (tmp_path / GEOJSON).exists() and LABELS_RASTER in out


# -------------------------------------------------------------------------------------- volumes

VOL_BOX = (slice(20, 28), slice(24, 32), slice(30, 38))


@pytest.fixture(scope="module")
def vol_result(mni_block):
    from domainsr.audit import interpolation_enhancer

    cubic = interpolation_enhancer("cubic", 1, (2, 2, 2))
    model = planted(cubic, VOL_BOX, _amplitude(mni_block, 0.3))
    res = audit_heldout(mni_block, model, VolumeDegradation(), scale=(2, 2, 2), thresholds=TH, baseline=cubic)
    assert res.regions
    return res


def test_nifti_label_map_has_the_sr_outputs_geometry(vol_result, tmp_path):
    res = vol_result
    out = write_exports(res, tmp_path / "exports")
    assert LABELS_NIFTI in out and PARAMETRIC_MAP in out.skipped and GEOJSON not in out
    sr_file = write_image(res.sr, tmp_path / "sr.nii.gz")
    sr_nii, lab_nii = nib.load(sr_file), nib.load(out[LABELS_NIFTI])
    assert lab_nii.shape == sr_nii.shape[:3] and lab_nii.get_data_dtype() == np.uint16
    np.testing.assert_array_equal(lab_nii.affine, sr_nii.affine)
    np.testing.assert_array_equal(lab_nii.get_sform(), sr_nii.get_sform())
    np.testing.assert_array_equal(lab_nii.get_qform(), sr_nii.get_qform())
    assert lab_nii.header.get_intent()[0] == "label"
    assert "AI-derived" in lab_nii.header["descrip"].item().decode()
    labels = np.asarray(lab_nii.dataobj)
    np.testing.assert_array_equal(labels, region_labels(res))
    first = res.regions[0]
    assert (labels[first.slices()] == first.id).sum() == first.size
    planted_box = np.zeros(labels.shape, bool)
    planted_box[VOL_BOX] = True
    assert (labels[planted_box] > 0).mean() > 0.5  # the planted blob is labelled


# ---------------------------------------------------------------------------------------- DICOM

def _dciodvfy_errors(path: Path) -> list[str]:
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120, check=False)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


@pytest.fixture()
def mr_derived(tmp_path):
    """A real-header MR series (MNI voxels), its x2 through-plane 'SR' with a planted bright block,
    written as a derived series; and the reference-free audit of that SR."""
    from domainsr.io.dicom import read_dicom_series, write_derived_series

    header_series(tmp_path / "src", "MR_small.dcm", n_slices=4, gap=3.0)
    lr = read_dicom_series(tmp_path / "src")
    data = np.repeat(lr.data[0].astype(np.float32), 2, axis=2)
    data[20:30, 16:26, 2:6] += 0.4 * float(np.percentile(data, 99))
    sr = lr.derive(data[None], geometry=lr.geometry.scaled((1, 1, 2)))
    folder = write_derived_series(sr, tmp_path / "derived", model_name="planted-test")
    res = audit_output(sr, lr, thresholds=TH)
    return res, folder


@pytest.mark.skipif(shutil.which("dciodvfy") is None and not os.environ.get("CI"),
                    reason="dciodvfy not installed (tests/stores/install_services.sh installs dicom3tools)")
def test_parametric_map_passes_dciodvfy_and_references_the_derived_series(mr_derived, tmp_path):
    res, folder = mr_derived
    series = [pydicom.dcmread(p) for p in sorted(folder.glob("*.dcm"))]
    out = write_exports(res, tmp_path / "exports", derived_series=folder)
    path = out[PARAMETRIC_MAP]
    assert _dciodvfy_errors(path) == []
    pm = pydicom.dcmread(path)
    first = series[0]
    assert pm.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert (pm.StudyInstanceUID, pm.FrameOfReferenceUID) == (first.StudyInstanceUID, first.FrameOfReferenceUID)
    assert pm.SeriesInstanceUID != first.SeriesInstanceUID and "AI-derived" in pm.SeriesDescription
    (ref_series,) = pm.ReferencedSeriesSequence
    assert ref_series.SeriesInstanceUID == first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref_series.ReferencedInstanceSequence} == {
        d.SOPInstanceUID for d in series}
    mapping = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert mapping.MeasurementUnitsCodeSequence[0].CodeValue == "1"
    # each frame is one derived instance's plane, at its position, holding the risk there (instance
    # k + 1 is slice k of the SR grid); every instance once, in order along the slice normal
    by_uid = {d.SOPInstanceUID: d for d in series}
    frames = pm.pixel_array
    assert frames.dtype == np.float32 and frames.shape == (len(series), first.Rows, first.Columns)
    seen = []
    for f, frame_groups in enumerate(pm.PerFrameFunctionalGroupsSequence):
        ds = by_uid[frame_groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        pos = frame_groups.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose([float(v) for v in pos], [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
        np.testing.assert_allclose(frames[f], res.risk[:, :, int(ds.InstanceNumber) - 1].T, rtol=1e-6)
        seen.append(int(ds.InstanceNumber))
    assert sorted(seen) == list(range(1, len(series) + 1)) and seen in (sorted(seen), sorted(seen)[::-1])
    assert frames.max() > 0  # the planted block's risk is in it
    nifti = write_exports(res, tmp_path / "again")  # no series given: no PM, and the reason
    assert PARAMETRIC_MAP not in nifti and "no derived DICOM series" in nifti.skipped[PARAMETRIC_MAP]


def test_segmentation_of_flagged_regions_passes_dciodvfy_one_segment_per_verdict(mr_derived, tmp_path):
    res, folder = mr_derived
    assert {r.verdict for r in res.regions} & {"review", "fail"}
    series = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    out = write_exports(res, tmp_path, derived_series=series)
    path = out[SEGMENTATION]
    if shutil.which("dciodvfy"):
        assert _dciodvfy_errors(path) == []
    seg = pydicom.dcmread(path)
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
    assert seg.StudyInstanceUID == series[0].StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series[0].SeriesInstanceUID
    verdicts = sorted({r.verdict for r in res.regions if r.verdict != "pass"}, key=["review", "fail"].index)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [f"{v} region(s)" for v in verdicts]
    # the segmented voxels are the label map's voxels of the flagged regions, plane by plane
    import highdicom as hd

    labels = region_labels(res)
    flagged = np.isin(labels, [r.id for r in res.regions if r.verdict != "pass"])
    by_uid = {d.SOPInstanceUID: int(d.InstanceNumber) - 1 for d in series}
    got = np.zeros(flagged.shape, bool)
    seg_doc = hd.seg.Segmentation.from_dataset(seg)
    for frame, groups in zip(seg_doc.pixel_array, seg.PerFrameFunctionalGroupsSequence):
        k = by_uid[groups.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID]
        got[:, :, k] |= frame.T.astype(bool)
    np.testing.assert_array_equal(got, flagged)


def test_parametric_map_refuses_a_series_off_the_risk_grid(mr_derived, tmp_path):
    from domainsr.audit.exports import parametric_map
    from domainsr.errors import GeometryError

    res, folder = mr_derived
    series = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(folder.glob("*.dcm"))]
    for ds in series:  # the series shifted by a third of a pixel: not the grid the risk is on
        ds.ImagePositionPatient = [float(ds.ImagePositionPatient[0]) + float(ds.PixelSpacing[1]) / 3,
                                   *ds.ImagePositionPatient[1:]]
    with pytest.raises(GeometryError, match="do not lie on the map's voxel grid"):
        parametric_map(res, series)
    out = write_exports(res, tmp_path, derived_series=series)  # the other exports are still written
    assert PARAMETRIC_MAP not in out and "voxel grid" in out.skipped[PARAMETRIC_MAP] and LABELS_NIFTI in out


def test_geojson_is_for_rasters_only(vol_result):
    from domainsr.audit.exports import NotExported

    with pytest.raises(NotExported, match="rasters"):
        regions_geojson(vol_result)


def test_every_export_is_an_extra_the_local_store_checks_before_a_run():
    from domainsr.stores.local import EXTRA_LABELS

    assert {GEOJSON, LABELS_NIFTI, LABELS_RASTER, PARAMETRIC_MAP} <= set(EXTRA_LABELS)


def test_overview_and_crop_results_export_on_the_files_grid(s2_result, tmp_path, monkeypatch):
    """A scene audited from files past the overview budget (arrays decimated by ``stride``) and a
    crop of it (a box off the file's origin) export the same region polygons as the full audit."""
    from domainsr.audit import windowed as win
    from domainsr.audit.protocol import audit_files

    write_image(s2_result.sr, tmp_path / "sr.tif")
    write_image(s2_result.lr, tmp_path / "lr.tif")
    full = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH)
    assert full.stride == 1 and full.regions
    monkeypatch.setattr(win, "OVERVIEW_PIXELS", 64 * 64)
    small = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=TH, window=48)
    assert small.stride == 2
    want = write_exports(full, tmp_path / "full")
    got = write_exports(small, tmp_path / "small")
    assert LABELS_RASTER not in got and "windowed" in got.skipped[LABELS_RASTER]
    rings = [f["geometry"] for f in json.loads(want[GEOJSON].read_text())["features"]]
    assert rings and [f["geometry"] for f in json.loads(got[GEOJSON].read_text())["features"]] == rings
    crop = small.crop(small.regions[0], margin_px=8)
    (r0, _), (c0, _) = crop.coverage.box
    assert (r0, c0) != (0, 0)
    out = write_exports(crop, tmp_path / "crop")
    (feature, *_) = json.loads(out[GEOJSON].read_text())["features"]
    assert feature["geometry"] == rings[0]
    labels = read_image(out[LABELS_RASTER])
    assert labels.geometry.almost_equal(full.sr.geometry.cropped((r0, c0), labels.geometry.shape), atol=1e-9)
    region = crop.regions[0]
    box = tuple(slice(a - o, b + 1 - o) for (a, b), o in zip(region.bbox_index, (r0, c0)))
    assert (labels.data[0][box] == region.id).sum() == region.size
