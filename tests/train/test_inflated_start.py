"""A 3D thick-slice run started from a 2D slice-wise checkpoint (``init_from``, inflated), and a
kept-out volume scored with its axes reordered (``data.holdout[].axes``)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from domainsr.degrade import build_degradation
from domainsr.errors import ConfigError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.models.checkpoints import load_checkpoint
from domainsr.models.inflate import inflate_state_dict
from domainsr.train.config import TrainConfig
from domainsr.train.single_grid import prepare_data
from domainsr.train.trainer import train

ARCH = {"n_blocks": 1, "n_feats": 4}


def _head(seed: int, shape: tuple[int, int, int]) -> SpatialImage:
    rng = np.random.default_rng(seed)
    hu = -1000 + 2500 * ndimage.gaussian_filter(rng.random(shape), 2.0)
    hu = (hu - hu.min()) / np.ptp(hu) * 2500 - 1000
    img = SpatialImage(hu[None].astype(np.float32), "ct", MedicalGeometry(np.diag([1.0, 1.0, 1.5, 1.0]), shape),
                       units="HU")
    img.provenance["source"] = f"synthetic-head-{seed}"
    return img


@pytest.fixture(scope="module")
def head() -> SpatialImage:
    return _head(0, (16, 120, 32))


def _config(tmp_path, name: str, **kw) -> TrainConfig:
    raw = {"domain": "ct", "model": {"name": "rescnn", "kwargs": ARCH},
           "data": {"source": "synthetic", "split": {"axis": 1, "train": 0.5, "val": 0.2, "test": 0.3},
                    "background": -900, "min_foreground": 0.0, "margin": 1},
           "degradation": {"kind": "ct", "scale": [1, 1, 4], "hu_range": None}, "scale": [1, 1, 4],
           "patch_size": [8, 8, 16], "batch_size": 2, "steps": 0, "lr": 1e-3, "val_every": 1000,
           "save_every": 1000, "seed": 1,
           "output": {"name": name, "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}}
    raw.update(kw)
    return TrainConfig.model_validate(raw)


def test_a_3d_run_starts_from_the_2d_checkpoint_inflated(tmp_path, head):
    data2d = {"source": "synthetic", "split": {"axis": 1, "train": 0.5, "val": 0.2, "test": 0.3},
              "planes": [[0, 2], [1, 2]], "background": -900, "min_foreground": 0.0, "margin": 1, "val_planes": 4}
    flat = train(_config(tmp_path, "flat", data=data2d, degradation={"kind": "ct", "scale": [1, 4], "hu_range": None},
                         scale=[1, 4], patch_size=[8, 16], steps=3), image=head)
    m2, card2 = load_checkpoint(flat.checkpoint)
    norm = {"kind": "fixed", "offset": [float(v) for v in card2.normalization.offset],
            "scale": [float(v) for v in card2.normalization.scale]}
    deep = train(_config(tmp_path, "deep", init_from=str(flat.checkpoint), normalization=norm,
                         model={"name": "rescnn", "kwargs": {**ARCH, "base": "cubic"}}), image=head)
    m3, card3 = load_checkpoint(deep.checkpoint)
    assert card3.spatial_dims == 3 and tuple(card3.scale) == (1, 1, 4) and card3.application == "direct"
    want = inflate_state_dict(m2.net.state_dict(), m3.net.state_dict(), 0)
    assert all(torch.equal(want[k], v) for k, v in m3.net.state_dict().items())

    # the inflated start and the 2D net agree on a plane of the inserted axis
    x = torch.randn(1, 1, 3, 12, 8)
    with torch.no_grad():
        assert torch.allclose(m3.net.eval()(x)[:, :, 1], m2.net.eval()(x[:, :, 1]), atol=1e-4)

    with pytest.raises(ConfigError, match="model.kwargs.base: cubic"):  # 3D default base: linear
        train(_config(tmp_path, "wrong_base", init_from=str(flat.checkpoint)), image=head)
    with pytest.raises(ConfigError, match="same network in 3D"):
        train(_config(tmp_path, "wrong_arch", init_from=str(flat.checkpoint),
                      model={"name": "rescnn", "kwargs": {"n_blocks": 2, "n_feats": 4, "base": "cubic"}}), image=head)


def test_a_kept_out_volume_is_scored_with_its_axes_reordered(tmp_path, head):
    kept = _head(1, (12, 40, 20))
    cfg = _config(tmp_path, "kept", data={"source": "synthetic", "split": {"axis": 1, "train": 0.5, "val": 0.2,
                                                                              "test": 0.3},
                                          "background": -900, "min_foreground": 0.0, "margin": 1,
                                          "holdout": [{"source": "kept", "axes": [2, 0, 1]}]})
    data = prepare_data(cfg, head, build_degradation(cfg.degradation), (2, 2, 2), others={"kept": kept})
    (pair,) = data.holdout["holdout:kept"]
    assert pair.hr.shape == (1, 20, 12, 40) and pair.lr.shape == (1, 20, 12, 10)
    np.testing.assert_array_equal(pair.hr[0], kept.data[0].transpose(2, 0, 1))
    # a per-image (percentile) normalisation is measured on the reordered volume as well
    pct = cfg.model_copy(update={"normalization": TrainConfig.model_validate(
        {**cfg.model_dump(), "normalization": {"kind": "percentile"}}).normalization})
    (pair,) = prepare_data(pct, head, build_degradation(cfg.degradation), (2, 2, 2),
                           others={"kept": kept}).holdout["holdout:kept"]
    assert pair.hr.shape == (1, 20, 12, 40) and np.all(np.isfinite(pair.lr))
    with pytest.raises(ValueError, match="each once"):
        _config(tmp_path, "bad", data={"source": "synthetic", "holdout": [{"source": "kept", "axes": [2, 2, 1]}]})
