"""`cdsr experiment scaling`: parameter efficiency (paper claim 3).

The bare backbone at several widths (`--width-key`, default `hidden`) against the backbone +
GCA_early at the same widths: test NDCG@10 (mean of the two domains) against trainable
parameters, one curve each. The parameter-efficiency ratio of a GCA model is the number of
parameters the bare backbone needs to reach its NDCG@10 (read off the bare curve,
piecewise-linear in log-parameters) over the GCA model's own count: > 1 means GCA buys more
NDCG per parameter. Where the model offers `scale_to_match`, the parameter-matched bare
baseline (the backbone widened to the GCA model's count) is run too and compared head-on.
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Sequence

import numpy as np

from cdsr.config import ConfigError, valid_keys
from cdsr.experiments import plots
from cdsr.experiments.common import DATA_LABELS, DOMAINS, check_positions, fmt_ms, run_config, test_metric
from cdsr.experiments.runner import RunSpec
from cdsr.experiments.stats import efficiency_ratio, mean_std


def plan(models_: Sequence[str], datasets: Sequence[str], seeds: Sequence[int], *, widths: Sequence[int],
         width_key: str, matched: bool, preset_name: str, epochs: int, device: str, threads,
         sets: Sequence[str]) -> List[RunSpec]:
    if len(widths) < 2:
        raise ConfigError(f"--widths needs at least two widths to draw a curve, got {list(widths)}")
    specs = []
    for model in models_:
        early = check_positions(model, [0], "GCA_early")
        keys = valid_keys(model)
        if width_key not in keys:
            raise ConfigError(f"--width-key {width_key!r} is not a config key of {model}")
        has_match = "scale_to_match" in keys
        if matched and not has_match:
            raise ConfigError(f"--matched: model {model} has no scale_to_match config key")
        variants = [("bare", []), ("GCA_early", early)]
        for data in datasets:
            for w in widths:
                for variant, positions in variants + ([("bare_matched", [])] if matched else []):
                    for seed in seeds:
                        controlled = {"gca_positions": positions, width_key: int(w)}
                        if variant == "bare_matched":
                            controlled["scale_to_match"] = early
                        cfg = run_config(model, data, seed, preset_name=preset_name, epochs=epochs, device=device,
                                         threads=threads, sets=sets, controlled=controlled)
                        specs.append(RunSpec({"model": model, "data": data, "variant": variant, "width": int(w),
                                              "width_key": width_key, "seed": seed}, cfg))
    return specs


def _score(results: Dict[str, Any], domain: str) -> float:
    if domain == "mean":
        vals = [test_metric(results, d, "ndcg@10") for d in DOMAINS]
        vals = [v for v in vals if not math.isnan(v)]
        return float(np.mean(vals)) if vals else float("nan")
    return test_metric(results, domain, "ndcg@10")


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        lab = r["labels"]
        groups.setdefault((lab["model"], lab["data"], lab["variant"], lab["width"]), []).append(r["results"])
    points = []
    order = {"bare": 0, "GCA_early": 1, "bare_matched": 2}
    for (model, data, variant, width), res in sorted(groups.items(),
                                                     key=lambda kv: (kv[0][0], kv[0][1], order.get(kv[0][2], 9), kv[0][3])):
        points.append({"model": model, "data": data, "variant": variant, "width": width, "n": len(res),
                       "n_params": int(np.mean([x["n_params"] for x in res])),
                       "ndcg@10": {d: mean_std([_score(x, d) for x in res]) for d in (*DOMAINS, "mean")}})
    return points


def efficiency(points: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    out = []
    for model, data in sorted({(p["model"], p["data"]) for p in points}):
        mine = [p for p in points if (p["model"], p["data"]) == (model, data)]
        bare = [p for p in mine if p["variant"] == "bare"]
        for g in (p for p in mine if p["variant"] == "GCA_early"):
            row = {"model": model, "data": data, "width": g["width"], "gca_params": g["n_params"]}
            for dom in (*DOMAINS, "mean"):
                curve = [(b["n_params"], b["ndcg@10"][dom]["mean"]) for b in bare]
                row[dom] = {"gca_ndcg10": g["ndcg@10"][dom]["mean"],
                            **efficiency_ratio(curve, g["n_params"], g["ndcg@10"][dom]["mean"])}
            match = next((p for p in mine if p["variant"] == "bare_matched" and p["width"] == g["width"]), None)
            if match:
                # A matched baseline is only meaningful if its count is close to the GCA model's.
                row["matched"] = {"params": match["n_params"],
                                  "params_gap": (match["n_params"] - g["n_params"]) / g["n_params"],
                                  "ndcg10_mean": match["ndcg@10"]["mean"]["mean"],
                                  "delta_gca_minus_matched": g["ndcg@10"]["mean"]["mean"] - match["ndcg@10"]["mean"]["mean"]}
            out.append(row)
    return out


def _ratio_text(e: Dict[str, Any]) -> str:
    if e["relation"] == "?" or math.isnan(e["ratio"]):
        return "-"
    return {"=": "", ">": "> ", "<": "< "}[e["relation"]] + f"{e['ratio']:.2f}x"


def markdown(points: List[Dict[str, Any]], eff: List[Dict[str, Any]]) -> str:
    lines = ["## NDCG@10 against trainable parameters (test set, mean ± std over seeds)", "",
             "| backbone | data | variant | width | params | NDCG@10 A | NDCG@10 B | NDCG@10 mean(A,B) |",
             "|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(f"| {p['model']} | {DATA_LABELS.get(p['data'], p['data'])} | {p['variant']} | {p['width']} | "
                     f"{p['n_params']:,} | {fmt_ms(p['ndcg@10']['A'])} | {fmt_ms(p['ndcg@10']['B'])} | "
                     f"{fmt_ms(p['ndcg@10']['mean'])} |")
    lines += ["", "## Parameter-efficiency ratio", "",
              "Parameters the bare backbone needs to reach the GCA_early model's NDCG@10 (read off the bare curve, "
              "linear in log-parameters), over the GCA_early model's parameters. `>`: the bare curve never "
              "reaches it (a lower bound, from the widest bare model); `<`: even the narrowest bare model does "
              "(an upper bound). The paper reports about 1.4x.", "",
              "| backbone | data | width | GCA params | ratio (mean of A, B) | ratio A | ratio B | GCA - matched bare NDCG@10 |",
              "|---|---|---|---|---|---|---|---|"]
    for e in eff:
        match = "-"
        if "matched" in e:
            m = e["matched"]
            match = f"{m['delta_gca_minus_matched']:+.4f} ({m['params']:,} params"
            match += f", {m['params_gap']:+.1%} vs GCA: NOT matched)" if abs(m["params_gap"]) > 0.02 else ")"
        lines.append(f"| {e['model']} | {DATA_LABELS.get(e['data'], e['data'])} | {e['width']} | {e['gca_params']:,} | "
                     f"{_ratio_text(e['mean'])} | {_ratio_text(e['A'])} | {_ratio_text(e['B'])} | {match} |")
    return "\n".join(lines) + "\n"


def analyse(rows: List[Dict[str, Any]], out_dir) -> Dict[str, Any]:
    points = aggregate(rows)
    eff = efficiency(points)
    cases = []
    for model, data in sorted({(p["model"], p["data"]) for p in points}):
        curves: Dict[str, list] = {}
        for p in points:
            if (p["model"], p["data"]) == (model, data):
                s = p["ndcg@10"]["mean"]
                curves.setdefault(p["variant"], []).append((p["n_params"], s["mean"], s["std"]))
        cases.append({"model": model, "data": data, "curves": curves})
    figures = plots.try_plot(plots.scaling_curves, cases, out_dir / "scaling.png") if cases else []
    return {"summary": {"points": points, "efficiency": eff, "paper_ratio": 1.4},
            "markdown": markdown(points, eff), "figures": figures}
