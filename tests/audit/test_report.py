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
    """Fails on unbalanced tags; collects embedded resources, links, ids and image alt texts."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.resources: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self.images: list[tuple[str, str]] = []  # (alt, src)
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.anchor_in: dict[str, list[str]] = {}  # id of the enclosing tr/section -> hrefs inside it
        self._holders: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags[tag] = self.tags.get(tag, 0) + 1
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
            if tag in ("tr", "section"):
                self._holders.append((tag, a["id"]))
                self.anchor_in[a["id"]] = []
        for name, value in attrs:
            if name in ("src", "srcset", "action", "poster", "data") and value:
                self.resources.append(value)
            if name == "href" and value:
                self.links.append(value)
                for _, hid in self._holders:
                    self.anchor_in[hid].append(value)
        if tag == "img":
            self.images.append((a.get("alt", ""), a.get("src", "")))
        if tag not in VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if tag in VOID:
            return
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            return
        self.stack.pop()
        if self._holders and self._holders[-1][0] == tag:
            self._holders.pop()


def check_html(text: str) -> StrictChecker:
    assert text.startswith("<!DOCTYPE html>")
    checker = StrictChecker()
    checker.feed(text)
    checker.close()
    assert checker.errors == [] and checker.stack == []
    assert checker.resources, "figures are embedded as data: URIs"
    assert all(r.startswith("data:image/png;base64,") for r in checker.resources), \
        [r[:40] for r in checker.resources if not r.startswith("data:")]
    for href in checker.links:  # in-page anchors that exist, or relative paths to exported files
        if href.startswith("#"):
            assert href[1:] in checker.ids, href
        else:
            assert ":" not in href and not href.startswith("/"), href
    assert not re.search(r"https?://", text)  # nothing to fetch: opens offline
    assert "url(" not in text and "<script" not in text and "@import" not in text
    return checker


def png_of(checker: StrictChecker, alt_prefix: str, nth: int = 0) -> np.ndarray:
    """The RGB pixels of the ``nth`` embedded image whose alt text starts with ``alt_prefix``."""
    import base64
    import io

    from PIL import Image

    srcs = [src for alt, src in checker.images if alt.startswith(alt_prefix)]
    raw = base64.b64decode(srcs[nth].split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))


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
    assert reg["band"] in s2_result.sr.band_names and f"band {reg['band']}" in text  # the band it names, shown
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
    assert data["regions"][0]["kind"] == "inconsistency"
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


# ---------------------------------------------------------------------------------------------
# a report a person reads: orientation, scale, windows, close-ups, links, tables


def _lps(block: SpatialImage) -> SpatialImage:
    """``block`` stored LPS (array axes 0 and 1 reversed, affine to match): the same anatomy."""
    flip = np.diag([-1.0, -1.0, 1.0, 1.0])
    n = np.asarray(block.spatial_shape, float)
    flip[:2, 3] = n[:2] - 1
    aff = block.geometry.affine @ flip
    data = np.ascontiguousarray(block.data[:, ::-1, ::-1, :], dtype=np.float32)
    return SpatialImage(data, block.domain, MedicalGeometry(aff, block.spatial_shape), units=block.units)


def _fake(geometry, stride: int = 1):
    """The parts of an AuditResult that ``Display`` reads."""
    from types import SimpleNamespace

    return SimpleNamespace(sr=SimpleNamespace(geometry=geometry), mask=np.ones(geometry.shape, bool), stride=stride)


@pytest.mark.parametrize(("codes", "letters"), [
    ("RAS", {"axial": ("L", "R", "A", "P"), "coronal": ("L", "R", "S", "I"), "sagittal": ("P", "A", "S", "I")}),
    ("LPS", {"axial": ("L", "R", "A", "P"), "coronal": ("L", "R", "S", "I"), "sagittal": ("P", "A", "S", "I")}),
    ("ASL", {"axial": ("L", "R", "A", "P"), "coronal": ("L", "R", "S", "I"), "sagittal": ("P", "A", "S", "I")}),
])
def test_orientation_letters_follow_the_affine(codes, letters):
    """Whatever the voxel axes, the display is RAS+ neurological, and the letters say so; the
    axis lines name the direction each array axis of the file increases towards."""
    import nibabel as nib

    from domainsr.audit.display import Display

    shape = (20, 30, 40)
    aff = np.eye(4)
    aff[:3, :3] = 0.0
    for ax, code in enumerate(codes):  # array axis ax increases towards ``code``
        k, sign = next((k, 1 - 2 * i) for k, pair in enumerate(("RL", "AP", "SI")) for i, c in enumerate(pair)
                       if c == code)
        aff[k, ax] = sign * (0.8 + 0.2 * ax)
    geom = MedicalGeometry(aff, shape)
    assert "".join(nib.aff2axcodes(aff)) == codes
    disp = Display(_fake(geom))
    for plane in disp.planes([5, 5, 5]):
        got = disp.letters(plane)
        assert (got["left"], got["right"], got["top"], got["bottom"]) == letters[plane[0]]
    words = {"R": "right", "L": "left", "A": "anterior", "P": "posterior", "S": "superior", "I": "inferior"}
    for ax, line in enumerate(disp.axes_text()):
        assert line.startswith(f"axis {ax}") and f"towards {words[codes[ax]]} ({codes[ax]})" in line


def test_lps_volume_report_shows_right_on_the_right(mni_block, tmp_path):
    """An LPS-stored volume with a bright marker in the patient's right: in the report's axial
    panel the marker lies on the side labelled R, and the slice title gives the file's index."""
    from domainsr.audit import interpolation_enhancer

    vol = _lps(mni_block)
    assert vol.geometry.orientation == "LPS"
    data = vol.data.copy()
    data[0, 4:12, 28:36, 28:36] += 400.0  # low index on axis 0 = towards the patient's right in LPS
    ref = vol.derive(data)
    lr = ref.derive(ref.data.reshape(1, 32, 2, 32, 2, 32, 2).mean(axis=(2, 4, 6)),
                    geometry=ref.geometry.scaled([0.5] * 3))
    sr = interpolation_enhancer("cubic", 1, (2, 2, 2))(lr)
    sr_data = sr.data.copy()
    sr_data[0, 40:48, 20:28, 30:38] += 300.0  # a planted hallucination: region #1
    res = audit_output(sr.derive(sr_data), lr, ref, thresholds=AuditThresholds(tta="off"))
    reg = res.regions[0]
    assert reg.bbox_index[0][0] >= 38 and reg.bbox_index[0][1] <= 49
    text = write_report(res, tmp_path)[0].read_text(encoding="utf-8")
    checker = check_html(text)
    alts = [alt for alt, _ in checker.images if alt.startswith("HR reference (axial")]
    assert alts and "left L, right R, top A, bottom P" in alts[0]
    k = round(reg.centroid_index[2])
    z = float(res.sr.geometry.index_to_world([31.5, 31.5, k])[2])
    assert f"axial · slice index {k} (of 0–63) on array axis 2 · z = {z:+.1f} mm (RAS+)" in text
    hr = png_of(checker, "HR reference (axial").min(-1)[24:-24]  # without the letters and the scale bar
    half = hr.shape[1] // 2
    left, right = int(np.sum(hr[:, :half] == 255)), int(np.sum(hr[:, half:] == 255))
    marker_px = (8 * hr.shape[1] / 64) ** 2  # 8x8 voxels; the template is left-right symmetric otherwise
    assert right - left > 0.5 * marker_px, ("the patient's right is on the right of the axial panel", left, right)
    sag = [alt for alt, _ in checker.images if alt.startswith("HR reference (sagittal")]
    assert "left P, right A, top S, bottom I" in sag[0]


