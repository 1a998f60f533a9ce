"""Multi-source training (issue 16): extra scenes / subjects add training patches, kept-out ones are
scored once at the end (the card's ``holdout:<source>`` metrics), never trained on."""
from __future__ import annotations

import numpy as np
import pytest
import rasterio
from rasterio.transform import from_origin
from scipy import ndimage

from domainsr.degrade import build_degradation
from domainsr.errors import ConfigError
from domainsr.image import GeoGeometry, SpatialImage
from domainsr.models.card import ConsistencySettings
from domainsr.models.checkpoints import read_card
from domainsr.train.config import TrainConfig
from domainsr.train.datasets import MixedPatchDataset
from domainsr.train.single_grid import prepare_data
from domainsr.train.trainer import train

DEGRADATION = {"kind": "optical", "scale": [2, 2], "mtf": 0.3}


def _field(seed: int, shape: tuple[int, int], offset: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.stack([ndimage.gaussian_filter(rng.random(shape), s) for s in (1.0, 1.5)])
    return (offset + 4000 * x / x.max()).astype(np.float32)


@pytest.fixture(scope="module")
def scene() -> SpatialImage:
    img = SpatialImage(_field(0, (176, 96), 300.0), "optical",
                       GeoGeometry("EPSG:32618", (10, 0, 500000, 0, -10, 4e6), (176, 96)), ("band1", "band2"),
                       units="DN")
    img.provenance["source"] = "synthetic-scene"
    return img


def _tif(path, data: np.ndarray) -> str:
    with rasterio.open(path, "w", driver="GTiff", width=data.shape[2], height=data.shape[1], count=data.shape[0],
                       dtype="float32", crs="EPSG:32633", transform=from_origin(400000, 5e6, 10, 10)) as dst:
        dst.write(data)
    return str(path)


@pytest.fixture(scope="module")
def others(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("scenes")
    # a much brighter second scene, so patches tell which scene they came from
    return {"extra": _tif(d / "second.tif", _field(1, (96, 96), 20000.0)),
            "kept": _tif(d / "third.tif", _field(2, (64, 80), 300.0))}


def _config(tmp_path, others, **data) -> TrainConfig:
    raw = {"domain": "optical", "model": {"name": "rescnn", "kwargs": {"n_blocks": 2, "n_feats": 8}},
           "data": {"source": "synthetic", "split": {"axis": 0, "train": 0.6, "val": 0.1, "test": 0.3},
                    "extra": [{"source": others["extra"], "weight": 0.5}],
                    "holdout": [{"source": others["kept"]}], **data},
           "degradation": DEGRADATION, "scale": [2, 2], "patch_size": [16, 16], "batch_size": 4, "steps": 30,
           "lr": 2e-3, "val_every": 1000, "save_every": 1000, "seed": 1,
           "output": {"name": "multi", "dir": str(tmp_path / "ckpt"), "run_dir": str(tmp_path / "runs")}}
    return TrainConfig.model_validate(raw)


def test_extra_sources_share_the_patches_by_weight_and_deterministically(tmp_path, scene, others):
    cfg = _config(tmp_path, others)
    data = prepare_data(cfg, scene, build_degradation(DEGRADATION), (6, 6))
    ds = data.train
    assert isinstance(ds, MixedPatchDataset) and len(ds.parts) == 2
    parts = np.array([ds.part_of(i) for i in range(3000)])
    assert abs(parts.mean() - 1 / 3) < 0.03  # weight 0.5 beside the main source's 1
    norm = data.norm  # fixed normalisation: the main train region's numbers for every source
    for i in range(40):
        _lr, hr = ds[i]
        raw_mean = float(hr.mean()) * float(norm.scale.mean()) + float(norm.offset.mean())
        assert (raw_mean > 15000) == (ds.part_of(i) == 1), i
    a, b = ds[7], ds[7]
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a, b))
    # the main source's patches still come from its train region only
    main = ds.parts[0]
    for i in range(200):
        k, box = ds.sample_box(i)
        if k == 0:
            assert box[0].stop <= data.regions["train"].stop
            assert box == main.sample_box(i)
    assert list(data.holdout) == [f"holdout:{others['kept']}"]
    assert len(data.holdout[f"holdout:{others['kept']}"]) == 1


def test_training_scores_the_kept_out_source_and_records_every_source(tmp_path, scene, others):
    cfg = _config(tmp_path, others)
    cfg.card.consistency = ConsistencySettings(iterations=1, upsampler="nearest")
    res = train(cfg, image=scene)
    key = f"holdout:{others['kept']}"
    card = read_card(res.checkpoint)
    m = card.metrics[key]
    assert m.region == key and "kept out of training entirely" in m.description
    assert m.n_pixels > 0 and np.isfinite(m.gain_db)
    assert res.holdout[key].gain_db == pytest.approx(m.gain_db)
    split = card.training_data.split
    assert [e["source"] for e in split["extra"]] == [others["extra"]]
    assert [h["source"] for h in split["holdout"]] == [others["kept"]]
    assert others["extra"] in [f.path for f in card.training_data.files]
    assert others["kept"] not in [f.path for f in card.training_data.files]
    assert "kept out entirely" in card.training_data.description
    assert card.consistency == ConsistencySettings(iterations=1, upsampler="nearest")  # the config's card section


def test_a_source_cannot_be_both_trained_on_and_kept_out(tmp_path, others):
    with pytest.raises(ValueError, match="both trained on and kept out"):
        _config(tmp_path, others, holdout=[{"source": others["extra"]}])
    with pytest.raises(ValueError, match="once"):
        _config(tmp_path, others, extra=[{"source": others["extra"]}, {"source": others["extra"]}])


def test_an_extra_source_of_another_domain_is_refused_naming_it(tmp_path, scene, others):
    import nibabel as nib

    vol = tmp_path / "head.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), vol)
    cfg = _config(tmp_path, others, extra=[{"source": str(vol)}], holdout=[])
    with pytest.raises(ConfigError, match="mri|ct") as err:
        prepare_data(cfg, scene, build_degradation(DEGRADATION), (6, 6))
    assert "head.nii.gz" in str(err.value)
