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
    from domainsr.audit.protocol import interpolation_enhancer

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
    assert psnr["model"] == pytest.approx(s2_result.metrics["reference"]["per_metric"]["psnr"]["model"])
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


def _volume_with_identifiers(block, source):
    template = {"00100010": {"vr": "PN", "Value": [{"Alphabetic": "Doe^Johnathan"}]},
                "00100020": {"vr": "LO", "Value": ["PID-778899"]},
                "00080050": {"vr": "SH", "Value": ["ACC-4455"]}}
    meta = {"dicom": {"template": template, "modality": "MR", "series_instance_uid": "1.2.3.4.5.6789"},
            "storage_dtype": "uint8"}
    return SpatialImage(np.asarray(block.data, np.float32), "mri", block.geometry, units="a.u.",
                        provenance={"source": source, "reader": "dicom"}, meta=meta)


def test_volume_report_pseudonymises_patients(mni_block, tmp_path, monkeypatch):
    from domainsr.audit.protocol import interpolation_enhancer

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
    shown = json.dumps(res2.summary())
    assert "PID-778899" in shown and "Doe^Johnathan" in shown
    res3 = audit_output(res.sr, res.lr, res.reference, thresholds=AuditThresholds(tta="off"))
    assert res3.summary()["provenance"]["reference"]["dicom"]["patient_id"] == pid


@pytest.mark.parametrize("suffix", [".nii.gz", ".tif"])
def test_risk_map_is_written_on_the_output_grid(s2_result, mni_block, tmp_path, suffix):
    from domainsr.io import read_image

    if suffix == ".tif":
        res = s2_result
    else:
        from domainsr.audit.protocol import interpolation_enhancer

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


@pytest.mark.slow
def test_report_of_a_256_cube_stays_small(tmp_path):
    """A 256^3 volume (synthetic, with a planted cube) gives a report well under 15 MB."""
    from scipy import ndimage as ndi

    from domainsr.audit.protocol import area_average, interpolation_enhancer

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