@pytest.mark.parametrize(("per_px", "width", "unit", "length", "label"), [
    (6.4, 200, "m", 200.0, "200 m"),
    (40.0, 480, "m", 2000.0, "2 km"),
    (0.5, 180, "mm", 20.0, "20 mm"),
    (0.01, 150, "mm", 0.2, "200 µm"),
])
def test_scale_bar_length_matches_the_pixel_size(per_px, width, unit, length, label):
    from domainsr.audit import figures as fg

    bar = fg.scale_bar(per_px, width, unit)
    assert bar.length == pytest.approx(length) and bar.label == label
    assert bar.px == round(length / per_px) and bar.px <= 0.25 * width + 1
    assert fg.scale_bar(per_px, 20, unit) is None  # too small to draw


def test_scale_bars_on_the_panels_measure_the_spacing(s2_result):
    """The bar drawn on the LR panel is as many display pixels long as its label says, given the
    10 m pixels of the S2 crop; an overview at stride 4 gets a 4x shorter bar per metre."""
    from domainsr.audit.display import Display, Painter, layers_of

    disp = Display(s2_result)
    painter = Painter(s2_result, layers_of(s2_result, disp))
    plane = disp.planes([0, 0])[0]
    panels = painter.panels(disp, plane, s2_result.regions)
    bar = panels[0]["scale"]
    assert all(p["scale"] == bar for p in panels)
    import base64
    import io

    from PIL import Image

    img = np.asarray(Image.open(io.BytesIO(base64.b64decode(panels[0]["img"].split(",", 1)[1]))).convert("RGB"))
    width_px = img.shape[1]
    metres_per_display_px = 10.0 * s2_result.sr.spatial_shape[1] / width_px
    row = img[img.shape[0] - 8]
    white = np.all(row == 255, axis=-1)
    run = int(np.argmin(white[6:]))  # the bar starts at x=6 and ends at its black outline
    assert run == bar.px
    assert run * metres_per_display_px == pytest.approx(bar.length, rel=0.03)
    from domainsr.image import GeoGeometry

    g = s2_result.sr.geometry
    coarse = Display(_fake(GeoGeometry(g.crs, g.transform @ g.transform.scale(4), (32, 32)), stride=4))
    assert coarse.pixel_size(("image", -1, 0)) == pytest.approx((40.0, 40.0))
    geographic = Display(_fake(GeoGeometry("EPSG:4326", g.transform.scale(1e-4, -1e-4), (32, 32))))
    assert geographic.scale_bar(("image", -1, 0), 1.0, 200) is None and "degrees" in geographic.scale_note


