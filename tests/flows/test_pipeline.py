"""The non-Prefect steps: run keys, model resolution, slice-wise application, band selection,
per-item time limit, the retry rule."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flow_inputs import write_geotiff_crop

from domainsr.app.audits import consistency_operator
from domainsr.app.enhance import enhance_item
from domainsr.app.inputs import select_input
from domainsr.app.models import find_checkpoint, model_identity, parse_scale, slice_axis_of, slicewise_module
from domainsr.app.runs import plan_run
from domainsr.config import EnhanceConfig, ModelRef
from domainsr.engine import PatchInferer, enhance_image
from domainsr.errors import ConfigError, InputError, ModelError, OutputError, ResourceLimitError, StoreError
from domainsr.image import MedicalGeometry, SpatialImage
from domainsr.models import build_model
from domainsr.retry import is_transient
from domainsr.stores.local import LocalStore


def _cfg(**kw) -> EnhanceConfig:
    return EnhanceConfig.model_validate({"name": "t", "model": {"name": "cubic", "scale": 2}, **kw})


def test_run_key_follows_what_changes_the_output():
    base = plan_run(_cfg()).run_key
    assert plan_run(_cfg()).run_key == base
    assert plan_run(_cfg(name="other", runner={"retries": 5}, tiling={"threads": 1})).run_key == base
    for change in ({"model": {"name": "cubic", "scale": 4}}, {"model": {"name": "linear", "scale": 2}},
                   {"bands": ["B02"]}, {"audit": {"alpha": 0.01}}, {"tiling": {"overlap": 8}},
                   {"output": {"format": "nifti"}}, {"run_audit": False}):
        assert plan_run(_cfg(**change)).run_key != base, change


def test_plan_refuses_unusable_models_and_settings():
    with pytest.raises(ModelError, match="no checkpoint or registered model"):
        plan_run(_cfg(model={"name": "no-such-model"}))
    with pytest.raises(ConfigError, match="give a scale"):
        plan_run(_cfg(model={"name": "cubic"}))
    with pytest.raises(ModelError, match="cannot enhance"):
        plan_run(_cfg(model={"name": "unet_discriminator", "scale": 2}))
    with pytest.raises(ConfigError, match="audit.tta"):
        plan_run(_cfg(audit={"tta": "sometimes"}), "my.yaml")
    assert parse_scale("1,1,4") == [1, 1, 4] and parse_scale("2") == 2
    with pytest.raises(ConfigError):
        parse_scale("two")


def _volume(shape=(12, 10, 6), spacing=(0.8, 0.8, 3.2)) -> SpatialImage:
    rng = np.random.default_rng(3)
    aff = np.diag([*spacing, 1.0])
    return SpatialImage(rng.normal(100, 20, (1, *shape)).astype(np.float32), "mri", MedicalGeometry(aff, shape),
                        units="a.u.")


@pytest.mark.parametrize("axis", [2, 0])
def test_slicewise_module_equals_separable_interpolation(axis):
    """A 2D cubic 'network' with scale (1, 4) applied slice-wise on both plane orientations is a 1D
    cubic along the slice axis, i.e. the 3D cubic with scale 4 on that axis only, also tiled."""
    img = _volume()
    if axis == 0:
        img = img.derive(np.ascontiguousarray(np.moveaxis(img.data, 3, 1)),
                         geometry=MedicalGeometry(np.diag([3.2, 0.8, 0.8, 1.0]), (6, 12, 10)))
    assert slice_axis_of(img) == axis
    net2d = build_model("cubic", spatial_dims=2, in_channels=1, scale=(1, 4))
    net2d.card = SimpleNamespace(scale=(1, 4), receptive_radius=(3, 3), name="cubic-slices", in_channels=1)
    net2d.prepare = lambda image: None
    module = slicewise_module(net2d, axis)
    scale3d = tuple(4 if a == axis else 1 for a in range(3))
    assert module.scale == scale3d and module.spatial_dims == 3
    ref = build_model("cubic", spatial_dims=3, in_channels=1, scale=scale3d)
    with torch.no_grad():
        want = ref(torch.from_numpy(img.data)[None])[0].numpy()
        got = module(torch.from_numpy(img.data)[None])[0].numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3)
    tiled = enhance_image(img, PatchInferer(module, tile=8, threads=1))
    np.testing.assert_allclose(tiled.data, want, rtol=0, atol=1e-3)
    assert tiled.geometry.almost_equal(img.geometry.scaled(scale3d))


def test_select_input_bands(sample_data):
    from domainsr.io import read_image

    s2 = read_image(sample_data["sentinel2"])
    assert select_input(s2, None).band_names == ("B02", "B03", "B04", "B08")  # the finest group
    assert select_input(s2, ["B8A", "B11"]).band_names == ("B8A", "B11")
    with pytest.raises(InputError, match="B99"):
        select_input(s2, ["B99"])
    rgbn = select_input(s2, None)
    assert select_input(rgbn, ["b08", "B02"]).band_names == ("B08", "B02")


def test_item_time_limit_stops_the_engine(sample_data, tmp_path):
    write_geotiff_crop(sample_data, tmp_path / "in" / "scene.tif")
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    spec = plan_run(_cfg(runner={"item_timeout_s": 1e-6}, run_audit=False))
    with pytest.raises(ResourceLimitError, match="time limit"):
        enhance_item(store, item, spec)
    assert not (tmp_path / "out" / "scene_sr.tif").exists()


def test_only_transient_errors_are_retried():
    assert is_transient(OSError("disk")) and is_transient(StoreError("PACS timeout"))
    assert is_transient(OutputError("nfs")) and is_transient(RuntimeError("CUDA OOM"))
    assert not is_transient(InputError("corrupt"))
    assert not is_transient(ConfigError("bad"))
    assert not is_transient(ModelError("bad weights"))
    assert not is_transient(ResourceLimitError("too slow"))


def test_registry_model_needs_no_checkpoint():
    ident = model_identity(ModelRef(name="lanczos", scale=[1, 1, 2]))
    assert ident == {"kind": "registry", "name": "lanczos", "family": "baseline", "scale": [1, 1, 2], "kwargs": {}}
    assert find_checkpoint("lanczos") is None


def _guided_checkpoint(folder):
    from domainsr.models.checkpoints import Architecture, FixedNormalization, ModelCard, save_checkpoint

    kwargs = {"guide_channels": 4, "n_blocks": 1, "n_feats": 4}
    net = build_model("guided_rescnn", spatial_dims=2, in_channels=10, scale=2, **kwargs)  # untrained: cubic
    targets, guides = ["B05", "B06", "B07", "B8A", "B11", "B12"], ["B02", "B03", "B04", "B08"]
    card = ModelCard(name="s2-guided-test", architecture=Architecture(name="guided_rescnn", kwargs=kwargs),
                     domain="optical", spatial_dims=2, scale=(2, 2), in_channels=10, out_channels=6,
                     bands=targets + guides, output_bands=targets, units="DN", input_range=(0, 10000),
                     normalization=FixedNormalization(offset=[1500.0] * 10, scale=[800.0] * 10),
                     receptive_radius=tuple(int(r) for r in net.receptive_radius))
    return save_checkpoint(net, card, folder / card.name)


def test_guided_checkpoint_enhances_a_band_set(sample_data, tmp_path):
    """A guided card takes a band set: its 20 m target bands come out on the (nested) 10 m grid,
    here equal to bicubic since the untrained guided net is its cubic base."""
    from domainsr.io.raster import read_raster, write_raster
    from domainsr.io.sentinel2 import find_sentinel2_bands

    scene = tmp_path / "in" / "S2_scene"
    for band, path in find_sentinel2_bands(sample_data["sentinel2"]).items():
        res = read_raster(path).geometry.res[0]
        if res <= 20:
            start = (400, 401) if res == 10 else (200, 200)
            size = 120 if res == 10 else 60
            write_raster(read_raster(path, window=((start[0], start[0] + size), (start[1], start[1] + size))),
                         scene / f"s2_{band}.tif")
    card = _guided_checkpoint(tmp_path / "ckpt")
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    (item,) = store.list_items()
    assert item.kind == "sentinel2"
    spec = plan_run(_cfg(model={"name": str(card)}, run_audit=True, audit={"tta": "flips"}))
    assert spec.model["guided"]
    result = enhance_item(store, item, spec)
    out = read_raster(result.output)
    lr = store.read(item).select(["B05", "B06", "B07", "B8A", "B11", "B12"])
    assert out.band_names == ("B05", "B06", "B07", "B8A", "B11", "B12") and out.geometry.res == (10.0, 10.0)
    left, top = out.geometry.bounds[0], out.geometry.bounds[3]
    col, row = ~lr.geometry.transform @ (left, top)
    assert col == pytest.approx(round(col)) and row == pytest.approx(round(row))  # nested in the 20 m grid
    r, c = round(row), round(col)
    h, w = out.spatial_shape[0] // 2, out.spatial_shape[1] // 2
    cubic = build_model("cubic", spatial_dims=2, in_channels=6, scale=2)
    with torch.no_grad():
        want = cubic(torch.from_numpy(lr.data[:, r:r + h, c:c + w].astype(np.float32))[None])[0].numpy()
    inner = (slice(None), slice(8, -8), slice(8, -8))  # away from the crop border (cubic padding differs)
    np.testing.assert_allclose(out.data[inner].astype(np.float32), np.clip(np.rint(want), 0, 65535)[inner], atol=1)
    assert result.verdict in ("pass", "review", "fail") and "audit.html" in result.extras


def test_slicewise_checkpoint_on_a_thick_slice_volume(sample_data, tmp_path, monkeypatch):
    """A slice-wise card (2D net, scale (1, 4)) loaded by name enhances a 3D volume with 4 mm slices
    along its slice axis only, after the card's checks and per-volume normalisation."""
    from domainsr.io.nifti import read_nifti, write_nifti
    from domainsr.models.checkpoints import Architecture, ModelCard, PercentileNormalization, save_checkpoint

    mni = read_nifti(sample_data["mni152"])
    block = np.ascontiguousarray(mni.data[:, 70:110, 90:126, 60:124:4])  # every 4th 1 mm slice
    aff = mni.geometry.affine @ np.diag([1.0, 1.0, 4.0, 1.0])
    aff[:3, 3] = mni.geometry.index_to_world([70, 90, 60])
    thick = mni.derive(block, geometry=MedicalGeometry(aff, block.shape[1:]))
    write_nifti(thick, tmp_path / "in" / "thick.nii.gz")
    net = build_model("rescnn", spatial_dims=2, in_channels=1, scale=(1, 4), n_blocks=1, n_feats=4)
    card = ModelCard(name="mri-slices-test", architecture=Architecture(name="rescnn", kwargs={"n_blocks": 1,
                                                                                              "n_feats": 4}),
                     domain="mri", spatial_dims=2, scale=(1, 4), in_channels=1, out_channels=1, units="a.u.",
                     normalization=PercentileNormalization(), application="slicewise",
                     receptive_radius=tuple(int(r) for r in net.receptive_radius))
    save_checkpoint(net, card, tmp_path / "ckpt" / card.name)
    monkeypatch.setenv("DOMAINSR_CHECKPOINTS", str(tmp_path / "ckpt"))
    store = LocalStore(tmp_path / "in", tmp_path / "out")
    spec = plan_run(_cfg(model={"name": "mri_slices_test"}, audit={"tta": "flips"}))
    result = enhance_item(store, store.list_items()[0], spec)
    out = read_nifti(result.output)
    assert out.spatial_shape == (40, 36, 64) and out.geometry.almost_equal(thick.geometry.scaled((1, 1, 4)))
    assert result.message == "mri-slices-test x1x1x4" and "audit.html" in result.extras
    corr = np.corrcoef(out.data[0, :, :, 1::4].ravel().astype(float),
                       mni.data[0, 70:110, 90:126, 61:124:4].ravel().astype(float))[0, 1]
    assert corr > 0.9  # the in-between slices resemble the real ones (the untrained net is its interpolation base)


