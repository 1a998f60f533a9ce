"""The report: one self-contained HTML (parses, no external resource) + JSON with the same numbers;
patient identifiers pseudonymised; the risk map written aligned with the output."""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pytest

from domainsr.audit import AuditThresholds, audit_heldout, audit_output, write_report, write_risk_map
from domainsr.image import MedicalGeometry, SpatialImage

from .conftest import OpticalDegradation, VolumeDegradation, planted

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class StrictChecker(HTMLParser):
    """Fails on unbalanced tags; collects resource attributes."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.resources: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for name, value in attrs:
            if name in ("src", "href", "srcset", "action", "poster", "data") and value:
                self.resources.append(value)
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()


def check_html(text: str) -> StrictChecker:
    assert text.startswith("<!DOCTYPE html>")
    checker = StrictChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert checker.resources, "figures are embedded as data: URIs"
    assert all(r.startswith("data:image/png;base64,") for r in checker.resources), \
        [r[:40] for r in checker.resources if not r.startswith("data:")]
    assert not re.search(r"https?://", text)  # nothing to fetch: opens offline
    assert "url(" not in text and "<script" not in text and "@import" not in text
    return checker


@pytest.fixture(scope="module")
def s2_result(s2_crop):
    from domainsr.audit import interpolation_enhancer

    cubic = interpolation_enhancer("cubic", 4, (2, 2))
    lo, hi = np.percentile(s2_crop.data.reshape(4, -1), [1, 99], axis=1)
    model = planted(cubic, (slice(40, 52), slice(70, 82)), 0.15 * (hi - lo))
    return audit_heldout(s2_crop, model, OpticalDegradation(), scale=(2, 2), model_info={"name": "planted-test"},
                         thresholds=AuditThresholds(tta="flips", tta_max=2))


def test_raster_report_html_and_json_agree(s2_result, tmp_path):
    html_path, json_path = write_report(s2_result, tmp_path)
    text = html_path.read_text(encoding="utf-8")
    checker = check_html(text)
    assert checker.tags["img"] >= 12  # overview panels, colour bars and the region's crops
    data = json.loads(json_path.read_text(encoding="utf-8"))
    assert data["verdict"] == "fail" == s2_result.verdict
    assert len(data["regions"]) == 1
    reg = data["regions"][0]
    assert reg["bbox_index"] == [[40, 51], [70, 81]]
    assert set(reg["world"]) >= {"space", "min", "max", "centroid", "lonlat_centroid"}
    psnr = data["metrics"]["reference"]["per_metric"]["psnr"]
    assert psnr["model"] == pytest.approx(s2_result.metrics.reference.per_metric.psnr.model)
    assert len(psnr["model"]) == 4 and set(data["metrics"]["reference"]["per_metric"]) >= {"sam", "ergas", "ssim"}
    # the HTML shows the same numbers
    assert f"{psnr['model_mean']:.4g}" in text and f"{psnr['baseline_mean']:.4g}" in text
    assert "FAIL" in text and "planted-test" in text and "true colour (B04/B03/B02)" in text
    assert data["noise"]["uncertainty"]["method"] == "tta-flips"
    assert html_path.stat().st_size < 3_000_000


def test_reference_free_report(s2_result, tmp_path):
    res = audit_output(s2_result.sr, s2_result.lr, thresholds=AuditThresholds(tta="off"))
    html_path, json_path = write_report(res, tmp_path, stem="free")
    text = html_path.read_text(encoding="utf-8")
    check_html(text)
    data = json.loads(json_path.read_text())
    assert data["mode"] == "output" and "reference" not in data["metrics"]
    assert data["regions"][0]["kind"] == "lr-inconsistency"
    assert "<figcaption>HR reference</figcaption>" not in text and "LR-consistency residual" in text


def _as_landsat7(img: SpatialImage, source: str) -> SpatialImage:
    """The S2 crop's blue/green/red/NIR bands under Landsat 7 ETM+ names (B1/B2/B3/B4)."""
    from dataclasses import replace

    return replace(img, band_names=("B1", "B2", "B3", "B4"),
                   provenance={"source": source, "format": "raster", "reader": "raster"})


def test_landsat7_composite_is_labelled_from_its_bands(s2_result, tmp_path):
    """Landsat 7's B4/B3/B2 is NIR/red/green: its true colour is B3/B2/B1, and it says so."""
    name = "/scenes/LE07_L1TP_016041_20200101_20200201_02_T1.tif"
    sr, lr = (_as_landsat7(i, name) for i in (s2_result.sr, s2_result.lr))
    res = audit_output(sr, lr, thresholds=AuditThresholds(tta="off"))
    text = write_report(res, tmp_path, stem="l7")[0].read_text(encoding="utf-8")
    check_html(text)
    assert "true colour (B3/B2/B1), Landsat 4-7 TM/ETM+" in text
    assert "true colour (B4/B3/B2)" not in text