@pytest.mark.parametrize("with_reference", [False, True])
def test_a_wild_sr_cannot_wash_out_the_lr_panel(s2_result, with_reference):
    """Display windows come from the LR (and HR) pixels only: an SR with huge outliers over 6 % of
    the image leaves the LR, baseline (and HR) panels pixel for pixel as they were."""
    from dataclasses import replace

    from domainsr.audit.report import render_html

    ref = s2_result.reference if with_reference else None
    res = audit_output(s2_result.sr, s2_result.lr, ref, thresholds=AuditThresholds(tta="off"))
    bad = np.array(res.sr.data, np.float32, copy=True)
    bad[:, 10:42, 10:42] = 1e9
    bad[:, 100:104, 0:128:3] = -1e9
    wild = replace(res, sr=res.sr.derive(bad))
    good_html, wild_html = (check_html(render_html(r)) for r in (res, wild))
    for alt in ("LR input", "Baseline (cubic)", *(["HR reference"] if with_reference else [])):
        assert np.array_equal(png_of(good_html, alt), png_of(wild_html, alt)), alt
    assert not np.array_equal(png_of(good_html, "SR (model)"), png_of(wild_html, "SR (model)"))
    assert "far outside the LR/HR window" in render_html(wild)


def test_regions_link_to_their_close_ups_and_back(s2_result, tmp_path):
    text = write_report(s2_result, tmp_path)[0].read_text(encoding="utf-8")
    checker = check_html(text)
    n_fig = min(len(s2_result.regions), s2_result.thresholds.max_figure_regions)
    assert n_fig >= 1
    for reg in s2_result.regions[:n_fig]:
        assert f"#region-{reg.id}" in checker.anchor_in[f"row-{reg.id}"]
        assert f"#row-{reg.id}" in checker.anchor_in[f"region-{reg.id}"]
        assert any(alt.startswith(f"region {reg.id}: SR (model)") for alt, _ in checker.images)
    # risk, score and verdict in the table; kinds from the contract
    assert "risk (peak)" in text and "score (raw)" in text
    assert all(r.kind in ("hallucination", "omission", "inconsistency", "uncertain") for r in s2_result.regions)


