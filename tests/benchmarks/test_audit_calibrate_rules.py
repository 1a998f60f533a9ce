"""The fitting rules of benchmarks/audit_calibrate.py: what counts as a false alarm, the
hallucination floor above interpolation, and the group-robust conformal quantile."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from domainsr.audit.calibration import KindThresholds, conformal_quantile
from tests.benchmarks.loader import load_benchmark

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def cal():
    return load_benchmark("audit_calibrate", "audit_calibrate_benchmark")


@pytest.mark.parametrize("kind, method, contradicted, expected", [
    ("hallucination", "lanczos", False, True),  # interpolation never invents: always false
    ("inconsistency", "linear", False, True),
    ("omission", "linear", False, False),  # linear does lose the detail cubic keeps: judged by the truth
    ("omission", "linear", True, True),
    ("hallucination", "ibp", False, False),  # back-projection's ringing, where the truth confirms it
    ("hallucination", "ibp", True, True),
    ("inconsistency", "ibp", False, True),  # LR-consistent by construction
    ("inconsistency", "sentinel2-rgbn-x2", False, False),
    ("uncertain", "sentinel2-rgbn-x2", True, True),
])
def test_false_alarm_rule(cal, kind, method, contradicted, expected):
    assert cal.false_alarm(kind, method, contradicted) is expected


def test_hallucination_review_sits_above_every_interpolation_score(cal):
    results = [{"method": "lanczos", "regions": [{"kind": "hallucination", "score": 1.9}]},
               {"method": "ibp", "regions": [{"kind": "hallucination", "score": 5.0}]},
               {"method": "cubic", "regions": [{"kind": "omission", "score": 9.0}]}]
    th = cal.never_on_interpolation(KindThresholds(review=1.5, fail=3.0), results)
    assert th.review == pytest.approx(1.9 * 1.05) and th.fail == pytest.approx(2 * 1.9 * 1.05)
    same = KindThresholds(review=2.5, fail=6.0)
    assert cal.never_on_interpolation(same, results) == same


def test_group_robust_quantile_is_the_worst_group(cal):
    rng = np.random.default_rng(0)
    terms = lambda n: np.concatenate([np.ones((1, n)), np.zeros((3, n))])  # u = 1 everywhere
    easy, hard = np.abs(rng.normal(size=4000)), 3.0 * np.abs(rng.normal(size=400))
    groups = [(easy, terms(easy.size)), (hard, terms(hard.size))]
    q = cal.group_robust_quantile(groups, (1.0, 1.0, 1.0))
    pooled = conformal_quantile(np.concatenate([easy, hard]), cal.ALPHA)
    assert q == pytest.approx(conformal_quantile(hard, cal.ALPHA)) and q > pooled
    assert np.mean(hard <= q) >= 1 - cal.ALPHA  # the hard group is covered too