@pytest.mark.parametrize(("names", "kw", "shown", "label"), [
    (("B02", "B03", "B04", "B08"), {}, "B04 B03 B02", "true colour (B04/B03/B02), Sentinel-2 MSI"),
    (("B1", "B2", "B3", "B4", "B5", "B6_VCID_1", "B6_VCID_2", "B7", "B8"), {}, "B3 B2 B1",
     "true colour (B3/B2/B1), Landsat 4-7 TM/ETM+"),
    (("B2", "B3", "B4"), {"hints": ["LE07_L2SP_016041_20200101"]}, "B4 B3 B2",
     "false colour NIR/red/green (B4/B3/B2), Landsat 4-7 TM/ETM+"),
    (("SR_B1", "SR_B2", "SR_B3", "SR_B4", "SR_B5", "SR_B7"), {"hints": ["landsat-7"]}, "SR_B3 SR_B2 SR_B1",
     "true colour (SR_B3/SR_B2/SR_B1), Landsat 4-7 TM/ETM+"),
    (("B1", "B2", "B3", "B4", "B5", "B6", "B7", "B9", "B10", "B11"), {}, "B4 B3 B2",
     "true colour (B4/B3/B2), Landsat 8/9 OLI"),
    (("B2", "B3", "B4", "B5"), {"hints": ["LC08_L1TP_042034_20200101"]}, "B4 B3 B2",
     "true colour (B4/B3/B2), Landsat 8/9 OLI"),
    (("B2", "B3", "B4"), {}, "B4 B3 B2", "bands B4/B3/B2 as R/G/B (sensor unknown: not necessarily true colour)"),
    (("a", "b", "c"), {"common": ["blue", "green", "red"]}, "c b a", "true colour (c/b/a)"),
    (("x", "y", "z"), {"common": ["green", "red", "nir"]}, "z y x", "false colour NIR/red/green (z/y/x)"),
    (("Red", "Green", "Blue"), {}, "Red Green Blue", "true colour (Red/Green/Blue)"),
])
def test_composite_labels_name_the_real_bands(names, kw, shown, label):
    from domainsr.audit import figures as fg

    sensor = fg.sensor_from_hints(kw.get("hints", []))
    idx, text = fg.composite_bands(names, sensor, kw.get("common"))
    assert text == label
    assert [names[i] for i in idx] == shown.split()


def test_no_composite_without_a_clue():
    from domainsr.audit import figures as fg

    assert fg.composite_bands(("B5", "B6", "B7")) is None
    assert fg.sensor_from_hints(["/data/tm_free/olive_groves_s2x.tif", "landsat-c2-l2"]) is None


def _volume_with_identifiers(block, source):
    template = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Johnathan"}]},
                "00100020": {"vr": "LO", "Value": ["PID-778899"]},
                "00080050": {"vr": "SH", "Value": ["ACC-4455"]}}
    meta = {"dicom": {"template": template, "modality": "MR", "series_instance_uid": "1.2.3.4.5.6789"},
            "storage_dtype": "uint8"}
    return SpatialImage(np.asarray(block.data, np.float32), "mri", block.geometry, units="a.u.",
                        provenance={"source": source, "reader": "dicom"}, meta=meta)