def test_report_links_the_exported_files(s2_result, tmp_path):
    out = tmp_path / "report dir"
    links = {"risk map": out / "risk.tif", "regions (GeoJSON)": "regions.geojson",
             "label map": out / "maps" / "labels.nii.gz"}
    text = write_report(s2_result, out, stem="report", links=links)[0].read_text(encoding="utf-8")
    checker = check_html(text)
    files = [h for h in checker.links if not h.startswith("#")]
    assert set(files) == {"risk.tif", "regions.geojson", "maps/labels.nii.gz"}
    assert ">risk map</a>" in text


def test_model_and_provenance_are_tables_not_json(s2_result):
    from dataclasses import replace

    from domainsr.audit.report import flatten, render_html

    model = {"name": "s2-x2", "card": {"name": "s2-x2", "degradation": {"kind": "optical", "mtf": 0.25},
                                       "bands": ["B02", "B03"]}}
    text = render_html(replace(s2_result, model=model))
    check_html(text)
    assert "<td>card.degradation.kind</td><td class=\"small\">optical</td>" in text
    assert "<td>card.degradation.mtf</td><td class=\"small\">0.25</td>" in text
    assert "<td>card.bands</td><td class=\"small\">B02, B03</td>" in text
    assert "<pre" not in text
    visible = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", text)
    assert "{&#34;" not in visible and '{"' not in visible  # no JSON dump anywhere
    assert flatten({"a": {"b": [1, 2], "c": [{"d": "x"}]}, "e": None}) == [("a.b", "1, 2"), ("a.c.0.d", "x")]


def test_coverage_and_calibration_are_stated(s2_result):
    from types import SimpleNamespace

    from domainsr.audit.report import coverage_text, flatten, render_html

    s = s2_result.summary()
    assert coverage_text(s2_result, s).startswith("whole scene, 100 % of 128×128 px in one pass; 100.0 % of px valid")
    whole = SimpleNamespace(windows=121, window_shape=[2048, 2048], halo=[64, 64], scene_fraction=1.0,
                            sr_pixels=21960 ** 2, valid_fraction=0.971)
    fake = SimpleNamespace(coverage=whole)
    s.grid.sr_shape = [21960, 21960]
    assert coverage_text(fake, s) == ("whole scene, 100 % of 21960×21960 px in 121 windows of 2048×2048 px "
                                      "(halo 64 px); 97.1 % of px valid")
    whole.scene_fraction, whole.box = 0.035, [[4096, 6143], [4096, 6143]]
    s.grid.sr_shape = [2048, 2048]
    assert coverage_text(fake, s, [10980, 10980]).startswith(
        "PART OF THE SCENE ONLY: 3.5 % of the 10980×10980 px scene, a 2048×2048 px box (axis 0: 4096–6143, "
        "axis 1: 4096–6143) in 121 windows")
    text = render_html(s2_result)
    assert "<b>Audited:</b> whole scene" in text
    cal = s2_result.summary().calibration
    if cal:  # the calibration as rows, e.g. kinds.hallucination.review
        key, value = flatten(cal)[0]
        assert f"<td>{key}</td><td class=\"small\">{value}</td>" in text
    else:
        assert "No calibration recorded" in text


