"""`cdsr experiment alignment`: the orthogonal-alignment finding (paper claim 2).

A sweep over GCA positions x hidden size x heads x gate activation x LayerNorm x seeds (and,
beyond the paper, the alignment regulariser `align_reg`). From every finished run it reads
the test-set alignment probe of each GCA module (`|cos(X, X')|`: the module's query input vs
its cross-attention output; `|cos(X, Y)|`: query input vs key/value input) and reports

- the Pearson correlation of the mean `|cos(X, X')|` with test NDCG@10, per backbone and
  domain (a module's domain is its query's domain: `gca<i>_ab` is A attending to B);
- the distribution of `|cos(X, X')|` next to `|cos(X, Y)|` per dataset;
- for a few runs, both over the training epochs (validation set), to see whether the
  alignment falls while NDCG rises;
- with several `align_reg` values, what pushing toward (L > 0) or away from (L < 0)
  orthogonality does to NDCG@10.
"""

from __future__ import annotations

import itertools
import math
import random
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from cdsr.config import ConfigError, valid_keys
from cdsr.experiments import plots
from cdsr.experiments.common import (DATA_LABELS, DOMAINS, check_positions, fmt_ms, gca_slots, module_domain,
                                     run_config, test_metric)
from cdsr.experiments.runner import RunSpec
from cdsr.experiments.stats import mean_std, pearson


def grid(model: str, positions: Optional[Sequence[Sequence[int]]], hidden: Sequence[int], heads: Sequence[int],
         activations: Sequence[str], layer_norms: Sequence[bool], seeds: Sequence[int],
         align_regs: Sequence[float]) -> List[Dict[str, Any]]:
    """Every valid combination (heads must divide hidden), in a fixed order."""
    pos_list = [check_positions(model, p, "--positions") for p in positions] if positions else \
        [[s] for s in gca_slots(model)]
    if not pos_list:
        raise ConfigError(f"model {model} offers no GCA position: nothing to sweep")
    if any(not p for p in pos_list):
        raise ConfigError("--positions: every entry needs at least one GCA position (e.g. 0 or 0,1)")
    out = []
    for pos, h, nh, act, ln, reg, seed in itertools.product(pos_list, hidden, heads, activations, layer_norms,
                                                            align_regs, seeds):
        if h % nh:
            continue
        out.append({"positions": pos, "hidden": int(h), "heads": int(nh), "activation": act,
                    "layer_norm": bool(ln), "align_reg": float(reg), "seed": int(seed)})
    return out


def plan(models_: Sequence[str], datasets: Sequence[str], *, positions, hidden, heads, activations, layer_norms,
         seeds, align_regs, sample: int, track: int, preset_name: str, epochs: int, device: str, threads,
         sets: Sequence[str]) -> List[RunSpec]:
    specs = []
    for model in models_:
        # A model with its own align_reg key applies the term itself; otherwise the
        # experiment's trainer adds it through hooks on the GCA modules (align_reg.py).
        native_reg = "align_reg" in valid_keys(model)
        for data in datasets:
            combos = grid(model, positions, hidden, heads, activations, layer_norms, seeds, align_regs)
            if not combos:
                raise ConfigError(f"no valid sweep point for {model}: every --heads value must divide a --hidden value")
            if sample and sample < len(combos):
                # A fixed shuffle, then the first `sample`: a larger --sample extends the same
                # list, so the runs already done stay part of the sweep.
                order = list(range(len(combos)))
                random.Random(f"alignment-{model}-{data}").shuffle(order)
                combos = [combos[i] for i in sorted(order[:sample])]
            for i, c in enumerate(combos):
                controlled = {"gca_positions": c["positions"], "hidden": c["hidden"], "gca_heads": c["heads"],
                              "gca_activation": c["activation"], "gca_layer_norm": c["layer_norm"]}
                if native_reg:
                    controlled["align_reg"] = c["align_reg"]
                cfg = run_config(model, data, c["seed"], preset_name=preset_name, epochs=epochs, device=device,
                                 threads=threads, sets=sets, controlled=controlled)
                specs.append(RunSpec({"model": model, "data": data, **c}, cfg, track_valid=i < track,
                                     align_reg=0.0 if native_reg else c["align_reg"]))
    return specs


def _domain_means(alignment: Dict[str, Dict[str, float]], key: str) -> Dict[str, float]:
    out = {}
    for d in DOMAINS:
        vals = [a[key] for name, a in alignment.items() if module_domain(name) == d]
        if vals:
            out[d] = float(np.mean(vals))
    return out


