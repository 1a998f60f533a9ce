"""Protocol wiring: checkpoints and their cards, noise-free re-degradation, input checks."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.audit import AuditThresholds, audit_checkpoint, audit_output, heldout_region
from domainsr.degrade import noise_free_spec as noiseless
from domainsr.errors import GeometryError, InputError


def test_noiseless_specs():
    assert noiseless({"kind": "optical", "scale": 2, "mtf": 0.3, "noise_sigma": 5.0, "shot_noise": 1.0,
                      "derived": {"x": 1}}) == {"kind": "optical", "scale": 2, "mtf": 0.3, "noise_sigma": 0.0,
                                                "shot_noise": 0.0}
    assert noiseless({"kind": "mri", "scale": 2, "rician_sigma": 0.02})["rician_sigma"] == 0.0
    assert noiseless({"kind": "compose", "steps": [{"kind": "thick_slices", "factor": 4},
                                                   {"kind": "hu_noise", "sigma_hu": 10}]}) == {
        "kind": "compose", "steps": [{"kind": "thick_slices", "factor": 4}]}
    assert noiseless({"kind": "blind", "scale": 2}) is None


def _checkpoint(tmp_path, s2_crop):
    """A zero-tail residual CNN (outputs its bicubic base exactly) saved with a card whose
    held-out region is the bottom 40 % of the crop's rows."""
    from domainsr.models import build_model
    from domainsr.models.checkpoints import (
        Architecture,
        FixedNormalization,
        ModelCard,
        TrainingData,
        save_checkpoint,
    )

    net = build_model("rescnn", spatial_dims=2, in_channels=4, scale=(2, 2), n_blocks=1, n_feats=8)
    rows = s2_crop.spatial_shape[0]
    card = ModelCard(
        name="tiny_s2", architecture=Architecture(name="rescnn", kwargs={"n_blocks": 1, "n_feats": 8}),
        domain="optical", spatial_dims=2, scale=(2, 2), in_channels=4, out_channels=4,
        bands=["B02", "B03", "B04", "B08"], units="DN",
        normalization=FixedNormalization(offset=[1000.0] * 4, scale=[500.0] * 4),
        receptive_radius=tuple(int(r) for r in np.atleast_1d(net.receptive_radius)),
        degradation={"kind": "gaussian_mean", "scale": [2, 2], "sigma": 1.0},
        training_data=TrainingData(source="sentinel2", split={"axis": 0, "regions": {
            "train": [0, 60], "test": [rows - 48, rows]}}))
    return save_checkpoint(net, card, tmp_path / "tiny_s2")


def test_audit_of_a_checkpoint_uses_its_card(s2_crop, tmp_path):
    path = _checkpoint(tmp_path, s2_crop)
    res = audit_checkpoint(s2_crop, str(path), thresholds=AuditThresholds(tta="flips", tta_max=2))
    assert res.mode == "held-out"
    assert res.reference.spatial_shape == (48, 128)  # the card's test rows only
    assert res.lr.spatial_shape == (24, 64)
    assert res.model["name"] == "tiny_s2" and res.model["card"]["bands"] == ["B02", "B03", "B04", "B08"]
    assert res.provenance["held_out"]["degradation"]["kind"] == "gaussian_mean"
    # a zero-tail rescnn is its bicubic base: no gain, no hallucination, zero TTA spread
    gain = res.metrics.reference.per_metric.psnr.gain
    assert np.allclose(gain, 0.0, atol=1e-3)
    assert res.regions == [] and res.uncertainty is not None and float(res.uncertainty.max()) < 1e-2


def test_heldout_region_checks_bands_and_bounds(s2_crop, tmp_path, sample_data):
    from domainsr.io import read_image
    from domainsr.models.checkpoints import read_card

    card = read_card(_checkpoint(tmp_path, s2_crop))
    band_set = read_image(sample_data["sentinel2"])  # all 13 bands at 10/20/60 m
    held = heldout_region(card, band_set)
    assert held.band_names == ("B02", "B03", "B04", "B08") and held.spatial_shape == (48, 1933)
    assert held.geometry.transform.f == band_set.groups[band_set.group_of("B02")].geometry.transform.f - 10 * 80
    three = s2_crop.derive(s2_crop.data[:3], band_names=("B02", "B03", "B04"))
    with pytest.raises(InputError, match="B08"):
        heldout_region(card, three)
    small = s2_crop.derive(s2_crop.data[:, :40], geometry=s2_crop.geometry.cropped((0, 0), (40, 128)))
    with pytest.raises(InputError, match="does not fit"):
        heldout_region(card, small)


def test_audit_output_refuses_mismatched_inputs(s2_crop):
    lr = s2_crop.derive(s2_crop.data[:, ::2, ::2].astype(np.float32), geometry=s2_crop.geometry.scaled((0.5, 0.5)))
    odd = s2_crop.derive(s2_crop.data[:, :127, :127], geometry=s2_crop.geometry.cropped((0, 0), (127, 127)))
    with pytest.raises(GeometryError, match="whole multiple"):
        audit_output(odd, lr)
    with pytest.raises(InputError, match="bands"):
        audit_output(s2_crop.derive(s2_crop.data[:2], band_names=("a", "b")), lr)
    shifted = s2_crop.derive(s2_crop.data, geometry=s2_crop.geometry.cropped((1, 0), (128, 128)))
    res = audit_output(shifted, lr, thresholds=AuditThresholds(tta="off"))
    assert any("geometry differs" in w for w in res.warnings)
