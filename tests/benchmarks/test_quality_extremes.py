"""benchmarks/quality.py's invented-extremes pooling and data-consistency option (fast, synthetic)."""
from __future__ import annotations

import numpy as np
import pytest

from domainsr.train.datasets import EvalPair
from tests.benchmarks.test_quality_smoke import _load_quality


def test_extremes_pool_over_pairs_by_pixels():
    q = _load_quality()
    lr = np.zeros((1, 2, 2), np.float32)
    hr = np.zeros((1, 4, 4), np.float32)
    sr = hr.copy()
    sr[0, 0, 0] = 5.0  # range [0, 0]: leaves; error 5 > 3 x interpolation's 1: invented
    pairs = [EvalPair(hr, lr, np.ones((4, 4), bool), None), EvalPair(hr, lr, np.ones((4, 4), bool), None)]
    case = q.Case(pairs, (2, 2), lambda x: x)
    masks = [np.ones((4, 4), bool), np.zeros((4, 4), bool)]
    masks[1][:2, :2] = True  # 16 + 4 scored pixels, one invented in the first pair
    e = q.extremes([sr, sr], [hr + 1.0, hr + 1.0], case, masks)
    assert e["invented"] == pytest.approx(2 / 20) and e["output_leaves"] == pytest.approx(2 / 20)
    assert e["truth_leaves"] == 0.0


def test_consistency_settings_parse():
    q = _load_quality()
    assert q.parse_consistency(None) is None and q.parse_consistency("") is None
    s = q.parse_consistency("iterations=2, upsampler=nearest,clamp_margin=none")
    assert (s.iterations, s.upsampler, s.clamp_margin) == (2, "nearest", None)
    with pytest.raises(ValueError):
        q.parse_consistency("iterations=0")
