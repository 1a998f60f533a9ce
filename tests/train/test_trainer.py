"""The trainer on a tiny model and a small synthetic scene: learning, metrics, resume, GAN, config."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from domainsr.degrade import build_degradation
from domainsr.errors import ConfigError
from domainsr.image import GeoGeometry, SpatialImage
from domainsr.models import build_model
from domainsr.models.checkpoints import load_checkpoint
from domainsr.train.config import TrainConfig
from domainsr.train.datasets import normalize
from domainsr.train.scoring import border, score
from domainsr.train.single_grid import prepare_data
from domainsr.train.trainer import train

DEGRADATION = {"kind": "optical", "scale": [2, 2], "mtf": 0.3, "noise_sigma": 2.0}


@pytest.fixture(scope="module")
def scene() -> SpatialImage:
    rng = np.random.default_rng(0)
    x = np.stack([ndimage.gaussian_filter(rng.random((176, 96)), s) for s in (1.0, 1.5)])
    x = (300 + 4000 * x / x.max()).astype(np.float32)
    img = SpatialImage(x, "optical", GeoGeometry("EPSG:32618", (10, 0, 500000, 0, -10, 4e6), (176, 96)),
                       ("B04", "B08"), units="DN")
    img.provenance["source"] = "synthetic-scene"
    return img


def _config(tmp_path, **kw) -> TrainConfig:
    raw = {"domain": "optical", "model": {"name": "rescnn", "kwargs": {"n_blocks": 2, "n_feats": 8}},
               "data": {"source": "synthetic", "split": {"axis": 0, "train": 0.6, "val": 0.1, "test": 0.3}},
               "degradation": DEGRADATION, "scale": [2, 2], "patch_size": [16, 16], "batch_size": 4, "steps": 30,
               "lr": 2e-3, "val_every": 10, "save_every": 10, "seed": 1,
               "output": {"name": "tiny", "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}}
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def _state(path):
    model, card = load_checkpoint(path)
    return {k: v.clone() for k, v in model.net.state_dict().items()}, model, card


def test_tiny_run_learns_and_writes_a_card(tmp_path, scene):
    cfg = _config(tmp_path)
    torch.manual_seed(cfg.seed)  # the trainer builds its net right after seeding the same way
    init = build_model("rescnn", spatial_dims=2, in_channels=2, scale=(2, 2), n_blocks=2, n_feats=8)
    res = train(cfg, image=scene)
    assert res.steps == 30 and res.stopped_by == "steps" and res.checkpoint.exists()
    trained, model, card = _state(res.checkpoint)
    assert any(not torch.equal(trained[k], v) for k, v in init.state_dict().items())

    # the training loss on a fixed batch of training patches went down
    data = prepare_data(cfg, scene, build_degradation(DEGRADATION), card.receptive_radius)
    lr, hr = (torch.stack(t) for t in zip(*(data.train[i] for i in range(16))))
    with torch.no_grad():
        before = torch.nn.functional.l1_loss(init(lr), hr)
        after = torch.nn.functional.l1_loss(model.net(lr), hr)
    assert after < 0.97 * before

    assert [h["step"] for h in res.val_history] == [10, 20]
    assert card.metrics["test"].psnr == pytest.approx(res.test.psnr)
    assert card.training.steps == 30 and card.bands == ["B04", "B08"] and card.units == "DN"
    split = card.training_data.split
    assert split["regions"]["test"] == [data.regions["test"].start, data.regions["test"].stop]
    assert split["regions"]["val"][0] - split["regions"]["train"][1] >= split["gap_px"]
    assert card.normalization.kind == "fixed" and len(card.normalization.offset) == 2


def test_val_and_test_psnr_match_a_direct_computation(tmp_path, scene):
    cfg = _config(tmp_path, steps=8, val_every=100)
    res = train(cfg, image=scene)
    model, card = load_checkpoint(res.checkpoint)
    data = prepare_data(cfg, scene, build_degradation(DEGRADATION), card.receptive_radius)
    for region, pairs in (("val", data.val), ("test", data.test)):
        (pair,) = pairs
        with torch.no_grad():  # the card model works in the data's own units
            sr = model(torch.from_numpy(pair.lr)[None])[0].numpy().astype(np.float64)
        hr = pair.hr.astype(np.float64)
        m = np.ones(hr.shape[1:], bool)
        m[:4], m[-4:], m[:, :4], m[:, -4:] = False, False, False, False  # 2 LR px at x2
        assert np.array_equal(m, border(pair, (2, 2)))
        psnrs = [10 * np.log10((h[m].max() - h[m].min()) ** 2 / np.mean((s[m] - h[m]) ** 2)) for s, h in zip(sr, hr)]
        got = card.metrics[region]
        assert got.psnr == pytest.approx(np.mean(psnrs), abs=1e-3)
        assert got.n_pixels == m.sum()
        # the baseline figure is the best of the interpolations, scored the same way
        cubic = torch.nn.functional.interpolate(torch.from_numpy(normalize(pair.lr, pair.norm))[None], scale_factor=2,
                                                mode="bicubic", align_corners=False)[0].numpy()
        cubic = cubic * pair.norm.scale[:, None, None] + pair.norm.offset[:, None, None]
        assert got.psnr_baseline >= score([cubic], [pair], (2, 2))[0] - 1e-6
        assert got.gain_db == pytest.approx(got.psnr - got.psnr_baseline)

    # a run initialised from this checkpoint with no steps keeps its weights (and re-measures them)
    again = train(_config(tmp_path, steps=0, init_from=str(res.checkpoint), output={
        "name": "tiny_again", "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}), image=scene)
    a, _, _ = _state(res.checkpoint)
    b, _, card_b = _state(again.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert card_b.metrics["test"].psnr == pytest.approx(card.metrics["test"].psnr, abs=1e-9)
    with pytest.raises(ConfigError, match="init_from"):
        train(_config(tmp_path, steps=0, init_from=str(res.checkpoint),
                      model={"name": "rescnn", "kwargs": {"n_blocks": 3, "n_feats": 8}}), image=scene)


def test_resume_continues_from_the_saved_step_bit_exactly(tmp_path, scene):
    full = train(_config(tmp_path / "a", steps=12, save_every=4, val_every=100), image=scene)

    class Crash(RuntimeError):
        pass

    def crash_at_6(event):
        if event.get("event") == "step" and event["step"] == 6:
            raise Crash

    cfg = _config(tmp_path / "b", steps=12, save_every=4, val_every=100)
    with pytest.raises(Crash):
        train(cfg, image=scene, on_step=crash_at_6)
    seen = []
    resumed = train(cfg, image=scene, resume=True, on_step=lambda e: seen.append(e["step"]))
    assert seen[0] == 5 and seen[-1] == 12  # continued after the state saved at step 4
    a, _, _ = _state(full.checkpoint)
    b, _, _ = _state(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="different config"):
        train(_config(tmp_path / "b", steps=12, patch_size=[8, 8]), image=scene, resume=True)


def test_gan_stage_runs_and_resumes(tmp_path, scene):
    gan = {"enabled": True, "steps": 4, "discriminator": {"name": "unet_discriminator", "kwargs": {"n_feats": 4}}}
    cfg = _config(tmp_path, steps=4, save_every=2, val_every=100, gan=gan)
    stop = {"n": 0}

    def crash_in_gan(event):
        if event.get("stage") == "gan" and event.get("step") == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cfg, image=scene, on_step=crash_in_gan)
    res = train(cfg, image=scene, resume=True, on_step=lambda e: stop.__setitem__("n", stop["n"] + 1))
    assert (res.steps, res.gan_steps) == (4, 4) and stop["n"] == 2  # gan steps 3 and 4 only
    assert res.card.training.gan_steps == 4 and res.card.training.extra["gan"]["adversarial"] > 0


def test_time_budget_stops_the_run(tmp_path, scene):
    res = train(_config(tmp_path, steps=100000, max_minutes=0.02, val_every=100000), image=scene)
    assert res.stopped_by == "time" and 0 < res.steps < 100000
    assert res.card.training.stopped_by == "time"


def test_config_is_strict_and_takes_overrides(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("domain: optical\nmodel: {name: rescnn}\ndata: {source: sentinel2, bands: [B04]}\n"
                    "degradation: {kind: optical}\nscale: [2, 2]\npatch_size: [32, 32]\nsteps: 100\n"
                    "output: {name: x}\n")
    cfg = TrainConfig.from_yaml(good, overrides={"steps": 7, "data.split.axis": 1})
    assert cfg.steps == 7 and cfg.data.split.axis == 1 and cfg.data.bands == ["B04"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("steps: 100", "steps: 100\nbach_size: 8"))
    with pytest.raises(ConfigError, match="bach_size") as err:
        TrainConfig.from_yaml(bad)
    assert str(bad) in str(err.value)
    with pytest.raises(ConfigError, match="multiples"):
        TrainConfig.from_yaml(good, overrides={"patch_size": [33, 32]})
    with pytest.raises(ConfigError, match="spilt"):
        TrainConfig.from_yaml(good, overrides={"data.spilt": {"axis": 0}})