def correlations(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    panels, per_data = [], []
    models_ = sorted({r["labels"]["model"] for r in rows})
    datas = sorted({r["labels"]["data"] for r in rows})
    for model in models_:
        for dom in DOMAINS:
            pts = []
            for r in rows:
                if r["labels"]["model"] != model:
                    continue
                cos = _domain_means(r["results"].get("alignment") or {}, "cos_x_xprime")
                if dom in cos:
                    pts.append((cos[dom], test_metric(r["results"], dom, "ndcg@10"), r["labels"]["data"]))
            stat = pearson([p[0] for p in pts], [p[1] for p in pts]) if pts else {"r": float("nan"), "p": float("nan"), "n": 0}
            panels.append({"model": model, "domain": dom, "points": pts, **stat})
            for data in datas:
                sub = [p for p in pts if p[2] == data]
                if sub:
                    per_data.append({"model": model, "data": data, "domain": dom,
                                     **pearson([p[0] for p in sub], [p[1] for p in sub])})
    return {"panels": panels, "per_data": per_data}


def distributions(rows: List[Dict[str, Any]]) -> Dict[str, Dict[str, List[float]]]:
    per_data: Dict[str, Dict[str, List[float]]] = {}
    for r in rows:
        d = per_data.setdefault(r["labels"]["data"], {"x_xprime": [], "x_y": []})
        for a in (r["results"].get("alignment") or {}).values():
            d["x_xprime"].append(a["cos_x_xprime"])
            d["x_y"].append(a["cos_x_y"])
    return per_data


def _quartiles(v: List[float]) -> Dict[str, float]:
    if not v:
        return {"q1": float("nan"), "median": float("nan"), "q3": float("nan"), "n": 0}
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    return {"q1": float(q1), "median": float(med), "q3": float(q3), "n": len(v)}


def epoch_tracks(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per tracked run: per-epoch validation |cos(X, X')| and NDCG@10 per domain, and their
    Pearson r over the epochs (negative: alignment falls as NDCG rises)."""
    out = []
    for r in rows:
        hist = [h for h in r["results"].get("history", []) if "alignment" in h and "valid" in h]
        if len(hist) < 2:
            continue
        lab = r["labels"]
        c = {"id": r["id"], "epochs": [h["epoch"] for h in hist], "cos": {}, "ndcg": {}, "r": {},
             "title": f"{lab['model']}/{DATA_LABELS.get(lab['data'], lab['data'])} {plots.positions_text(lab['positions'])} "
                      f"h{lab['hidden']} heads{lab['heads']} {lab['activation']} LN={lab['layer_norm']} s{lab['seed']}"}
        for dom in DOMAINS:
            cos = [_domain_means(h["alignment"], "cos_x_xprime").get(dom, float("nan")) for h in hist]
            ndcg = [float(h["valid"][dom]["ndcg@10"]) for h in hist]
            if all(math.isnan(x) for x in cos):
                continue
            c["cos"][dom], c["ndcg"][dom] = cos, ndcg
            c["r"][dom] = pearson(cos, ndcg)
        out.append(c)
    return out


def align_reg_effect(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        lab = r["labels"]
        groups.setdefault((lab["model"], lab["data"], lab.get("align_reg", 0.0)), []).append(r["results"])
    if len({k[2] for k in groups}) < 2:
        return []
    out = []
    for (model, data, reg), res in sorted(groups.items()):
        cos = [float(np.mean([a["cos_x_xprime"] for a in x["alignment"].values()])) for x in res if x.get("alignment")]
        out.append({"model": model, "data": data, "align_reg": reg, "n": len(res),
                    "ndcg": {d: mean_std([test_metric(x, d, "ndcg@10") for x in res]) for d in DOMAINS},
                    "cos": mean_std(cos)})
    return out


def _fmt_r(s: Dict[str, float]) -> str:
    if math.isnan(s["r"]):
        return f"undefined (n = {s['n']})"
    return f"{s['r']:+.3f} (p = {s['p']:.3g}, n = {s['n']})"


PAPER_R = {("llm4cdsr", "B"): -0.452, ("abxi", "A"): -0.328, ("abxi", "B"): -0.340, ("cdsrnp", "B"): -0.296}


def markdown(corr, dists, tracks, reg_rows) -> str:
    lines = ["## |cos(X, X')| vs test NDCG@10: Pearson correlation", "",
             "One point per run and domain: the mean `|cos(X, X')|` over that run's GCA modules whose query is "
             "the domain, against the run's test NDCG@10 on the domain. `paper r` is the paper's reported value "
             "(its own datasets).", "",
             "| backbone | domain | r (p, n), all datasets | paper r |", "|---|---|---|---|"]
    for p in corr["panels"]:
        paper = PAPER_R.get((p["model"], p["domain"]))
        lines.append(f"| {p['model']} | {p['domain']} | {_fmt_r(p)} | {paper if paper is not None else '-'} |")
    if corr["per_data"]:
        lines += ["", "Per dataset:", "", "| backbone | data | domain | r (p, n) |", "|---|---|---|---|"]
        for p in corr["per_data"]:
            lines.append(f"| {p['model']} | {DATA_LABELS.get(p['data'], p['data'])} | {p['domain']} | {_fmt_r(p)} |")
    lines += ["", "## |cos(X, X')| next to |cos(X, Y)| (one value per GCA module per run)", "",
              "| data | \\|cos(X,X')\\| median [q1, q3] | \\|cos(X,Y)\\| median [q1, q3] | modules |", "|---|---|---|---|"]
    for data, d in sorted(dists.items()):
        a, b = _quartiles(d["x_xprime"]), _quartiles(d["x_y"])
        lines.append(f"| {DATA_LABELS.get(data, data)} | {a['median']:.3f} [{a['q1']:.3f}, {a['q3']:.3f}] | "
                     f"{b['median']:.3f} [{b['q1']:.3f}, {b['q3']:.3f}] | {a['n']} |")
    lines += ["", "## Over training epochs (validation set)", ""]
    if tracks:
        lines += ["Pearson r between the per-epoch `|cos(X, X')|` and the per-epoch validation NDCG@10 of each "
                  "tracked run (negative: the alignment falls as NDCG rises).", "",
                  "| run | domain | epochs | \\|cos(X,X')\\| first -> last | NDCG@10 first -> last | r over epochs |",
                  "|---|---|---|---|---|---|"]
        for c in tracks:
            for dom in c["cos"]:
                cs, ns = c["cos"][dom], c["ndcg"][dom]
                lines.append(f"| {c['title']} | {dom} | {len(cs)} | {cs[0]:.3f} -> {cs[-1]:.3f} | "
                             f"{ns[0]:.4f} -> {ns[-1]:.4f} | {_fmt_r(c['r'][dom])} |")
        rs = [c["r"][d]["r"] for c in tracks for d in c["r"] if not math.isnan(c["r"][d]["r"])]
        lines += ["", f"{sum(r < 0 for r in rs)} of {len(rs)} tracked (run, domain) curves have a negative "
                      f"correlation between |cos(X, X')| and validation NDCG@10 over epochs"
                      + (" (r needs at least 3 epochs)." if not rs else ".")]
    else:
        lines.append("No tracked run has two or more epochs with the validation probe.")
    if reg_rows:
        lines += ["", "## Alignment regulariser (loss + L * |cos(X, X')|)", "",
                  "| backbone | data | L | runs | NDCG@10 A | NDCG@10 B | \\|cos(X,X')\\| |", "|---|---|---|---|---|---|---|"]
        for r in reg_rows:
            lines.append(f"| {r['model']} | {DATA_LABELS.get(r['data'], r['data'])} | {r['align_reg']:+g} | {r['n']} | "
                         f"{fmt_ms(r['ndcg']['A'])} | {fmt_ms(r['ndcg']['B'])} | {fmt_ms(r['cos'], 3)} |")
    return "\n".join(lines) + "\n"


def analyse(rows: List[Dict[str, Any]], out_dir) -> Dict[str, Any]:
    corr = correlations(rows)
    dists = distributions(rows)
    tracks = epoch_tracks(rows)
    reg_rows = align_reg_effect(rows)
    figures = plots.try_plot(plots.alignment_scatter, corr["panels"], out_dir / "alignment_scatter.png")
    if dists:
        figures += plots.try_plot(plots.alignment_box, dists, out_dir / "alignment_box.png")
    if tracks:
        figures += plots.try_plot(plots.epoch_curves, tracks, out_dir / "alignment_epochs.png")
    if reg_rows:
        figures += plots.try_plot(plots.align_reg_plot, reg_rows, out_dir / "alignment_reg.png")
    summary = {
        "correlations": [{k: v for k, v in p.items() if k != "points"} | {"points": [list(x) for x in p["points"]]}
                         for p in corr["panels"]],
        "correlations_per_data": corr["per_data"],
        "distributions": {d: {"x_xprime": _quartiles(v["x_xprime"]), "x_y": _quartiles(v["x_y"])}
                          for d, v in dists.items()},
        "epoch_tracks": tracks, "align_reg": reg_rows,
        "paper_r": {f"{m}/{d}": r for (m, d), r in PAPER_R.items()},
    }
    return {"summary": summary, "markdown": markdown(corr, dists, tracks, reg_rows), "figures": figures}
