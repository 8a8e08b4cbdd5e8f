"""Small statistics the experiments report: mean ± std, Pearson r with its p-value, and the
parameter-efficiency ratio read off a parameters-vs-NDCG curve."""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np


def mean_std(values: Sequence[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), NaNs dropped."""
    v = np.asarray([x for x in values if x is not None and not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = float(v.std(ddof=1)) if v.size > 1 else 0.0
    return {"mean": float(v.mean()), "std": std, "n": int(v.size)}


def _student_t_sf2(t: float, dof: int) -> float:
    """Two-sided tail probability P(|T| >= |t|) of Student's t with `dof` degrees of freedom,
    through the regularised incomplete beta function I_x(dof/2, 1/2), x = dof / (dof + t^2)
    (continued fraction, Numerical-Recipes style Lentz iteration)."""
    x = dof / (dof + t * t)
    a, b = dof / 2.0, 0.5
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x)

    def cont_frac(a: float, b: float, x: float) -> float:
        tiny = 1e-300
        c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
        d = 1.0 / (d if abs(d) > tiny else tiny)
        h = d
        for m in range(1, 400):
            m2 = 2 * m
            num = m * (b - m) * x / ((a + m2 - 1) * (a + m2))
            d = 1.0 + num * d
            c = 1.0 + num / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            h *= d * c
            num = -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1))
            d = 1.0 + num * d
            c = 1.0 + num / c
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = c if abs(c) > tiny else tiny
            delta = d * c
            h *= delta
            if abs(delta - 1.0) < 1e-14:
                break
        return h

    # The continued fraction converges fast for x < (a + 1) / (a + b + 2); else use symmetry.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(ln_front) * cont_frac(a, b, x) / a
    return 1.0 - math.exp(ln_front) * cont_frac(b, a, 1.0 - x) / b


def pearson_fallback(x: Sequence[float], y: Sequence[float]) -> Tuple[float, float]:
    """Pearson r and its two-sided p-value (t = r sqrt((n-2)/(1-r^2)), n-2 dof) without scipy."""
    xa, ya = np.asarray(x, np.float64), np.asarray(y, np.float64)
    n = xa.size
    xc, yc = xa - xa.mean(), ya - ya.mean()
    denom = math.sqrt(float((xc * xc).sum()) * float((yc * yc).sum()))
    if denom == 0.0:
        return float("nan"), float("nan")
    r = max(-1.0, min(1.0, float((xc * yc).sum()) / denom))
    if abs(r) == 1.0:
        return r, 0.0
    t = r * math.sqrt((n - 2) / (1.0 - r * r))
    return r, _student_t_sf2(t, n - 2)


def pearson(x: Sequence[float], y: Sequence[float]) -> Dict[str, float]:
    """{"r", "p", "n"}: scipy.stats.pearsonr when scipy is there, else `pearson_fallback`.
    Fewer than 3 points, or a constant series, give NaN (no correlation is defined)."""
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    pairs = [(a, b) for a, b in zip(x, y) if not (math.isnan(a) or math.isnan(b))]
    n = len(pairs)
    if n < 3:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    xs, ys = [a for a, _ in pairs], [b for _, b in pairs]
    if np.std(xs) == 0.0 or np.std(ys) == 0.0:
        return {"r": float("nan"), "p": float("nan"), "n": n}
    try:
        from scipy.stats import pearsonr
    except ImportError:
        r, p = pearson_fallback(xs, ys)
    else:
        res = pearsonr(xs, ys)
        r, p = float(res[0]), float(res[1])
    return {"r": r, "p": p, "n": n}


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
