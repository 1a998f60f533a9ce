"""`domainsr info` and the format dispatcher on the real sample data."""
from __future__ import annotations

import json

import numpy as np
from typer.testing import CliRunner

from domainsr.cli import EXIT_INPUT, app
from domainsr.image import MultiResolutionImage
from domainsr.io import detect_format, read_image, write_image

runner = CliRunner()


def test_info_real_volume(sample_data):
    res = runner.invoke(app, ["info", str(sample_data["mni152"]), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)["image"]
    assert s["shape"] == [1, 197, 233, 189]
    assert s["spacing_mm"] == [1.0, 1.0, 1.0] and s["orientation"] == "RAS"


def test_info_sentinel2_band_set(sample_data):
    res = runner.invoke(app, ["info", str(sample_data["sentinel2"]), "--json"])
    assert res.exit_code == 0, res.output
    s = json.loads(res.output)
    assert s["10m"]["bands"] == ["B02", "B03", "B04", "B08"] and s["10m"]["resolution"] == [10.0, 10.0]
    assert s["20m"]["resolution"] == [20.0, 20.0] and "B8A" in s["20m"]["bands"]
    assert s["60m"]["crs"] == "EPSG:32618"


def test_info_bad_file_names_it(tmp_path):
    bad = tmp_path / "scan.nii.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    res = runner.invoke(app, ["info", str(bad)])
    assert res.exit_code == EXIT_INPUT
    assert "scan.nii.gz" in res.output


def test_dispatch_round_trip_keeps_format(sample_data, tmp_path):
    s2 = read_image(sample_data["sentinel2"])
    assert isinstance(s2, MultiResolutionImage) and detect_format(sample_data["sentinel2"]) == "sentinel2"
    b = s2.select(["B04", "B08"])
    crop = b.derive(b.data[:, 100:300, 50:350], geometry=b.geometry.cropped((100, 50), (200, 300)),
                    mask=None if b.mask is None else b.mask[100:300, 50:350])
    out = write_image(crop, tmp_path / "crop.tif")
    back = read_image(out)
    np.testing.assert_array_equal(back.data, crop.data)
    assert back.geometry.almost_equal(crop.geometry) and back.band_names == ("B04", "B08")
