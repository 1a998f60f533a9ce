"""Bring your own weights: third-party SR state dicts in their projects' own layouts, loaded through
spandrel and run by DomainSR's engine and CLI.

The networks are built here with spandrel's architecture code (Real-ESRGAN's SRVGGNetCompact,
ESRGAN's RRDBNet with the pixel-unshuffle of BasicSR's x2 model) in small configurations and
fixed-seed weights, saved as ``{'params': sd}`` (Real-ESRGAN compact) and ``{'params_ema': sd}``
with BasicSR's key names (RRDBNet), and as safetensors.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from domainsr.errors import ModelCardMismatch, ModelError
from domainsr.models.spandrel_support import DISABLED, import_spandrel

try:
    spandrel = import_spandrel()
except ModelError as exc:  # pragma: no cover - `make install` installs it
    pytest.skip(str(exc), allow_module_level=True)

from spandrel.architectures.Compact import Compact  # after the guarded import
from spandrel.architectures.ESRGAN import ESRGAN

runner = CliRunner()


def compact(channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(7)
    net = Compact(num_in_ch=channels, num_out_ch=channels, num_feat=8, num_conv=3, upscale=2, act_type="prelu")
    return net.eval()


def basicsr_keys(old: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """spandrel's (old ESRGAN) key names -> BasicSR's RRDBNet names (conv_first, body.N.rdbM.convK, ...)."""
    fixed = {"model.0.": "conv_first.", "model.3.": "conv_up1.", "model.6.": "conv_up2.", "model.8.": "conv_hr.",
             "model.10.": "conv_last."}
    blocks = max(int(m.group(1)) for k in old if (m := re.match(r"model\.1\.sub\.(\d+)\.", k)))
    new = {}
    for k, v in old.items():
        m = re.match(r"model\.1\.sub\.(\d+)\.RDB(\d)\.conv(\d)\.0\.(weight|bias)$", k)
        if m:
            new[f"body.{m.group(1)}.rdb{m.group(2)}.conv{m.group(3)}.{m.group(4)}"] = v
        elif k.startswith(f"model.1.sub.{blocks}."):
            new["conv_body." + k.rsplit(".", 1)[1]] = v
        else:
            prefix = next(p for p in fixed if k.startswith(p))
            new[fixed[prefix] + k[len(prefix):]] = v
    return new


def rrdbnet() -> torch.nn.Module:
    """BasicSR's RRDBNet x2: pixel-unshuffle by 2, then an x4 RRDB net (1 block, 8 features)."""
    torch.manual_seed(11)
    net = ESRGAN(in_nc=12, out_nc=3, num_filters=8, num_blocks=1, scale=4, shuffle_factor=2).eval()
    with torch.no_grad():  # ESRGAN's 0.1-scaled init makes a near-constant net; make it a real one
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def save(kind: str, folder: Path) -> tuple[Path, torch.nn.Module]:
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "compact":
        net = compact()
        path = folder / "realesr-compact-x2.pth"
        torch.save({"params": net.state_dict()}, path)
    elif kind == "rrdbnet":
        net = rrdbnet()
        path = folder / "RealESRGAN_x2plus_tiny.pth"
        torch.save({"params_ema": basicsr_keys(net.state_dict())}, path)
    else:
        from safetensors.torch import save_file

        net = compact()
        path = folder / "realesr-compact-x2.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path, net


def rgb_geotiff(path: Path, shape=(3, 42, 54), dtype="uint8", seed=3, descriptions=None) -> np.ndarray:
    import rasterio
    from affine import Affine

    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    top = 255 if dtype == "uint8" else 10000
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    smooth = (np.sin(yy / 5.0) * np.cos(xx / 7.0) + 1) / 2
    data = np.clip(smooth[None] * top * 0.8 + rng.random(shape) * top * 0.2, 0, top).astype(dtype)
    with rasterio.open(path, "w", driver="GTiff", width=shape[2], height=shape[1], count=shape[0], dtype=dtype,
                       crs="EPSG:32633", transform=Affine(10, 0, 500000, 0, -10, 4100000)) as ds:
        ds.write(data)
        for i, d in enumerate(descriptions or [], start=1):
            ds.set_band_description(i, d)
    return data


