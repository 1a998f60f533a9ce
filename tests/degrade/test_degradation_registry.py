"""``build_degradation``: every kind builds from its description, strictly."""
from __future__ import annotations

import json

import numpy as np
import pytest

from domainsr.degrade import Compose, build_degradation, degradation_kinds
from domainsr.errors import ConfigError

SPECS = [
    ({"kind": "optical", "scale": [2, 2], "mtf": [0.26, 0.24], "noise_sigma": 3.0}, (2, 16, 16)),
    ({"kind": "gaussian_mean", "scale": 2, "sigma": 1.0}, (2, 16, 16)),
    ({"kind": "kspace", "scale": [2, 2, 1], "window": "hamming"}, (1, 8, 8, 8)),
    ({"kind": "slice_profile", "axis": -1, "factor": 4, "profile": "gaussian"}, (1, 8, 8, 8)),
    ({"kind": "rician", "sigma": 0.03}, (1, 8, 8, 8)),
    ({"kind": "mri", "scale": [1, 1, 4], "rician_sigma": 0.02}, (1, 8, 8, 8)),
    ({"kind": "thick_slices", "axis": 2, "factor": 2}, (1, 8, 8, 8)),
    ({"kind": "hu_noise", "sigma_hu": 8.0}, (1, 8, 8, 8)),
    ({"kind": "ct", "scale": [1, 1, 2], "sigma_hu": 4.0}, (1, 8, 8, 8)),
    ({"kind": "blind", "scale": 2}, (3, 32, 32)),
    ({"kind": "compose", "steps": [{"kind": "kspace", "scale": 2}, {"kind": "rician", "sigma": 0.01}]},
     (1, 8, 8, 8)),
    ({"kind": "one_of", "options": [{"kind": "gaussian_mean", "scale": 2, "sigma": 0.0},
                                    {"kind": "mri", "scale": 2, "rician_sigma": 0.01}], "weights": [1, 3]},
     (1, 8, 8, 8)),
]


def test_every_kind_is_covered():
    assert {s["kind"] for s, _ in SPECS} == set(degradation_kinds())


@pytest.mark.parametrize("spec,shape", SPECS, ids=[s["kind"] for s, _ in SPECS])
def test_build_run_describe_round_trip(spec, shape):
    deg = build_degradation(spec)
    hr = (np.random.default_rng(0).random(shape) * 100).astype(np.float32)
    lr = deg(hr, np.random.default_rng(1))
    factors = deg.factors(len(shape) - 1)
    assert lr.shape == (shape[0],) + tuple(s // f for s, f in zip(shape[1:], factors))
    assert lr.dtype == np.float32
    np.testing.assert_array_equal(lr, deg(hr, np.random.default_rng(1)))
    desc = json.loads(json.dumps(deg.describe()))  # JSON-able
    assert desc["kind"] == spec["kind"]
    again = build_degradation(desc)
    assert again == deg
    np.testing.assert_array_equal(again(hr, np.random.default_rng(1)), lr)


def test_strict_specs():
    with pytest.raises(ConfigError, match="unknown degradation kind"):
        build_degradation({"kind": "motion"})
    with pytest.raises(ConfigError, match="unknown key.*mft"):
        build_degradation({"kind": "optical", "scale": 2, "mft": 0.2})
    with pytest.raises(ConfigError, match="kind"):
        build_degradation({"scale": 2})
    with pytest.raises(ConfigError, match="MTF"):
        build_degradation({"kind": "optical", "mtf": 1.5})
    with pytest.raises(ConfigError, match="steps"):
        build_degradation({"kind": "compose", "steps": []})


def test_compose_factors_multiply():
    deg = build_degradation({"kind": "compose", "steps": [{"kind": "slice_profile", "axis": 0, "factor": 2},
                                                          {"kind": "kspace", "scale": [1, 3]}]})
    assert isinstance(deg, Compose) and deg.factors(2) == (2, 3)
    assert deg(np.ones((1, 8, 9), np.float32), np.random.default_rng(0)).shape == (1, 4, 3)


def test_one_of_draws_by_weight_and_its_primary_is_the_noise_free_operator():
    from domainsr.degrade import noise_free_operator

    spec = {"kind": "one_of", "options": [{"kind": "gaussian_mean", "scale": 2, "sigma": 0.0},
                                          {"kind": "kspace", "scale": 2}], "weights": [1, 3]}
    deg = build_degradation(spec)
    hr = (np.random.default_rng(0).random((1, 8, 8, 8)) * 100).astype(np.float32)
    block = build_degradation(spec["options"][0])(hr, None)
    kspace = build_degradation(spec["options"][1])(hr, None)
    rng = np.random.default_rng(3)
    picks = [np.allclose(deg(hr, rng), kspace) for _ in range(400)]
    assert 0.68 < np.mean(picks) < 0.82  # 3 : 1 odds
    np.testing.assert_array_equal(deg(hr, None), block)
    np.testing.assert_allclose(noise_free_operator(spec, (2, 2, 2), 1)(hr), block)


def test_one_of_refuses_mismatched_scales_and_weights():
    with pytest.raises(ConfigError, match="share their scale"):
        build_degradation({"kind": "one_of", "options": [{"kind": "kspace", "scale": 2},
                                                         {"kind": "kspace", "scale": 4}]}).factors(3)
    with pytest.raises(ConfigError, match="weights"):
        build_degradation({"kind": "one_of", "options": [{"kind": "kspace", "scale": 2}], "weights": [1, 2]})
    with pytest.raises(ConfigError, match="options"):
        build_degradation({"kind": "one_of", "options": []})