def _overview_of(res, s: int):
    """``res`` as a windowed audit of a large scene would return it: arrays decimated by ``s``
    (geometry of the overview), regions on the file's axes, and ``crop`` giving the full resolution."""
    from dataclasses import replace

    def dec(img):
        if img is None:
            return None
        sl = (slice(None), *(slice(None, None, s),) * img.spatial_dims)
        return img.derive(np.ascontiguousarray(img.data[sl]), geometry=img.geometry.scaled([1 / s] * img.spatial_dims),
                          mask=None if img.mask is None else img.mask[sl[1:]])

    arr = lambda a: None if a is None else np.ascontiguousarray(a[(slice(None, None, s),) * a.ndim])
    ov = replace(res, sr=dec(res.sr), baseline=dec(res.baseline), reference=dec(res.reference), mask=arr(res.mask),
                 classes=arr(res.classes), risk=arr(res.risk), lr_residual=arr(res.lr_residual),
                 lr_classes=arr(res.lr_classes), uncertainty=arr(res.uncertainty))
    ov.stride = s
    ov.crop = lambda region, margin_px: res  # the window about a region: here the whole full-resolution result
    return ov


def test_overview_of_a_large_scene_draws_boxes_and_crops_at_full_resolution(s2_result):
    from domainsr.audit.display import Display
    from domainsr.audit.report import render_html

    ov = _overview_of(s2_result, 4)
    disp = Display(ov)
    reg = ov.regions[0]
    assert disp.box_2d(reg, ("image", -1, 0)) == (70 // 4, 40 // 4, 81 // 4, 51 // 4)
    assert disp.pixel_size(("image", -1, 0)) == pytest.approx((40.0, 40.0))
    text = render_html(ov)
    checker = check_html(text)
    assert "overview at 1:4" in text and "full resolution (recomputed on a window about the region)" in text
    # the close-up comes from the full-resolution result: the unstrided report's close-up (up to
    # the display window, which the overview's LR/HR percentiles set)
    full = check_html(render_html(s2_result))
    a, b = (png_of(c, "region 1: SR (model)").astype(float) for c in (checker, full))
    assert a.shape == b.shape and np.mean(np.abs(a - b)) < 4


def test_report_of_a_windowed_audit_from_files(s2_crop, tmp_path, monkeypatch):
    """``audit_files`` with a small overview budget: the report's figures are a 1:4 overview (boxes
    at index / 4, 4x coarser pixels), its close-up is recomputed at full resolution, and it states
    the coverage."""
    from domainsr.audit import area_average, interpolation_enhancer
    from domainsr.audit import windowed as win
    from domainsr.audit.display import Display
    from domainsr.audit.protocol import audit_files
    from domainsr.audit.report import render_html
    from domainsr.io import write_image

    hr = s2_crop.derive(np.asarray(s2_crop.data, np.float32))
    lr = hr.derive(area_average((2, 2))(hr.data), geometry=hr.geometry.scaled([0.5, 0.5]))
    sr = interpolation_enhancer("cubic", 4, (2, 2))(lr)
    data = np.array(sr.data, np.float32)
    data[:, 60:72, 80:92] += 400.0
    write_image(lr, tmp_path / "lr.tif")
    write_image(sr.derive(data), tmp_path / "sr.tif")
    monkeypatch.setattr(win, "OVERVIEW_PIXELS", 32 * 32)
    res = audit_files(tmp_path / "sr.tif", tmp_path / "lr.tif", thresholds=AuditThresholds(tta="off"))
    assert res.stride == 4 and res.mask.shape == (32, 32)
    reg = res.regions[0]
    assert reg.bbox_index[0][0] >= 58 and reg.bbox_index[1][1] <= 93
    disp = Display(res)
    c0, r0, c1, r1 = disp.box_2d(reg, ("image", -1, 0))
    (a0, a1), (b0, b1) = reg.bbox_index
    assert (r0, c0, r1, c1) == (a0 // 4, b0 // 4, a1 // 4, b1 // 4)
    assert disp.pixel_size(("image", -1, 0)) == pytest.approx((40.0, 40.0))
    text = render_html(res)
    checker = check_html(text)
    assert "overview at 1:4" in text and "full resolution (recomputed on a window about the region)" in text
    assert "<b>Audited:</b> whole scene, 100 % of 128×128 px" in text
    close = png_of(checker, f"region {reg.id}: SR (model)")
    over = png_of(checker, "SR (model)")
    assert close.shape[0] >= 150 and over.shape[1] == 200