def read_tags(path: Path) -> dict[str, str]:
    import rasterio

    with rasterio.open(path) as ds:
        return ds.tags()


def spandrel_reference(weights: Path, x01: np.ndarray) -> np.ndarray:
    """spandrel's own whole-image inference (its loader, its padding, its clamp), 0..1."""
    desc = spandrel.ModelLoader().load_from_file(str(weights))
    with torch.inference_mode():
        return desc(torch.from_numpy(np.ascontiguousarray(x01, np.float32))[None])[0].numpy()


@pytest.mark.parametrize("kind", ["compact", "rrdbnet", "safetensors"])
def test_enhance_with_own_weights_equals_spandrel(prefect_home, tmp_path, kind):
    from domainsr.cli import app
    from domainsr.io.raster import read_raster

    weights, _ = save(kind, tmp_path / "w")
    lr = rgb_geotiff(tmp_path / "in" / "photo.tif")
    res = runner.invoke(app, ["enhance", str(tmp_path / "in" / "photo.tif"), "--model", str(weights),
                              "--out", str(tmp_path / "out"), "--no-audit", "--json"])
    assert res.exit_code == 0, res.output
    out = read_raster(tmp_path / "out" / "photo_sr.tif")
    src = read_raster(tmp_path / "in" / "photo.tif")
    assert out.data.dtype == np.uint8 and out.spatial_shape == (84, 108)
    assert out.geometry.res == (5.0, 5.0) and out.geometry.bounds == src.geometry.bounds
    want = np.clip(np.rint(spandrel_reference(weights, lr / 255.0) * 255), 0, 255)
    assert np.abs(out.data.astype(int) - want.astype(int)).max() <= 1
    from domainsr.models.checkpoints import sha256_file

    prov = json.loads((tmp_path / "out" / "photo_sr.tif.provenance.json").read_text())["provenance"]
    step = prov["history"][-1]
    assert step["model"] == weights.stem and step["model_kind"] == "weights"
    assert step["model_checksum"] == sha256_file(weights)
    assert read_tags(tmp_path / "out" / "photo_sr.tif")["DOMAINSR_MODEL_SHA256"] == sha256_file(weights)
    card = prov["model"]["card"]
    assert card["architecture"]["name"] == ("spandrel:ESRGAN" if kind == "rrdbnet" else "spandrel:Compact")
    assert card["weights_sha256"] == sha256_file(weights) and card["scale"] == [2, 2]
    assert card["input_range"] == [0.0, 255.0] and card["in_channels"] == 3


