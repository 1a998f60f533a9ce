"""Model cards and checkpoints: bit-exact round trip, sha256 and weights_only checks, input checks."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from domainsr.errors import ModelCardMismatch, ModelError
from domainsr.image import GeoGeometry, MedicalGeometry, SpatialImage
from domainsr.models import build_model
from domainsr.models.checkpoints import (
    Architecture,
    ModelCard,
    check_input,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)


def _card(**kw) -> ModelCard:
    base = {"name": "tiny_s2", "architecture": Architecture(name="rescnn", kwargs={"n_blocks": 1, "n_feats": 8}),
                "domain": "optical", "spatial_dims": 2, "scale": (2, 2), "in_channels": 4, "out_channels": 4,
                "bands": ["B02", "B03", "B04", "B08"], "units": "DN", "input_range": (0.0, 10000.0),
                "normalization": {"kind": "fixed", "offset": [1000.0] * 4, "scale": [2000.0] * 4},
                "receptive_radius": (5, 5)}
    base.update(kw)
    return ModelCard.model_validate(base)


def _net(card: ModelCard) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_model(card.architecture.name, spatial_dims=card.spatial_dims, in_channels=card.in_channels,
                      scale=card.scale, zero_init_tail=False, **card.architecture.kwargs)
    return net.eval()


def _raster(bands, data=None, units="DN", name="scene.tif") -> SpatialImage:
    data = np.full((len(bands), 16, 16), 1500.0, np.float32) if data is None else data
    img = SpatialImage(data, "optical", GeoGeometry("EPSG:32618", (10, 0, 0, 0, -10, 0), data.shape[1:]),
                       tuple(bands), units=units)
    img.provenance["source"] = f"/data/{name}"
    return img


def test_round_trip_is_bit_exact(tmp_path):
    card = _card()
    net = _net(card)
    path = save_checkpoint(net, card, tmp_path)
    assert path == tmp_path / "tiny_s2.json" and (tmp_path / "tiny_s2.pt").exists()
    model, loaded = load_checkpoint(path)
    assert not model.training and loaded.weights_sha256 and loaded.name == card.name
    saved = torch.load(tmp_path / "tiny_s2.pt", weights_only=True)
    for k, v in net.state_dict().items():
        assert saved[k].device.type == "cpu" and torch.equal(saved[k], v)
        assert torch.equal(model.net.state_dict()[k], v)
    x = torch.rand(1, 4, 12, 10) * 5000
    with torch.no_grad():
        want = net((x - 1000.0) / 2000.0) * 2000.0 + 1000.0
        got = model(x)
    assert torch.equal(got, want)
    # by name through a user checkpoint folder
    (tmp_path / "user" / "tiny_s2").mkdir(parents=True)
    for suffix in (".pt", ".json"):
        (tmp_path / "user" / "tiny_s2" / f"tiny_s2{suffix}").write_bytes((tmp_path / f"tiny_s2{suffix}").read_bytes())
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DOMAINSR_CHECKPOINTS", str(tmp_path / "user"))
        assert resolve_checkpoint("tiny_s2") == tmp_path / "user" / "tiny_s2" / "tiny_s2.json"
        with pytest.raises(ModelError, match="no checkpoint named 'nope'"):
            resolve_checkpoint("nope")


def test_tampered_weights_are_refused(tmp_path):
    card = _card()
    save_checkpoint(_net(card), card, tmp_path)
    pt = tmp_path / "tiny_s2.pt"
    raw = bytearray(pt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    pt.write_bytes(bytes(raw))
    with pytest.raises(ModelError, match="sha256") as err:
        load_checkpoint(tmp_path / "tiny_s2.json")
    assert "tiny_s2.pt" in str(err.value)


class Payload:  # an arbitrary pickled object: weights_only must refuse to build it
    def __reduce__(self):
        return (print, ("pickled code ran",))


def test_pickled_objects_are_refused(tmp_path, capsys):
    card = _card()
    js = save_checkpoint(_net(card), card, tmp_path)
    pt = tmp_path / "tiny_s2.pt"
    state = torch.load(pt, weights_only=True)
    state["evil"] = Payload()
    torch.save(state, pt)
    from domainsr.models.checkpoints import sha256_file

    meta = json.loads(js.read_text())
    meta["weights_sha256"] = sha256_file(pt)  # the card matches: only weights_only stands in the way
    js.write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="refused to load weights") as err:
        load_checkpoint(js)
    assert "tiny_s2.pt" in str(err.value)
    assert "pickled code ran" not in capsys.readouterr().out


def test_check_input_refuses_wrong_bands_units_and_domain():
    card = _card()
    with pytest.raises(ModelCardMismatch, match="3 bands") as err:
        check_input(card, _raster(["B02", "B03", "B04"], name="rgb_only.tif"))
    assert "/data/rgb_only.tif" in str(err.value)
    with pytest.raises(ModelCardMismatch, match="differ") as err:
        check_input(card, _raster(["B02", "B03", "B04", "B05"], name="wrong.tif"))
    refl = np.random.default_rng(0).uniform(0.01, 0.6, (4, 16, 16)).astype(np.float32)
    with pytest.raises(ModelCardMismatch, match="reflectance") as err:
        check_input(card, _raster(["B02", "B03", "B04", "B08"], refl, units="", name="l2a_reflectance.tif"))
    assert "/data/l2a_reflectance.tif" in str(err.value)
    with pytest.raises(ModelCardMismatch, match="far outside"):
        check_input(card, _raster(["B02", "B03", "B04", "B08"], np.full((4, 16, 16), 65000.0, np.float32)))
    norm = check_input(card, _raster(["B02", "B03", "B04", "B08"]))
    assert np.allclose(norm.offset, 1000.0) and np.allclose(norm.scale, 2000.0)

    mri = _card(name="tiny_mri", domain="mri", spatial_dims=3, scale=(2, 2, 2), in_channels=1, out_channels=1,
                bands=[], units="a.u.", input_range=None, normalization={"kind": "percentile"},
                receptive_radius=(5, 5, 5))
    hu = np.random.default_rng(1).uniform(-1024, 1500, (1, 8, 8, 8)).astype(np.float32)
    ct = SpatialImage(hu, "ct", MedicalGeometry(np.eye(4), (8, 8, 8)), units="HU")
    ct.provenance["source"] = "/data/head_ct.nii.gz"
    with pytest.raises(ModelCardMismatch, match="ct image") as err:
        check_input(mri, ct)
    assert "/data/head_ct.nii.gz" in str(err.value)
    mislabelled = SpatialImage(hu, "mri", MedicalGeometry(np.eye(4), (8, 8, 8)), units="")
    mislabelled.provenance["source"] = "/data/ct_called_mr.nii.gz"
    with pytest.raises(ModelCardMismatch, match="Hounsfield") as err:
        check_input(mri, mislabelled)
    assert "/data/ct_called_mr.nii.gz" in str(err.value)
    with pytest.raises(ModelCardMismatch, match="units"):
        check_input(mri, SpatialImage(np.abs(hu), "mri", MedicalGeometry(np.eye(4), (8, 8, 8)), units="HU"))


def test_percentile_normalisation_is_per_image(tmp_path):
    card = _card(name="tiny_mri", domain="mri", spatial_dims=3, scale=(2, 2, 2), in_channels=1, out_channels=1,
                 bands=[], units="a.u.", input_range=None,
                 normalization={"kind": "percentile", "low": 0.0, "high": 100.0}, receptive_radius=(5, 5, 5),
                 architecture={"name": "rescnn", "kwargs": {"n_blocks": 1, "n_feats": 4}})
    net = _net(card)
    save_checkpoint(net, card, tmp_path)
    model, _ = load_checkpoint(tmp_path / "tiny_mri.pt")
    x = np.linspace(10, 410, 6 * 6 * 6, dtype=np.float32).reshape(1, 6, 6, 6)
    with pytest.raises(ModelError, match="prepare"):
        model(torch.from_numpy(x)[None])
    img = SpatialImage(x, "mri", MedicalGeometry(np.eye(4), (6, 6, 6)))
    norm = model.prepare(img)
    assert norm.offset[0] == pytest.approx(10) and norm.scale[0] == pytest.approx(400)
    t = torch.from_numpy(x)[None]
    with torch.no_grad():
        assert torch.allclose(model(t), net((t - 10) / 400) * 400 + 10)


def test_card_is_strict():
    with pytest.raises(ValueError, match="extra"):
        _card(colour="blue")
    with pytest.raises(ValueError, match="band names"):
        _card(bands=["B02"])
    with pytest.raises(ValueError, match="scale"):
        _card(scale=(2, 2, 2))