def test_large_rasters_stream_to_the_same_output(sample_data, tmp_path):
    """Above ``tiling.stream_above_mpx`` a raster is enhanced window by window into the COG (bounded
    memory) and audited whole, window by window from the files; the pixels equal the in-memory path's."""
    from domainsr.io.raster import read_raster

    write_geotiff_crop(sample_data, tmp_path / "in" / "scene.tif")
    results = {}
    for name, mpx in (("memory", None), ("stream", 0.001)):
        store = LocalStore(tmp_path / "in", tmp_path / name)
        spec = plan_run(_cfg(model={"name": "lanczos", "scale": 2}, audit={"tta": "off"},
                                      tiling={"stream_above_mpx": mpx, "stream_audit_window": 64}))
        results[name] = enhance_item(store, store.list_items()[0], spec)
    mem, streamed = (read_raster(results[k].output) for k in ("memory", "stream"))
    np.testing.assert_array_equal(streamed.data, mem.data)
    assert streamed.geometry.almost_equal(mem.geometry) and streamed.band_names == mem.band_names
    assert "streamed" in results["stream"].message and results["stream"].verdict is not None
    report = json.loads(Path(results["stream"].extras["audit.json"]).read_text())
    assert report["grid"]["lr_shape"] == [96, 80] and report["grid"]["sr_shape"] == [192, 160]  # the whole scene
    assert report["coverage"]["scene_fraction"] == 1.0
    prov = json.loads(Path(results["stream"].output + ".provenance.json").read_text())["provenance"]
    assert prov["run"]["streamed"] and "window" not in prov["run"]["audit"]
    assert {"audit.html", "audit.json", "risk.tif", "regions.geojson"} <= set(results["stream"].extras)