@pytest.mark.parametrize("kind", ["compact", "rrdbnet"])
def test_tiled_output_equals_a_whole_image_pass(tmp_path, kind):
    """Odd sizes and small tiles: halo tiling with the measured receptive radius (and, for the
    pixel-unshuffling RRDBNet, windows aligned to its multiple-of-4 rule) gives spandrel's
    whole-image result."""
    from domainsr.app.models import load_model
    from domainsr.config import ModelRef
    from domainsr.engine import PatchInferer, enhance_image
    from domainsr.io import read_image

    weights, _ = save(kind, tmp_path / "w")
    shape = (3, 45, 61) if kind == "compact" else (3, 118, 150)  # not multiples of the RRDBNet's 4
    lr = rgb_geotiff(tmp_path / "odd.tif", shape=shape)
    img = read_image(tmp_path / "odd.tif")
    model, info = load_model(ModelRef(name=str(weights)), img)
    assert info["kind"] == "weights" and model.size_multiple == (1 if kind == "compact" else 4)
    assert model.receptive_radius == ((5, 5) if kind == "compact" else (41, 41))
    k = model.size_multiple
    halo = -(-int(model.receptive_radius[0]) // k) * k
    inferer = PatchInferer(model, tile=2 * halo + (12 if kind == "compact" else 32), threads=1)
    sr = enhance_image(img, inferer)
    assert inferer.stats.computed >= 4 and inferer.stats.plan["halo"] == [halo, halo]
    want = spandrel_reference(weights, lr / 255.0)
    np.testing.assert_allclose(sr.data / 255.0, want, rtol=0, atol=1e-4)


def test_receptive_radius_is_measured_exactly():
    from domainsr.models.radius import gradient_extent, measure_receptive_radius

    net = compact()  # 5 convs at LR, then the pixel shuffle: radius 5
    r = measure_receptive_radius(net, in_channels=3, scale=(2, 2))
    assert r == (5, 5)
    assert gradient_extent(net.double(), 3, (2, 2), (31, 31))[0] == (5, 5)


def test_pickled_code_is_refused(tmp_path):
    from domainsr.models.weights import read_state_dict

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    bad = tmp_path / "evil.pth"
    torch.save({"params": compact().state_dict(), "extra": Payload()}, bad)
    with pytest.raises(ModelError, match="refused to load weights"):
        read_state_dict(bad)
    assert not marker.exists()
    from domainsr.cli import app

    res = runner.invoke(app, ["models", "show", str(bad)])
    assert res.exit_code != 0 and "refused" in res.output and not marker.exists()


def test_multispectral_input_needs_a_declared_range(prefect_home, tmp_path):
    from domainsr.cli import app
    from domainsr.io.raster import read_raster

    net = compact(channels=4)
    weights = tmp_path / "w" / "rgbn-compact.pth"
    weights.parent.mkdir()
    torch.save({"params": net.state_dict()}, weights)
    lr = rgb_geotiff(tmp_path / "in" / "s2.tif", shape=(4, 40, 44), dtype="uint16",
                     descriptions=["B02", "B03", "B04", "B08"])
    args = ["enhance", str(tmp_path / "in" / "s2.tif"), "--model", str(weights), "--out", str(tmp_path / "out"),
            "--no-audit", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert "--input-range LO,HI" in res.output
    res = runner.invoke(app, [*args, "--input-range", "0,10000"])
    assert res.exit_code == 0, res.output
    out = read_raster(tmp_path / "out" / "s2_sr.tif")
    assert out.data.dtype == np.uint16 and out.band_names == ("B02", "B03", "B04", "B08")
    prov = json.loads((tmp_path / "out" / "s2_sr.tif.provenance.json").read_text())["provenance"]
    assert prov["model"]["card"]["input_range"] == [0.0, 10000.0] and prov["model"]["input_range"] == [0.0, 10000.0]
    want = np.clip(np.rint(spandrel_reference(weights, lr / 10000.0) * 10000), 0, 65535)
    assert np.abs(out.data.astype(int) - want.astype(int)).max() <= 1


def test_range_from_a_card_beside_the_weights_and_refusals(tmp_path):
    from domainsr.app.models import load_model, model_identity
    from domainsr.config import ModelRef
    from domainsr.io import read_image

    weights = tmp_path / "rgbn.pth"
    torch.save({"params": compact(channels=4).state_dict()}, weights)
    rgb_geotiff(tmp_path / "s2.tif", shape=(4, 24, 24), dtype="uint16", descriptions=["B02", "B03", "B04", "B08"])
    img = read_image(tmp_path / "s2.tif")
    with pytest.raises(ModelCardMismatch, match="input-range"):
        load_model(ModelRef(name=str(weights)), img)
    Path(str(weights) + ".card.json").write_text(json.dumps(
        {"name": "s2-rgbn-esrgan", "input_range": [0, 10000], "license": "CC-BY-4.0"}))
    model, info = load_model(ModelRef(name=str(weights)), img)
    assert model.name == "s2-rgbn-esrgan" and model.input_range == (0.0, 10000.0) and info["card"]["license"]
    ident = model_identity(ModelRef(name=f"{weights}?input_range=0,4000"))
    assert ident["input_range"] == [0.0, 4000.0] and ident["kind"] == "weights"
    with pytest.raises(ModelCardMismatch, match="far outside"):  # declared range far off the values
        load_model(ModelRef(name=f"{weights}?input_range=0,1"), img)
    with pytest.raises(ModelCardMismatch, match="take 4 channel"):
        load_model(ModelRef(name=str(weights)), img.select(["B02", "B03", "B04"]))
    from domainsr.cli import app

    shown = json.loads(runner.invoke(app, ["models", "show", str(weights), "--json"]).stdout)["weights"]
    assert shown["architecture"] == "Compact" and shown["scale"] == 2 and shown["in_channels"] == 4
    assert shown["card"]["license"] == "CC-BY-4.0" and shown["sha256"] == model.sha256


def test_untrained_architectures_are_flagged(capsys):
    from domainsr.cli import model_reference
    from domainsr.models.descriptor import from_registry

    assert model_reference("edsr", None) == "edsr"
    assert "untrained architecture (random weights)" in capsys.readouterr().err
    assert model_reference("cubic", None) == "cubic" and "untrained" not in capsys.readouterr().err
    edsr = from_registry("edsr", spatial_dims=2, in_channels=1, scale=2, n_resblocks=1, n_feats=4)
    cubic = from_registry("cubic", spatial_dims=2, in_channels=1, scale=2)
    assert edsr.record()["weights"] == "untrained (random)" and cubic.history_fields() == {
        "model": "cubic", "model_kind": "registry", "model_checksum": None, "model_version": None,
        "model_weights": "baseline (no weights)", "model_config_sha256": cubic.config_sha256}


def test_models_list_says_which_entries_have_trained_weights():
    from domainsr.cli import app

    data = json.loads(runner.invoke(app, ["models", "list", "--json"]).stdout)
    weights = {r["name"]: r["weights"] for r in data["registry"]}
    assert weights["cubic"] == "baseline (no weights)" and weights["edsr"] == "untrained (random)"
    assert all(c["weights"] == "trained checkpoint" for c in data["checkpoints"])
    res = runner.invoke(app, ["models", "list"])
    assert res.exit_code == 0 and "weights" in res.stdout and "untrained" in res.stdout


def test_spandrel_imports_without_torchvision():
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - absent, or present but broken beside the CPU torch
        assert {"LaMa", "RestoreFormer"} <= set(DISABLED)
    assert "ESRGAN" not in DISABLED and "Compact" not in DISABLED and "SwinIR" not in DISABLED


def test_medical_volume_runs_slice_by_slice_in_plane_with_a_declared_range(tmp_path):
    """A 2D network on a volume: each slice across the thick axis, in its plane (scale s, s, 1);
    a medical input without a declared range is refused."""
    from domainsr.app.models import load_model
    from domainsr.config import ModelRef
    from domainsr.engine import PatchInferer, enhance_image
    from domainsr.image import MedicalGeometry, SpatialImage

    weights = tmp_path / "gray.pth"
    torch.save({"params": compact(channels=1).state_dict()}, weights)
    rng = np.random.default_rng(5)
    data = (rng.random((1, 30, 26, 4)) * 800).astype(np.float32)
    img = SpatialImage(data, "mri", MedicalGeometry(np.diag([1.0, 1.0, 4.0, 1.0]), (30, 26, 4)), units="a.u.")
    with pytest.raises(ModelCardMismatch, match="medical image with --input-range"):
        load_model(ModelRef(name=str(weights)), img)
    model, info = load_model(ModelRef(name=str(weights), kwargs={"input_range": [0, 800]}), img)
    assert info["input_range"] == [0.0, 800.0] and info["card"]["application"] == "inplane"
    assert model.scale == (2, 2, 1) and model.receptive_radius == (5, 5, 0) and model.application == "inplane"
    sr = enhance_image(img, PatchInferer(model, tile=(16, 16, 4), threads=1))
    assert sr.geometry.almost_equal(img.geometry.scaled((2, 2, 1)))
    for k in range(4):
        want = spandrel_reference(weights, data[:, :, :, k] / 800.0) * 800.0
        np.testing.assert_allclose(sr.data[:, :, :, k], want, rtol=0, atol=1e-3)
