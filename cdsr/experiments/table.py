"""`cdsr experiment table`: bare backbone vs GCA_early (`GCA[0]`) vs GCA_stack, per backbone
and dataset, over seeds, in the layout of the paper's Table 1 (plus HR@5/10/20 and MRR).

Claim checked (paper claim 1): GCA_early improves NDCG and AUC over the bare backbone, and a
deeper stack is not monotonically better.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

from cdsr.experiments import plots
from cdsr.experiments.common import (DATA_LABELS, DOMAINS, check_positions, fmt_ms, module_domain, run_config,
                                     test_metric)
from cdsr.experiments.runner import RunSpec
from cdsr.experiments.stats import mean_std

VARIANTS = ("bare", "GCA_early", "GCA_stack")
MAIN_COLUMNS = [("ndcg@1", "A"), ("ndcg@10", "A"), ("ndcg@1", "B"), ("ndcg@10", "B"), ("auc", "A"), ("auc", "B")]
EXTRA_METRICS = ("hr@5", "hr@10", "hr@20", "mrr")
ALL_METRICS = ("ndcg@1", "ndcg@10", "auc") + EXTRA_METRICS

# The paper's Table 1 for the pairs available here (ABXI on Beauty-Elec and Food-Kitchen).
PAPER_TABLE1 = {
    ("abxi", "abe"): {
        "bare": {"ndcg@1_A": 0.0730, "ndcg@10_A": 0.1724, "ndcg@1_B": 0.0548, "ndcg@10_B": 0.1273,
                 "auc_A": 0.7216, "auc_B": 0.7123},
        "GCA_early": {"ndcg@1_A": 0.0727, "ndcg@10_A": 0.1793, "ndcg@1_B": 0.0544, "ndcg@10_B": 0.1244,
                      "auc_A": 0.7410, "auc_B": 0.7169},
        "GCA_stack": {"ndcg@1_A": 0.0733, "ndcg@10_A": 0.1846, "ndcg@1_B": 0.0566, "ndcg@10_B": 0.1271,
                      "auc_A": 0.7354, "auc_B": 0.6973},
    },
    ("abxi", "afk"): {
        "bare": {"ndcg@1_A": 0.0593, "ndcg@10_A": 0.1541, "ndcg@1_B": 0.0416, "ndcg@10_B": 0.1093,
                 "auc_A": 0.7205, "auc_B": 0.7180},
        "GCA_early": {"ndcg@1_A": 0.0703, "ndcg@10_A": 0.1757, "ndcg@1_B": 0.0548, "ndcg@10_B": 0.1327,
                      "auc_A": 0.7317, "auc_B": 0.7150},
        "GCA_stack": {"ndcg@1_A": 0.0882, "ndcg@10_A": 0.1853, "ndcg@1_B": 0.0527, "ndcg@10_B": 0.1282,
                      "auc_A": 0.7148, "auc_B": 0.6924},
    },
}


def plan(models_: Sequence[str], datasets: Sequence[str], seeds: Sequence[int], *, stack: Sequence[int],
         preset_name: str, epochs: int, device: str, threads, sets: Sequence[str],
         variants: Sequence[str] = VARIANTS) -> List[RunSpec]:
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--variants: unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    specs = []
    for model in models_:
        early = check_positions(model, [0], "GCA_early")
        stack_pos = check_positions(model, stack, "--stack")
        if len(stack_pos) < 2:
            raise ValueError(f"--stack needs at least two GCA positions (a stack), got {list(stack)}")
        for data in datasets:
            # Seed-major: a sweep stopped part-way has every variant at the seeds it reached.
            for seed in seeds:
                for variant, positions in (("bare", []), ("GCA_early", early), ("GCA_stack", stack_pos)):
                    if variant not in variants:
                        continue
                    cfg = run_config(model, data, seed, preset_name=preset_name, epochs=epochs, device=device,
                                     threads=threads, sets=sets, controlled={"gca_positions": positions})
                    specs.append(RunSpec({"model": model, "data": data, "variant": variant,
                                          "positions": positions, "seed": seed}, cfg))
    return specs


def aggregate(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        lab = r["labels"]
        groups.setdefault((lab["model"], lab["data"], lab["variant"]), []).append(r)
    out = []
    order = {v: i for i, v in enumerate(VARIANTS)}
    for (model, data, variant), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], order[kv[0][2]])):
        res = [r["results"] for r in rs]
        metrics = {d: {m: mean_std([test_metric(x, d, m) for x in res]) for m in ALL_METRICS} for d in DOMAINS}
        out.append({
            "model": model, "data": data, "variant": variant, "positions": rs[0]["labels"]["positions"],
            "seeds": sorted(r["labels"]["seed"] for r in rs), "n_params": res[0].get("n_params"),
            "epochs_run": mean_std([x.get("epochs_run", float("nan")) for x in res]),
            "best_epoch": mean_std([x.get("best_epoch", float("nan")) for x in res]),
            "wall_time_s": mean_std([x.get("wall_time_s", float("nan")) for x in res]),
            "metrics": metrics,
        })
    return out


def compare(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Each GCA variant against the bare backbone of the same model and data: the difference
    of means, and whether it exceeds one pooled standard deviation (a rough signal-vs-seed-noise
    check on few seeds, not a significance test)."""
    by_key = {(g["model"], g["data"], g["variant"]): g for g in groups}
    out = []
    for g in groups:
        if g["variant"] == "bare" or (g["model"], g["data"], "bare") not in by_key:
            continue
        base = by_key[(g["model"], g["data"], "bare")]
        paper = PAPER_TABLE1.get((g["model"], g["data"]))
        row = {"model": g["model"], "data": g["data"], "variant": g["variant"], "deltas": {}}
        for metric in ("ndcg@1", "ndcg@10", "auc"):
            for d in DOMAINS:
                a, b = g["metrics"][d][metric], base["metrics"][d][metric]
                delta = a["mean"] - b["mean"]
                noise = ((a["std"] ** 2 + b["std"] ** 2) / 2) ** 0.5
                entry = {"ours": delta, "ours_rel": delta / b["mean"] if b["mean"] else float("nan"),
                         "beyond_1_std": bool(abs(delta) > noise) if min(a["n"], b["n"]) > 1 else None}
                if paper:
                    key = f"{metric}_{d}"
                    entry["paper"] = paper[g["variant"]][key] - paper["bare"][key]
                    entry["same_sign"] = (entry["paper"] > 0) == (delta > 0)
                row["deltas"][f"{metric}_{d}"] = entry
        out.append(row)
    return out


