"""Guided training: Wald-protocol pairs on two grids, a leak-free split, a tiny run that learns and
writes a loadable checkpoint, and a few steps of the shipped config on the real sample."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from guided_testdata import GUIDE, TARGET, TINY, scene

from domainsr.degrade import build_degradation
from domainsr.errors import ConfigError
from domainsr.models import build_model
from domainsr.models.guided import PackedGuided, load_guided_checkpoint
from domainsr.train.config import TrainConfig
from domainsr.train.guided import prepare_guided_data, two_grid
from domainsr.train.trainer import train

ROOT = Path(__file__).resolve().parents[2]
DEG = {"kind": "optical", "scale": [2, 2], "mtf": 0.3, "noise_sigma": 1.0}


def _config(tmp_path, **kw) -> TrainConfig:
    raw = {"domain": "optical", "model": {"name": "guided_rescnn", "kwargs": TINY},
           "data": {"source": "synthetic", "bands": list(TARGET), "margin": 2,
                    "split": {"axis": 0, "train": 0.6, "val": 0.1, "test": 0.3}},
           "guide": {"bands": list(GUIDE), "degradation": DEG}, "degradation": DEG, "scale": [2, 2],
           "patch_size": [24, 24], "batch_size": 4, "steps": 24, "lr": 2e-3, "val_every": 12,
           "save_every": 12, "seed": 3, "threads": 1,
           "output": {"name": "tiny-guided", "dir": str(tmp_path / "ckpt"),
                      "run_dir": str(tmp_path / "runs")}}
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def _data(cfg, bands):
    target, guide = two_grid(bands, cfg)
    net = build_model("guided_rescnn", spatial_dims=2, in_channels=5, scale=(2, 2), guide_channels=2, **TINY)
    return prepare_guided_data(cfg, target, guide, build_degradation(DEG), build_degradation(DEG),
                               net.receptive_radius), net


def test_pairs_have_the_right_shapes_and_the_split_does_not_leak(tmp_path):
    cfg = _config(tmp_path)
    bands = scene()
    data, net = _data(cfg, bands)
    x, y = data.train[0]
    assert x.shape == (3 + 2 * 4, 12, 12) and y.shape == (3, 24, 24)  # packed LR grid; target patch
    assert x.dtype == y.dtype == torch.float32
    x2, _ = data.train[0]
    assert torch.equal(x, x2) and not torch.equal(x, data.train[1][0])  # a pure function of (seed, i)
    # the packed input unpacks to the degraded target (LR) and the degraded guide (on the target's grid)
    with torch.no_grad():
        out = PackedGuided(net)(x[None])
    assert out.shape == (1, 3, 24, 24)
    r = data.regions
    assert r["train"].stop + data.gap <= r["val"].start and r["val"].stop <= r["test"].start
    assert data.gap >= net.receptive_radius[0] * 2 + 24 + 2 * 2 * 2
    rows = set()
    for i in range(200):
        box = data.train.sample_box(i)
        gbox = data.train.guide_box(i)
        assert r["train"].start <= box[0].start and box[0].stop <= r["train"].stop
        assert (gbox[0].start, gbox[0].stop, gbox[1].start) == (2 * box[0].start, 2 * box[0].stop,
                                                                2 * box[1].start)
        rows.update(range(box[0].start, box[0].stop))
    assert max(rows) < r["val"].start - net.receptive_radius[0] * 2
    val, test = data.val[0], data.test[0]
    assert val.hr.shape[0] == 3 and val.lr.shape[1:] == tuple(n // 2 for n in val.hr.shape[1:])
    assert val.guide.shape == (2, *val.hr.shape[1:]) and test.hr.shape[1] >= 56


def test_config_checks(tmp_path):
    with pytest.raises(ValueError, match="no data.planes, no GAN"):
        _config(tmp_path, gan={"enabled": True, "steps": 2})
    cfg = _config(tmp_path, guide={"bands": list(GUIDE), "degradation": {**DEG, "scale": [3, 3]}})
    with pytest.raises(ConfigError, match="guide.degradation reduces by"):
        train(cfg, image=scene())
    with pytest.raises(ConfigError, match=r"bands \['G9'\]"):
        train(_config(tmp_path, guide={"bands": ["G9"], "degradation": DEG}), image=scene())


def test_tiny_run_learns_and_writes_a_loadable_checkpoint(tmp_path):
    from domainsr.engine.guided import enhance_band_set

    cfg = _config(tmp_path)
    bands = scene()
    data, _ = _data(cfg, bands)
    res = train(cfg, image=bands)
    assert res.steps == 24 and res.stopped_by == "steps" and len(res.val_history) == 1
    model, card = load_guided_checkpoint(str(res.checkpoint))
    assert card.bands == [*TARGET, *GUIDE] and card.output_bands == list(TARGET)
    assert card.architecture.kwargs["guide_channels"] == 2
    assert card.in_channels == 5 and card.out_channels == 3
    test = card.metrics["test"]
    assert test.baseline in ("linear", "cubic", "lanczos") and test.n_pixels > 0
    assert card.training_data.split["regions"]["test"][1] == 200
    # the training loss on fixed training patches went down (untrained = cubic baseline)
    xs, ys = (torch.stack(t) for t in zip(*(data.train[i] for i in range(16))))
    untrained = PackedGuided(build_model("guided_rescnn", spatial_dims=2, in_channels=5, scale=(2, 2),
                                         guide_channels=2, **TINY)).eval()
    with torch.no_grad():
        before = torch.nn.functional.l1_loss(untrained(xs), ys)
        after = torch.nn.functional.l1_loss(PackedGuided(model.net)(xs), ys)
    assert after < 0.9 * before
    assert np.mean([v for _, v in res.losses[-6:]]) < np.mean([v for _, v in res.losses[:6]])
    out = enhance_band_set(bands, str(res.checkpoint), threads=1)
    assert out.data.shape == (3, 400, 128) and np.isfinite(out.data).all()


@pytest.mark.slow
@pytest.mark.realdata
def test_shipped_config_runs_a_few_steps_on_the_real_sample(tmp_path, sample_data):
    from domainsr.engine.guided import enhance_band_set
    from domainsr.io.sentinel2 import read_sentinel2

    cfg = TrainConfig.from_yaml(ROOT / "configs/train/sentinel2_20m_guided.yaml", overrides={
        "steps": 3, "val_every": 2, "save_every": 2, "threads": 1, "output.dir": str(tmp_path / "ckpt"),
        "output.run_dir": str(tmp_path / "runs")})
    assert cfg.output.name == "sentinel2-20m-guided" and cfg.max_minutes <= 9
    res = train(cfg)
    assert res.steps == 3 and res.card.output_bands == ["B05", "B06", "B07", "B8A", "B11", "B12"]
    assert res.card.bands[6:] == ["B02", "B03", "B04", "B08"] and len(res.card.training_data.files) == 10
    full = read_sentinel2(sample_data["sentinel2"], align=True)
    groups = {}
    for k, n in (("10m", 2), ("20m", 1)):
        img = full.groups[k]
        groups[k] = img.derive(img.data[:, : n * 40, : n * 36], mask=None,
                               geometry=img.geometry.cropped((0, 0), (n * 40, n * 36)))
    crop = type(full)(groups, provenance=full.provenance)
    out = enhance_band_set(crop, str(res.checkpoint), threads=1)
    assert out.band_names == tuple(res.card.output_bands) and out.data.shape == (6, 80, 72)
    assert out.geometry.almost_equal(crop.groups["10m"].geometry) and np.isfinite(out.data).all()
