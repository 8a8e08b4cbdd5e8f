"""Statistics of the experiments: Pearson r / p (own implementation vs scipy), mean ± std,
and the parameter-efficiency read-off."""

import math

import numpy as np
import pytest

from cdsr.experiments.stats import efficiency_ratio, mean_std, params_to_reach, pearson, pearson_fallback


@pytest.mark.parametrize("n,slope", [(4, 0.3), (7, -1.0), (24, 0.05), (60, -0.2), (200, 0.0)])
def test_pearson_fallback_matches_scipy(n, slope):
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(n)
    x = rng.normal(size=n)
    y = slope * x + rng.normal(size=n)
    r, p = pearson_fallback(x, y)
    ref = stats.pearsonr(x, y)
    assert r == pytest.approx(float(ref[0]), abs=1e-12)
    assert p == pytest.approx(float(ref[1]), rel=1e-7, abs=1e-12)


def test_pearson_edge_cases():
    assert math.isnan(pearson([1.0, 2.0], [3.0, 4.0])["r"])  # fewer than 3 points
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0])["r"])  # constant series
    perfect = pearson([1.0, 2.0, 3.0, 4.0], [8.0, 6.0, 4.0, 2.0])
    assert perfect["r"] == pytest.approx(-1.0) and perfect["p"] < 1e-6 and perfect["n"] == 4
    # NaN pairs are dropped, not propagated.
    assert pearson([1.0, float("nan"), 2.0, 3.0], [1.0, 5.0, 2.0, 3.5])["n"] == 3
    with pytest.raises(ValueError, match="same length"):
        pearson([1.0, 2.0, 3.0], [1.0, 2.0])


def test_mean_std_is_sample_std():
    s = mean_std([1.0, 2.0, 3.0, float("nan")])
    assert s == {"mean": 2.0, "std": 1.0, "n": 3}
    assert mean_std([0.5]) == {"mean": 0.5, "std": 0.0, "n": 1}
    assert mean_std([])["n"] == 0


def test_params_to_reach_reads_log_linear_curve():
    curve = [(1000, 0.10), (4000, 0.20), (16000, 0.30)]
    # Halfway between 1000 and 4000 in score is the geometric mean in parameters.
    p, rel = params_to_reach(curve, 0.15)
    assert rel == "=" and p == pytest.approx(2000.0)
    assert params_to_reach(curve, 0.30) == (pytest.approx(16000.0), "=")
    assert params_to_reach(curve, 0.35) == (16000.0, ">")
    assert params_to_reach(curve, 0.05) == (1000.0, "<")
    # Non-monotone curve: the first (cheapest) crossing counts.
    p, rel = params_to_reach([(1000, 0.1), (2000, 0.3), (4000, 0.2), (8000, 0.4)], 0.25)
    assert rel == "=" and 1000 < p < 2000


def test_efficiency_ratio():
    e = efficiency_ratio([(1000, 0.10), (4000, 0.20)], gca_params=1000, gca_score=0.15)
    assert e["relation"] == "=" and e["ratio"] == pytest.approx(2.0)
    e = efficiency_ratio([(1000, 0.10), (4000, 0.20)], gca_params=2000, gca_score=0.5)
    assert e["relation"] == ">" and e["ratio"] == pytest.approx(2.0)