def test_volume_report_pseudonymises_patients(mni_block, tmp_path, monkeypatch):
    from domainsr.audit import interpolation_enhancer

    monkeypatch.setenv("DOMAINSR_PSEUDONYM_SALT", "test-salt")
    ref = _volume_with_identifiers(mni_block, "/pacs/Doe_Johnathan/T1_series")
    cubic = interpolation_enhancer("cubic", 1, (2, 2, 2))
    model = planted(cubic, (slice(20, 30), slice(30, 40), slice(24, 34)), [40.0])
    res = audit_heldout(ref, model, VolumeDegradation(), scale=(2, 2, 2), thresholds=AuditThresholds(tta="off"))
    html_path, json_path = write_report(res, tmp_path)
    for path in (html_path, json_path):
        text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", path.read_text(encoding="utf-8"))
        for secret in ("Doe", "Johnathan", "PID-778899", "ACC-4455", "1.2.3.4.5.6789", "/pacs/"):
            assert secret not in text, (path.name, secret)
        assert "pseudonymised" in text
    text = html_path.read_text(encoding="utf-8")
    check_html(text)
    for plane in ("axial", "coronal", "sagittal"):
        assert plane in text
    data = json.loads(json_path.read_text())
    pid = data["provenance"]["reference"]["dicom"]["patient_id"]
    assert pid.startswith("anon-") and len(pid) == 17
    # the same input gives the same pseudonym; allow_identifiers shows the real values
    res2 = audit_output(res.sr, res.lr, res.reference, allow_identifiers=True, thresholds=AuditThresholds(tta="off"))
    shown = res2.summary().to_json()
    assert "PID-778899" in shown and "Doe^Johnathan" in shown
    res3 = audit_output(res.sr, res.lr, res.reference, thresholds=AuditThresholds(tta="off"))
    assert res3.summary().provenance["reference"]["dicom"]["patient_id"] == pid


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_risk_map_is_written_on_the_output_grid(s2_result, mni_block, tmp_path, suffix):
    from domainsr.io import read_image

    if suffix == ".tif":
        res = s2_result
    else:
        from domainsr.audit import interpolation_enhancer

        cubic = interpolation_enhancer("cubic", 1, (2, 2, 2))
        model = planted(cubic, (slice(20, 30), slice(30, 40), slice(24, 34)), [40.0])
        res = audit_heldout(mni_block, model, VolumeDegradation(), scale=(2, 2, 2),
                            thresholds=AuditThresholds(tta="off"))
    path = write_risk_map(res, tmp_path / f"risk{suffix}")
    back = read_image(path)
    assert back.geometry.almost_equal(res.sr.geometry, atol=1e-4)
    assert back.data.shape == (2,) + res.sr.spatial_shape
    assert np.allclose(back.data[0], res.risk, atol=1e-5)
    assert set(np.unique(back.data[1])) <= {0.0, 1.0, 2.0, 3.0, 4.0}
    assert np.array_equal(back.data[1] == 4, res.classes == 4)
    if suffix == ".nii.gz":  # its header says what it holds, with the codes of the image it belongs to
        import nibabel as nib

        from domainsr.io.nifti import write_nifti

        risk_hdr = nib.load(path).header
        image_hdr = nib.load(write_nifti(res.sr, tmp_path / "sr.nii.gz")).header
        assert nib.nifti1.intent_codes.label[int(risk_hdr["intent_code"])] == "estimate"
        assert risk_hdr.get_intent()[2] == "risk;class" and b"risk" in bytes(risk_hdr["descrip"])
        for key in ("sform_code", "qform_code"):
            assert int(risk_hdr[key]) == int(image_hdr[key]) > 0
        np.testing.assert_allclose(risk_hdr.get_sform(), image_hdr.get_sform(), atol=1e-5)
        assert risk_hdr.get_xyzt_units()[0] == image_hdr.get_xyzt_units()[0] == "mm"
    else:
        import rasterio

        with rasterio.open(path) as ds:
            assert any(k.startswith("DOMAINSR_") for k in ds.tags())


@pytest.mark.slow
def test_report_of_a_256_cube_stays_small(tmp_path):
    """A 256^3 volume (synthetic, with a planted cube) gives a report well under 15 MB."""
    from scipy import ndimage as ndi

    from domainsr.audit import area_average, interpolation_enhancer

    rng = np.random.default_rng(0)
    n = 256
    hr = ndi.gaussian_filter(rng.normal(size=(n, n, n)).astype(np.float32), 3) * 4000 + 300
    hr += rng.normal(0, 2, hr.shape).astype(np.float32)
    aff = np.diag([0.9, 0.9, 0.9, 1.0])
    ref = SpatialImage(hr[None], "mri", MedicalGeometry(aff, (n, n, n)), units="a.u.")
    lr = ref.derive(area_average((2, 2, 2))(ref.data), geometry=ref.geometry.scaled([0.5] * 3))
    sr = interpolation_enhancer("cubic", 1, (2, 2, 2))(lr)
    data = sr.data.copy()
    data[0, 100:112, 120:132, 90:102] += 200.0
    res = audit_output(sr.derive(data), lr, ref, thresholds=AuditThresholds(tta="off"))
    html_path, _ = write_report(res, tmp_path)
    assert [r.bbox_index for r in res.regions] == [[[100, 111], [120, 131], [90, 101]]]
    size = html_path.stat().st_size
    assert size < 15_000_000, size
    check_html(html_path.read_text(encoding="utf-8"))
