"""Knowledge distillation (issue 17: a fast student of a shipped model): the loss pulls the student
towards its teacher's output; a teacher that reads another input is refused, naming why."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from domainsr.errors import ConfigError
from domainsr.image import GeoGeometry, SpatialImage
from domainsr.models.checkpoints import read_card
from domainsr.train import loop
from domainsr.train.config import TrainConfig
from domainsr.train.trainer import train


@pytest.fixture(scope="module")
def scene() -> SpatialImage:
    rng = np.random.default_rng(0)
    x = np.stack([ndimage.gaussian_filter(rng.random((160, 96)), s) for s in (1.0, 1.5)])
    img = SpatialImage((300 + 4000 * x / x.max()).astype(np.float32), "optical",
                       GeoGeometry("EPSG:32618", (10, 0, 500000, 0, -10, 4e6), (160, 96)), ("band1", "band2"),
                       units="DN")
    img.provenance["source"] = "synthetic-scene"
    return img


def _config(tmp_path, name: str, feats: int, **extra) -> TrainConfig:
    return TrainConfig.model_validate({
        "domain": "optical", "model": {"name": "rescnn", "kwargs": {"n_blocks": 2, "n_feats": feats}},
        "data": {"source": "synthetic", "split": {"axis": 0, "train": 0.6, "val": 0.1, "test": 0.3}},
        "degradation": {"kind": "optical", "scale": [2, 2], "mtf": 0.3}, "scale": [2, 2], "patch_size": [16, 16],
        "batch_size": 4, "steps": 20, "lr": 2e-3, "val_every": 1000, "save_every": 1000, "seed": 1,
        "output": {"name": name, "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}, **extra})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory, scene) -> str:
    tmp = tmp_path_factory.mktemp("teacher")
    return str(train(_config(tmp, "teacher", 8), image=scene).checkpoint)


def test_the_student_learns_from_its_teacher_and_the_card_says_so(tmp_path, scene, teacher, monkeypatch) -> None:
    seen: list[float] = []
    real_l1 = loop.l1

    def spy(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        out = real_l1(a, b)
        seen.append(float(out))
        return out

    monkeypatch.setattr(loop, "l1", spy)
    cfg = _config(tmp_path, "student", 4, distill={"teacher": teacher, "weight": 0.5})
    res = train(cfg, image=scene)
    assert len(seen) == cfg.steps and all(np.isfinite(seen))  # one teacher term per step
    card = read_card(res.checkpoint)
    assert "0.5 L1 to teacher" in card.training.loss
    assert card.architecture.kwargs["n_feats"] == 4


def test_a_teacher_on_another_normalisation_is_refused(tmp_path, scene, teacher) -> None:
    cfg = _config(tmp_path, "student2", 4, distill={"teacher": teacher},
                  normalization={"kind": "fixed", "offset": [0.0, 0.0], "scale": [1.0, 1.0]})
    with pytest.raises(ConfigError, match="does not read this run's input"):
        train(cfg, image=scene)


def test_distillation_takes_no_gan_stage(tmp_path) -> None:
    with pytest.raises(ValueError, match="distill"):
        _config(tmp_path, "s", 4, distill={"teacher": "x"}, gan={"enabled": True, "steps": 5})
