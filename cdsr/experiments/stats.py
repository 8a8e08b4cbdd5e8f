"""Small statistics the experiments report: mean ± std, Pearson r with its p-value, and the
parameter-efficiency ratio read off a parameters-vs-NDCG curve."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import scipy.stats


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def pearson(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    """{"r", "p", "n"}: Pearson r and its two-sided p-value (scipy.stats.pearsonr: the Student-t
    test with n - 2 degrees of freedom), NaN pairs dropped. Fewer than 3 points, or a constant
    series, give NaN (no correlation is defined)."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    n = len(pairs)
    if n < 3:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    if np.std(xs) == 0.0 or np.std(ys) == 0.0:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    res = scipy.stats.pearsonr(xs, ys)
    return {"r": float(res.statistic), "p": float(res.pvalue), "n": n}


def params_to_reach(curve: List[Tuple[float, float]], target: float) -> Tuple[Optional[float], str]:
    """Parameters a model family needs to reach `target` on a (params, score) curve, reading
    the curve piecewise-linearly in log(params). Returns (params, relation):
    "=" found inside the curve; ">" the curve never reaches it (params = the largest measured:
    a lower bound); "<" even the smallest model beats it (params = the smallest: an upper
    bound). The first crossing is used: the cheapest width that reaches the target."""
    pts = sorted((float(p), float(s)) for p, s in curve if not math.isnan(s))
    if not pts:
        return None, "?"
    if pts[0][1] >= target:
        return pts[0][0], "<"
    for (p0, s0), (p1, s1) in zip(pts, pts[1:]):
        if s0 < target <= s1:
            frac = (target - s0) / (s1 - s0)
            return float(math.exp(math.log(p0) + frac * (math.log(p1) - math.log(p0)))), "="
    return pts[-1][0], ">"


def efficiency_ratio(bare_curve: List[Tuple[float, float]], gca_params: float,
                     gca_score: float) -> Dict[str, object]:
    """Parameters the bare backbone needs to match the GCA model's score, over the GCA model's
    parameters (> 1: GCA is more parameter-efficient). relation as in `params_to_reach`."""
    needed, rel = params_to_reach(bare_curve, gca_score)
    if needed is None:
        return {"ratio": float("nan"), "relation": "?", "bare_params_needed": None}
    return {"ratio": needed / float(gca_params), "relation": rel, "bare_params_needed": needed}
