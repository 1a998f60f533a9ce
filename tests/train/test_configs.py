"""Every shipped training config loads strictly and starts: a few steps on the real sample data."""
from __future__ import annotations

from pathlib import Path

import pytest

from domainsr.errors import ConfigError
from domainsr.train.config import TrainConfig

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml"))


def test_there_are_training_configs():
    names = {p.stem for p in CONFIGS}
    assert {"sentinel2_rgbn_x2", "sentinel2_rgbn_x2_gan", "mri_t1_x2", "mri_slices_x4", "ct_slices_x4"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_validates(path):
    cfg = TrainConfig.from_yaml(path)
    assert cfg.output.name == path.stem.replace("_", "-")
    # a shipped model trains in at most about an hour on 2 cores (issue 16; resumable from its state)
    assert cfg.max_minutes + (cfg.gan.max_minutes if cfg.gan.enabled else 0) <= 60


def test_a_card_consistency_the_recipe_cannot_run_is_refused():
    base = CONFIGS[0].parent
    cfg = TrainConfig.from_yaml(base / "sentinel2_rgbn_x2.yaml")
    assert cfg.card.consistency is not None and cfg.card.consistency.noise_tolerance == 2.0  # the shipped S2 card's
    dc = {"card.consistency": {"iterations": 1, "noise_tolerance": 2.0}}
    with pytest.raises(ConfigError, match="noise_tolerance needs a degradation that states its noise"):
        TrainConfig.from_yaml(base / "mri_t1_x2.yaml", dc)  # its block mean has no noise
    with pytest.raises(ConfigError, match="for direct models"):
        TrainConfig.from_yaml(base / "mri_slices_x4.yaml", {"card.consistency": {"iterations": 1}})


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_trains_a_few_steps(path, tmp_path):
    from domainsr.data import NAMES, available_samples
    from domainsr.models.checkpoints import load_checkpoint
    from domainsr.train.trainer import train

    cfg = TrainConfig.from_yaml(path)
    wanted = {s.source for s in (*cfg.data.extra, *cfg.data.holdout)} | {cfg.data.source}
    missing = {s for s in wanted if "/" not in s and ":" not in s and s not in NAMES} - set(available_samples())
    if missing:
        pytest.skip(f"extra sample data not in the cache (domainsr data fetch could not get it): {sorted(missing)}")
    overrides = {"steps": 3, "val_every": 2, "save_every": 2, "output.dir": str(tmp_path / "ckpt"),
                 "output.run_dir": str(tmp_path / "runs"), "data.val_planes": 4}
    if "gan" in path.stem:
        overrides["gan.steps"] = 2
    res = train(TrainConfig.from_yaml(path, overrides=overrides))
    assert res.steps == 3 and len(res.val_history) == 1
    _, card = load_checkpoint(res.checkpoint)
    assert card.metrics["test"].n_pixels > 0 and card.training_data.files
    assert all(len(f.sha256) == 64 for f in card.training_data.files)