def _module_means(alignment: Dict[str, Dict[str, float]], key: str, domain: str) -> float:
    vals = [a[key] for name, a in (alignment or {}).items() if module_domain(name) == domain]
    return sum(vals) / len(vals) if vals else float("nan")


def alignment_probe(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Per GCA variant: the test-set probe (|cos(X, X')| of the modules whose query is each
    domain, |cos(X, Y)|) and the validation |cos(X, X')| at the first and the last epoch
    next to the validation selection score (mean over seeds)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        lab = r["labels"]
        if lab["variant"] != "bare":
            groups.setdefault((lab["model"], lab["data"], lab["variant"]), []).append(r["results"])
    out = []
    for (model, data, variant), res in sorted(groups.items()):
        entry = {"model": model, "data": data, "variant": variant, "test": {}, "epochs": {}}
        for d in DOMAINS:
            entry["test"][d] = {"cos_x_xprime": mean_std([_module_means(x.get("alignment"), "cos_x_xprime", d) for x in res]),
                                "cos_x_y": mean_std([_module_means(x.get("alignment"), "cos_x_y", d) for x in res])}
            first, last = [], []
            for x in res:
                hist = [h for h in x.get("history", []) if h.get("alignment")]
                if len(hist) >= 2:
                    first.append(_module_means(hist[0]["alignment"], "cos_x_xprime", d))
                    last.append(_module_means(hist[-1]["alignment"], "cos_x_xprime", d))
            entry["epochs"][d] = {"first": mean_std(first), "last": mean_std(last)}
        hists = [[h for h in x.get("history", []) if h.get("alignment")] for x in res]
        hists = [h for h in hists if len(h) >= 2]
        entry["valid_score"] = {"first": mean_std([h[0]["valid_score"] for h in hists]),
                                "last": mean_std([h[-1]["valid_score"] for h in hists]),
                                "epochs": sorted({len(h) for h in hists})}
        out.append(entry)
    return out


def probe_markdown(probe: List[Dict[str, Any]], metric: str) -> str:
    if not probe:
        return ""
    lines = ["", "## Alignment probe of the GCA runs (mean ± std over seeds)", "",
             "Test set: `|cos(X, X')|` of the GCA modules whose query is the domain, and `|cos(X, Y)|`. Validation: "
             f"`|cos(X, X')|` after the first and the last epoch, next to the validation selection score "
             f"({metric.upper()} A + B) at the same epochs.", "",
             "| model | data | variant | test \\|cos(X,X')\\| A | test \\|cos(X,X')\\| B | test \\|cos(X,Y)\\| | "
             "valid \\|cos(X,X')\\| A first -> last | valid \\|cos(X,X')\\| B first -> last | valid score first -> last |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in probe:
        ep = e["epochs"]
        vs = e["valid_score"]
        lines.append(
            f"| {e['model']} | {DATA_LABELS.get(e['data'], e['data'])} | {e['variant']} | "
            f"{fmt_ms(e['test']['A']['cos_x_xprime'], 3)} | {fmt_ms(e['test']['B']['cos_x_xprime'], 3)} | "
            f"{fmt_ms(e['test']['A']['cos_x_y'], 3)} | "
            f"{fmt_ms(ep['A']['first'], 3)} -> {fmt_ms(ep['A']['last'], 3)} | "
            f"{fmt_ms(ep['B']['first'], 3)} -> {fmt_ms(ep['B']['last'], 3)} | "
            f"{fmt_ms(vs['first'])} -> {fmt_ms(vs['last'])} |")
    return "\n".join(lines) + "\n"


def _label(g: Dict[str, Any]) -> str:
    return g["model"] if g["variant"] == "bare" else f"+ {g['variant']} {plots.positions_text(g['positions'])}"


def markdown(groups: List[Dict[str, Any]], comparisons: List[Dict[str, Any]]) -> str:
    lines = ["## Table 1 layout (test set, mean ± std over seeds)", "",
             "| model | data (A-B) | params | seeds | " + " | ".join(f"{m.upper()} {d}" for m, d in MAIN_COLUMNS) + " |",
             "|---|---|---|---|" + "---|" * len(MAIN_COLUMNS)]
    for g in groups:
        data = DATA_LABELS.get(g["data"], g["data"]) if g["variant"] == "bare" else ""
        cells = [fmt_ms(g["metrics"][d][m]) for m, d in MAIN_COLUMNS]
        lines.append(f"| {_label(g)} | {data} | {g['n_params']:,} | {len(g['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "## HR@5/10/20 and MRR (test set, mean ± std over seeds)", "",
              "| model | data | " + " | ".join(f"{m.upper()} {d}" for d in DOMAINS for m in EXTRA_METRICS) + " |",
              "|---|---|" + "---|" * (2 * len(EXTRA_METRICS))]
    for g in groups:
        data = DATA_LABELS.get(g["data"], g["data"]) if g["variant"] == "bare" else ""
        cells = [fmt_ms(g["metrics"][d][m]) for d in DOMAINS for m in EXTRA_METRICS]
        lines.append(f"| {_label(g)} | {data} | " + " | ".join(cells) + " |")
    if comparisons:
        lines += ["", "## Change against the bare backbone (difference of means)", "",
                  "`*` marks a change larger than the pooled seed standard deviation; `paper` is the same "
                  "difference in the paper's Table 1, where the paper has this backbone on this data.", "",
                  "| model | data | variant | ΔNDCG@10 A | ΔNDCG@10 B | ΔAUC A | ΔAUC B | paper ΔNDCG@10 A | "
                  "paper ΔNDCG@10 B | paper ΔAUC A | paper ΔAUC B |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for c in comparisons:
            cells = []
            for key in ("ndcg@10_A", "ndcg@10_B", "auc_A", "auc_B"):
                e = c["deltas"][key]
                cells.append(f"{e['ours']:+.4f}{'*' if e['beyond_1_std'] else ''}")
            for key in ("ndcg@10_A", "ndcg@10_B", "auc_A", "auc_B"):
                e = c["deltas"][key]
                cells.append(f"{e['paper']:+.4f}" if "paper" in e else "-")
            lines.append(f"| {c['model']} | {DATA_LABELS.get(c['data'], c['data'])} | {c['variant']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def analyse(rows: List[Dict[str, Any]], out_dir) -> Dict[str, Any]:
    groups = aggregate(rows)
    comparisons = compare(groups)
    probe = alignment_probe(rows)
    metric = rows[0]["results"].get("config", {}).get("early_stop_metric", "mrr") if rows else "mrr"
    figures = plots.try_plot(plots.variant_bars, groups, out_dir / "table_ndcg10.png")
    summary = {"groups": groups, "comparisons": comparisons, "alignment_probe": probe, "paper_table1": {
        f"{m}/{d}": v for (m, d), v in PAPER_TABLE1.items()}}
    return {"summary": summary, "markdown": markdown(groups, comparisons) + probe_markdown(probe, metric),
            "figures": figures}
