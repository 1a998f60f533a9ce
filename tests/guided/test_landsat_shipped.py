"""The shipped Landsat 8 pan-guided model (issue 16) on the real Landsat 8 sample, end to end through
the CLI: B1-B7 at 15 m on the pan's ground, the pan sitting half a pan pixel off the 30 m grid."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from typer.testing import CliRunner

from domainsr.cli import app
from domainsr.models.checkpoints import read_card, resolve_checkpoint


@pytest.mark.slow
@pytest.mark.realdata
def test_landsat_pan_guided_enhances_the_real_scene_to_15_m(sample_data, tmp_path):
    card = read_card(resolve_checkpoint("landsat8-pan-guided"))
    assert card.metrics["test"].gain_db > 3.0  # Wald's protocol on the held-out rows, vs the best interpolation
    res = CliRunner().invoke(app, ["enhance", str(sample_data["landsat8"]), "--model", "landsat8-pan-guided",
                                   "--out", str(tmp_path), "--no-audit", "--no-progress"])
    assert res.exit_code == 0, res.output
    with rasterio.open(sample_data["landsat8"] / "l8_B4.tif") as src:
        lr, t30 = src.read(1).astype(np.float64), src.transform
    with rasterio.open(tmp_path / "landsat8_sr.tif") as out:
        assert out.descriptions == ("B1", "B2", "B3", "B4", "B5", "B6", "B7")
        assert (out.transform.a, out.transform.e) == (15.0, -15.0)
        assert (out.transform.c, out.transform.f) == (t30.c, t30.f)  # same origin as the 30 m bands
        sr = out.read(4).astype(np.float64)
    assert sr.shape[0] // 2 <= lr.shape[0] and sr.shape[1] // 2 <= lr.shape[1]
    # the 15 m red band, block-averaged back to 30 m, matches the input red band closely
    h, w = (sr.shape[0] // 2) * 2, (sr.shape[1] // 2) * 2
    back = sr[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    ref = lr[: h // 2, : w // 2]
    ok = (ref > 0) & (back > 0)
    assert np.corrcoef(back[ok], ref[ok])[0, 1] > 0.98
    assert np.median(np.abs(back[ok] - ref[ok])) < 0.05 * np.median(ref[ok])
