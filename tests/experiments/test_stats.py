"""Statistics of the experiments: Pearson r / p (against textbook values), mean ± std,
and the parameter-efficiency read-off."""

import math

import numpy as np
import pytest

from cdsr.experiments.stats import efficiency_ratio, mean_std, params_to_reach, pearson


def test_pearson_textbook_example():
    """x = 1..5, y = 2 4 5 4 5: r = 6 / sqrt(10 * 6) = sqrt(0.6), t = r sqrt(3 / (1 - r^2)) =
    sqrt(4.5) on 3 degrees of freedom, whose two-sided tail has the closed form
    1 - (2 / pi) (u / (1 + u^2) + atan u), u = t / sqrt(3) = sqrt(1.5): p = 0.12403."""
    res = pearson([1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 5.0, 4.0, 5.0])
    u = math.sqrt(1.5)
    assert res["n"] == 5
    assert res["r"] == pytest.approx(math.sqrt(0.6), abs=1e-12)
    assert res["p"] == pytest.approx(1 - 2 / math.pi * (u / (1 + u * u) + math.atan(u)), abs=1e-12)
    assert res["p"] == pytest.approx(0.12403, abs=1e-5)


def _with_correlation(n, r):
    """n points whose sample correlation is exactly r."""
    x = np.arange(n, dtype=np.float64)
    x = (x - x.mean()) / np.linalg.norm(x - x.mean())
    z = np.cos(1.7 * np.arange(n))
    z -= z.mean()
    z -= (z @ x) * x
    z /= np.linalg.norm(z)
    return x, r * x + math.sqrt(1 - r * r) * z


# Critical values of r (two-tailed) from the standard table: at r_crit the p-value is alpha.
@pytest.mark.parametrize("n,r_crit,alpha", [(5, 0.878, 0.05), (10, 0.632, 0.05), (20, 0.444, 0.05),
                                            (30, 0.361, 0.05), (10, 0.765, 0.01), (12, 0.708, 0.01)])
def test_pearson_p_at_table_critical_values(n, r_crit, alpha):
    x, y = _with_correlation(n, r_crit)
    res = pearson(list(x), list(y))
    assert res["r"] == pytest.approx(r_crit, abs=1e-12)
    assert res["p"] == pytest.approx(alpha, rel=0.02)  # the table's r is rounded to 3 digits
    # the sign of r does not change a two-sided p
    assert pearson(list(x), list(-y))["p"] == pytest.approx(res["p"], rel=1e-12)


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
