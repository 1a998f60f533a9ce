"""The calibration: one monotone risk scale, the committed fit loads and states its corpus and
rates, the fit gives the stated false-alarm rate on synthetic honest scores, and the conformal
quantile has its finite-sample coverage."""
from __future__ import annotations

import json

import numpy as np
import pytest

from domainsr.audit.calibration import (
    CALIBRATION_FILE,
    KINDS,
    NEUTRAL,
    Calibration,
    DomainCalibration,
    KindThresholds,
    block_sample,
    combine_scale,
    conformal_quantile,
    conformal_report,
    fit_thresholds,
    gaussian_at,
    load_calibration,
    local_scale,
    rate_stats,
    read_calibration,
    scale_terms,
)


@pytest.fixture(scope="module")
def fitted() -> Calibration:
    assert CALIBRATION_FILE.exists(), "run benchmarks/audit_calibrate.py to fit domainsr/audit/calibration.json"
    return read_calibration(CALIBRATION_FILE)


def test_risk_is_monotone_with_1_at_review_and_2_at_fail(fitted):
    scores = np.linspace(0.0, 50.0, 2001)
    for cal in (fitted, NEUTRAL):
        for domain in (*cal.domains, "unknown-domain"):
            for kind in KINDS:
                th = cal.thresholds(kind, domain)
                r = cal.risk_map(kind, scores, domain)
                assert np.all(np.diff(r) >= 0) and r[0] == 0.0
                assert cal.risk(kind, th.review, domain) == pytest.approx(1.0)
                if th.fail is None:
                    assert float(r.max()) < 2.0 and cal.risk(kind, 1e9, domain) < 2.0
                else:
                    assert cal.risk(kind, th.fail, domain) == pytest.approx(2.0)
                    assert cal.risk(kind, 2 * th.fail, domain) > 2.0


def test_the_committed_fit_loads_validates_and_states_its_rates(fitted):
    assert load_calibration() == fitted
    assert {"optical", "mri", "ct", "default"} <= set(fitted.domains)
    assert fitted.target_review_per_m and fitted.created and fitted.corpus
    for name, d in fitted.domains.items():
        assert set(d.kinds) == set(KINDS)
        assert d.kinds["omission"].fail is None and d.kinds["uncertain"].fail is None
        if name == "default":
            continue
        assert d.calibration_items and d.holdout_items
        assert not set(d.calibration_items) & set(d.holdout_items)  # whole scenes / subjects apart
        assert d.conformal is not None and d.conformal.q > 0 and len(d.conformal.weights) == 3
        assert 0.0 <= d.conformal.coverage_holdout <= 1.0
        for kind in ("hallucination", "inconsistency"):
            cal = d.rates[kind].calibration
            assert cal.fail_regions == 0  # honest fails are zero on the data it was fitted on
            assert cal.review_per_m <= fitted.target_review_per_m + 1.0 / cal.area_m  # k = floor(rate * area)
    desc = fitted.describe("optical")
    assert desc["domain"] == "optical" and set(desc["kinds"]) == set(KINDS)
    assert desc["conformal"]["coverage_holdout"] is not None
    json.dumps(desc)  # goes into the JSON report as it is


def test_bad_calibration_files_are_named(tmp_path):
    bad = tmp_path / "calibration.json"
    bad.write_text(json.dumps({"domains": {"optical": {"kinds": {}}}}))
    with pytest.raises(ValueError, match="calibration.json"):
        read_calibration(bad)
    with pytest.raises(ValueError):
        KindThresholds(review=2.0, fail=1.0)
    with pytest.raises(ValueError, match="unknown kind"):
        Calibration(domains={"default": NEUTRAL.domains["default"],
                             "ct": DomainCalibration(kinds={"lr-inconsistency": KindThresholds(review=1.0)})})


def test_the_fit_holds_the_stated_rate_on_fresh_honest_data():
    """Honest false alarms as a Poisson process (5 regions per M, exponential scores): the fitted
    review threshold gives about the stated 0.1 per M on 10x more fresh data, and no fresh fail."""
    rng = np.random.default_rng(0)
    rate, lam = 0.1, 5.0

    def corpus(area):
        return rng.exponential(1.0, rng.poisson(lam * area))

    area_fit, area_new = 400.0, 4000.0
    th = fit_thresholds(corpus(area_fit), area_fit, rate=rate, at_most_review=False)
    assert th.review == pytest.approx(np.log(lam / rate), rel=0.15)  # the true (1 - rate/lam) quantile
    fresh = corpus(area_new)
    cal = Calibration(domains={"default": DomainCalibration(kinds={k: th for k in KINDS})})
    risks = cal.risk_map("hallucination", fresh, "x")
    stats = rate_stats(fresh, risks, area_new, items=1)
    assert 0.03 <= stats.review_per_m <= 0.12
    assert stats.fail_per_m <= 0.01  # fail = max(1.5 x the largest honest score, 2 x review)
    # no honest region at all: the fallback (the pooled fit), never a threshold of zero
    assert fit_thresholds([], 3.0, rate=rate, at_most_review=True, fallback=th).review == th.review