def test_the_config_switch_picks_the_task_runner(tmp_path):
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from domainsr.config import RunnerConfig
    from flows.common import task_runner_for
    from flows.enhance import build_run

    threads = task_runner_for(RunnerConfig(max_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    remote = task_runner_for(RunnerConfig(task_runner="dask", dask_address="tcp://10.1.2.3:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://10.1.2.3:8786"
    local = task_runner_for(RunnerConfig(task_runner="dask", dask_workers=2))
    assert local.address is None and local.cluster_kwargs["n_workers"] == 2
    # a local cluster shares the cores: each worker's inference gets its share of torch threads
    spec, _ = build_run(model="cubic", scale=2, inputs=[str(tmp_path)], out=str(tmp_path / "o"), task_runner="dask")
    assert spec.config.runner.task_runner == "dask"
    assert spec.config.tiling.threads == 1  # default: one worker per physical core, one thread each
    spec, _ = build_run(model="cubic", scale=2, inputs=[str(tmp_path)], dask_address="tcp://h:8786")
    assert spec.config.runner.dask_address == "tcp://h:8786" and spec.config.tiling.threads is None


def test_reference_free_audit_uses_the_cards_own_degradation(tmp_path):
    from domainsr.degrade import build_degradation
    from domainsr.models.checkpoints import Architecture, FixedNormalization, ModelCard, save_checkpoint

    def card_with(degradation):
        net = build_model("rescnn", spatial_dims=2, in_channels=1, scale=2, n_blocks=1, n_feats=4)
        card = ModelCard(name="deg-test", architecture=Architecture(name="rescnn", kwargs={"n_blocks": 1,
                                                                                           "n_feats": 4}),
                         domain="optical", spatial_dims=2, scale=(2, 2), in_channels=1, out_channels=1, units="DN",
                         normalization=FixedNormalization(offset=[0.0], scale=[1.0]), degradation=degradation,
                         receptive_radius=tuple(int(r) for r in net.receptive_radius))
        return model_identity(ModelRef(name=str(save_checkpoint(net, card, tmp_path / "c"))))

    spec = {"kind": "gaussian_mean", "scale": [2, 2], "sigma": 1.0}
    down = consistency_operator(card_with(spec), (2, 2), 1)
    x = np.random.default_rng(0).normal(size=(1, 16, 12)).astype(np.float32)
    np.testing.assert_array_equal(down(x), build_degradation(spec)(x, None))
    assert down.describe()["kind"] == "gaussian_mean"
    # a card trained with noise and PSF jitter: the consistency check uses the same optics, noise-free
    noisy = {"kind": "optical", "scale": [2, 2], "mtf": 0.3, "noise_sigma": 2.0, "mtf_jitter": 0.1}
    down = consistency_operator(card_with(noisy), (2, 2), 1)
    clean = build_degradation({"kind": "optical", "scale": [2, 2], "mtf": 0.3})
    np.testing.assert_array_equal(down(x), clean(x, None))
    assert consistency_operator(card_with({"kind": "blind", "scale": 2}), (2, 2), 1) is None
    cubic = model_identity(ModelRef(name="cubic", scale=2))
    assert consistency_operator(cubic, (2, 2), 1) is None  # registry models: the audit's block mean


def test_guided_card_degradation_is_the_target_bands_operator():
    """A guided card stores {protocol, target, guide}; the audit re-degrades the target bands."""
    from domainsr.app.audits import card_degradation
    from domainsr.degrade import build_degradation
    from domainsr.models.checkpoints import resolve_checkpoint

    spec = card_degradation({"kind": "checkpoint", "path": resolve_checkpoint("sentinel2-20m-guided")}, (2, 2))
    assert spec["kind"] == "optical" and len(spec["mtf"]) == 6
    build_degradation({k: v for k, v in spec.items() if k != "derived"})
