"""The registry: specs, strict options, and isolation of a model whose module cannot import."""
from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

from domainsr.errors import ModelError
from domainsr.models import ModelSpec, build_model, get_spec, list_models, registry

EXPECTED = {"nearest", "linear", "cubic", "lanczos", "srcnn", "vdsr", "espcn", "fsrcnn", "edsr", "mdsr",
            "rcan", "srresnet", "rrdbnet", "rescnn", "repsr", "vgg_discriminator", "unet_discriminator"}


def test_all_families_are_registered_with_2d_and_3d():
    specs = {s.name: s for s in list_models()}
    assert EXPECTED <= set(specs)
    for name in EXPECTED:
        assert specs[name].spatial_dims == (2, 3), name
    assert {s.name for s in list_models("discriminator")} == {"vgg_discriminator", "unet_discriminator"}
    assert all(s.kind == "sr" for s in list_models("sr"))


@pytest.mark.parametrize("spec", list_models(), ids=lambda s: s.name)
def test_spec_defaults_match_the_factory_signature(spec: ModelSpec):
    sig = inspect.signature(registry.load_factory(spec))
    fixed = {"spatial_dims", "in_channels", "scale", "out_channels"}
    params = {k: p.default for k, p in sig.parameters.items() if k not in fixed}
    assert set(params) == set(spec.defaults), spec.name
    for k, v in spec.defaults.items():
        assert params[k] == v, (spec.name, k)
    assert spec.summary()["name"] == spec.name


def test_importing_the_registry_imports_no_network_module():
    code = ("import sys, domainsr.models as m; m.list_models(); "
            "print(any(k.startswith('domainsr.models.') and k != 'domainsr.models.registry' for k in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_a_broken_model_module_breaks_only_its_own_name(monkeypatch):
    bad = ModelSpec("broken", "test", "domainsr.models.no_such_module:Net", (2,), "fails to import")
    monkeypatch.setitem(registry._REGISTRY, "broken", bad)
    with pytest.raises(ModelError, match="broken.*cannot import"):
        build_model("broken", spatial_dims=2, in_channels=1, scale=2)
    net = build_model("cubic", spatial_dims=2, in_channels=1, scale=2)
    assert net.scale == (2, 2)


def test_errors_name_the_model_and_the_problem():
    with pytest.raises(ModelError, match="unknown model"):
        get_spec("nope")
    with pytest.raises(ModelError, match=r"rescnn.*unknown option.*n_block\b"):
        build_model("rescnn", spatial_dims=2, in_channels=1, scale=2, n_block=3)
    with pytest.raises(ModelError, match="rescnn.*scale"):
        build_model("rescnn", spatial_dims=2, in_channels=1, scale=(2, 2, 2))
    with pytest.raises(ModelError, match="spatial_dims=4"):
        build_model("rescnn", spatial_dims=4, in_channels=1, scale=2)
    with pytest.raises(ModelError, match="needs a scale"):
        build_model("rescnn", spatial_dims=2, in_channels=1)
    with pytest.raises(ModelError, match="discriminator takes no scale"):
        build_model("unet_discriminator", spatial_dims=2, in_channels=1, scale=2)
    with pytest.raises(ModelError, match="mdsr.*heads"):
        build_model("mdsr", spatial_dims=2, in_channels=1, scale=5)
    with pytest.raises(ModelError, match="out_channels"):
        build_model("rescnn", spatial_dims=2, in_channels=3, scale=2, out_channels=1)
    with pytest.raises(ModelError, match="already registered"):
        registry.register_model(get_spec("cubic"))


def test_baselines_answer_to_their_usual_names():
    from domainsr.app.models import model_identity
    from domainsr.config import ModelRef

    assert get_spec("bicubic").name == "cubic" and get_spec("tricubic").name == "cubic"
    assert get_spec("bilinear").name == "linear" and get_spec("trilinear").name == "linear"
    assert get_spec("cubic").aliases == ("bicubic", "tricubic") and get_spec("cubic").summary()["aliases"]
    net = build_model("trilinear", spatial_dims=3, in_channels=1, scale=2)
    assert net.method == "linear" and net.scale == (2, 2, 2)
    # the same model under another name is the same run: its outputs are not made twice
    assert model_identity(ModelRef(name="bicubic", scale=2)) == model_identity(ModelRef(name="cubic", scale=2))
    with pytest.raises(ModelError, match="already registered"):
        registry.register_model(ModelSpec("bicubic", "baseline", "domainsr.models.baselines:cubic", (2,), "dup"))


def test_unknown_names_get_the_closest_model_or_checkpoint():
    from domainsr.models.names import check_model

    with pytest.raises(ModelError, match="did you mean cubic"):
        check_model("cubc", 2)
    with pytest.raises(ModelError, match="did you mean mri-t1-x2"):
        check_model("mri_t1_x3")
    with pytest.raises(ModelError, match="registered: .*cubic"):
        check_model("zzzzzz", 2)
    assert check_model("mri_t1_x2") == "checkpoint" and check_model("bilinear", 2) == "registry"