def test_conformal_quantile_has_finite_sample_coverage():
    assert conformal_quantile(np.arange(1, 20), 0.1) == 18  # ceil(0.9 * 20) = 18th of 19
    assert conformal_quantile(np.arange(5), 0.1) == np.inf  # too few scores for alpha
    rng = np.random.default_rng(1)
    cover = [np.mean(rng.standard_normal(2000) <= conformal_quantile(rng.standard_normal(200), 0.1))
             for _ in range(200)]
    assert np.mean(cover) >= 0.9 - 0.005


def test_block_sampling_takes_one_pixel_per_block():
    idx = block_sample((10, 13), 4, np.random.default_rng(0))
    assert len(idx) == 2 and idx[0].size == 2 * 3
    assert set((idx[0] // 4).tolist()) == {0, 1} and np.all(idx[1] < 12)


def test_local_scale_is_the_noise_where_nothing_varies_and_grows_with_the_additions():
    sr = np.full((2, 16, 16), 5.0, np.float32)
    u = local_scale(sr, sr.copy(), np.zeros_like(sr), [2.0, 3.0])
    assert u.shape == sr.shape and np.allclose(u[0], 2.0) and np.allclose(u[1], 3.0)
    added = sr.copy()
    added[:, 6:10, 6:10] += 40.0
    u2 = local_scale(added, sr, np.zeros_like(sr), [2.0, 3.0])
    assert float(u2[0, 8, 8]) > 10.0 and float(u2[0, 0, 0]) == pytest.approx(2.0, abs=1e-3)
    only_noise = local_scale(added, sr, np.ones_like(sr), [2.0, 3.0], weights=[0.0, 0.0, 0.0])
    assert np.allclose(only_noise[0], 2.0) and np.allclose(only_noise[1], 3.0)
    heavy = local_scale(added, sr, np.zeros_like(sr), [2.0, 3.0], weights=[4.0, 1.0, 1.0])
    assert np.all(heavy >= u2 - 1e-4) and float(heavy[0, 8, 8]) > float(u2[0, 8, 8])


@pytest.mark.parametrize("shape,sigma", [((37, 50), (1.0, 2.0)), ((9, 11, 13), (1.0, 1.5, 3.0)), ((3, 40), (3.0, 1.0))])
def test_gaussian_at_is_scipys_filter_on_the_grid_edges_included(shape, sigma):
    from scipy import ndimage as ndi

    v = np.random.default_rng(1).normal(100.0, 30.0, shape).astype(np.float32)
    at = [np.arange(n % 3, n, 4) for n in shape]  # first, interior and last-ish points
    at[0] = np.unique(np.r_[0, at[0], shape[0] - 1])
    full = ndi.gaussian_filter(v, sigma, mode="reflect")[np.ix_(*at)]
    got = gaussian_at(v, sigma, at)
    assert got.dtype == np.float32 and got.shape == full.shape
    assert np.allclose(got, full, rtol=2e-7, atol=0)  # the float64 sums in another order, then float32


def test_local_scale_on_a_grid_is_the_full_map_there_and_a_zero_weight_term_is_not_needed():
    rng = np.random.default_rng(2)
    base = rng.normal(500.0, 80.0, (2, 40, 30)).astype(np.float32)
    sr = base + rng.normal(0.0, 20.0, base.shape).astype(np.float32)
    res = np.repeat(np.repeat(rng.normal(0.0, 5.0, (2, 20, 15)), 2, 1), 2, 2).astype(np.float32)
    at = [np.arange(1, 40, 5), np.arange(0, 30, 7)]
    for w in ([4.0, 16.0, 0.0], [1.0, 1.0, 1.0], [0.0, 2.0, 0.5]):
        full = local_scale(sr, base, res, [3.0, 4.0], (1.0, 1.0), w)
        assert np.array_equal(full, combine_scale(scale_terms(sr, base, res, [3.0, 4.0], (1.0, 1.0)), w))
        grid = local_scale(sr, base, res, [3.0, 4.0], (1.0, 1.0), w, at=at)
        assert np.allclose(grid, full[(slice(None), *np.ix_(*at))], rtol=1e-6, atol=0), w


def test_conformal_report_states_the_bound_in_data_units(fitted):
    sr = np.full((1, 8, 8), 10.0, np.float32)
    rep = conformal_report(fitted, "ct", sr, sr, np.zeros_like(sr), [4.0], np.ones((8, 8), bool), ["HU"])
    cb = fitted.conformal("ct")
    assert rep.alpha == cb.alpha and rep.median_bound == [pytest.approx(cb.q * 4.0, rel=1e-3)]
    assert conformal_report(NEUTRAL, "ct", sr, sr, np.zeros_like(sr), [4.0], np.ones((8, 8), bool), ["HU"]) is None
