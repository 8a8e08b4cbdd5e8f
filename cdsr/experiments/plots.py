"""PNG figures of the experiments (matplotlib, Agg backend: no display needed).

Every figure function takes already-aggregated data and a path, and returns a list of
{"file", "caption"} entries for the report. `try_plot` turns a missing matplotlib into a note
in the report instead of a failed experiment: the runs and tables are still worth having.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence

from cdsr.experiments.common import DATA_LABELS, DOMAINS

VARIANT_COLORS = {"bare": "#7f7f7f", "GCA_early": "#1f77b4", "GCA_stack": "#ff7f0e"}
DATA_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#8c564b"]


def positions_text(positions: Sequence[int]) -> str:
    return "GCA[" + ",".join(str(p) for p in positions) + "]" if positions else "bare"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def try_plot(fn: Callable[..., List[Dict[str, str]]], *args, **kwargs) -> List[Dict[str, str]]:
    try:
        return fn(*args, **kwargs)
    except ImportError as e:
        print(f"plots skipped ({fn.__name__}): {e}; install matplotlib (pip install matplotlib)",
              file=sys.stderr)
        return [{"file": "", "caption": f"{fn.__name__} not drawn: matplotlib is not installed"}]


def _grid(n: int, max_cols: int = 3):
    cols = min(max_cols, max(1, n))
    rows = math.ceil(max(1, n) / cols)
    return rows, cols


def variant_bars(groups: List[Dict[str, Any]], path: Path) -> List[Dict[str, str]]:
    plt = _pyplot()
    cases = sorted({(g["model"], g["data"]) for g in groups})
    rows, cols = _grid(len(cases))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, (model, data) in zip(axes.flat, cases):
        gs = [g for g in groups if (g["model"], g["data"]) == (model, data)]
        width = 0.8 / max(1, len(gs))
        for i, g in enumerate(gs):
            means = [g["metrics"][d]["ndcg@10"]["mean"] for d in DOMAINS]
            stds = [g["metrics"][d]["ndcg@10"]["std"] for d in DOMAINS]
            xs = [j + (i - (len(gs) - 1) / 2) * width for j in range(len(DOMAINS))]
            label = g["variant"] if g["variant"] == "bare" else f"{g['variant']} {positions_text(g['positions'])}"
            ax.bar(xs, means, width, yerr=stds, capsize=3, label=label,
                   color=VARIANT_COLORS.get(g["variant"], None))
        ax.set_xticks(range(len(DOMAINS)))
        ax.set_xticklabels([f"domain {d}" for d in DOMAINS])
        ax.set_ylabel("test NDCG@10 (mean ± std, seeds)")
        ax.set_title(f"{model} on {DATA_LABELS.get(data, data)}", fontsize=10)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "Test NDCG@10 per domain: bare vs GCA_early vs GCA_stack"}]


def alignment_scatter(panels: List[Dict[str, Any]], path: Path) -> List[Dict[str, str]]:
    """panels: [{"model", "domain", "points": [(cos, ndcg, data)], "r", "p", "n"}]."""
    plt = _pyplot()
    models_ = sorted({p["model"] for p in panels})
    fig, axes = plt.subplots(len(models_), len(DOMAINS), figsize=(4.4 * len(DOMAINS), 3.5 * len(models_)),
                             squeeze=False)
    datasets = sorted({pt[2] for p in panels for pt in p["points"]})
    color = {d: DATA_COLORS[i % len(DATA_COLORS)] for i, d in enumerate(datasets)}
    for i, model in enumerate(models_):
        for j, dom in enumerate(DOMAINS):
            ax = axes[i][j]
            panel = next((p for p in panels if p["model"] == model and p["domain"] == dom), None)
            if panel is None or not panel["points"]:
                ax.set_title(f"{model}, domain {dom}: no GCA module on {dom}")
                ax.axis("off")
                continue
            for data in datasets:
                pts = [pt for pt in panel["points"] if pt[2] == data]
                if pts:
                    ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.8, color=color[data],
                               label=DATA_LABELS.get(data, data))
            r, p = panel["r"], panel["p"]
            stat = f"r = {r:.3f}, p = {p:.3g}, n = {panel['n']}" if not math.isnan(r) else f"n = {panel['n']}: r undefined"
            ax.set_title(f"{model}, domain {dom}\n{stat}", fontsize=9)
            ax.set_xlabel("mean |cos(X, X')| (test)")
            ax.set_ylabel(f"test NDCG@10 {dom}")
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "|cos(X, X')| against NDCG@10, per backbone and domain (Pearson r)"}]


def alignment_box(per_data: Dict[str, Dict[str, List[float]]], path: Path) -> List[Dict[str, str]]:
    """per_data: {data: {"x_xprime": [...], "x_y": [...]}} (one value per GCA module per run)."""
    plt = _pyplot()
    datas = sorted(per_data)
    fig, ax = plt.subplots(figsize=(max(4.5, 2.6 * len(datas)), 3.6))
    values, labels, colors = [], [], []
    for data in datas:
        for key, lab, col in (("x_xprime", "|cos(X,X')|", "#1f77b4"), ("x_y", "|cos(X,Y)|", "#ff7f0e")):
            values.append(per_data[data][key])
            labels.append(f"{DATA_LABELS.get(data, data)}\n{lab}")
            colors.append(col)
    box = ax.boxplot(values, patch_artist=True)
    for patch, col in zip(box["boxes"], colors):
        patch.set_facecolor(col)
        patch.set_alpha(0.5)
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("mean |cosine| per GCA module")
    ax.set_title("|cos(X, X')| next to |cos(X, Y)|", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "|cos(X, X')| (query vs GCA output) next to |cos(X, Y)| (query vs key input)"}]


def epoch_curves(curves: List[Dict[str, Any]], path: Path) -> List[Dict[str, str]]:
    """curves: [{"title", "epochs", "cos": {dom: [...]}, "ndcg": {dom: [...]}}]."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    rows, cols = _grid(len(curves), 2)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.4 * rows), squeeze=False)
    for ax, c in zip(axes.flat, curves):
        twin = ax.twinx()
        for dom, style in zip(DOMAINS, ("-", "--")):
            if c["cos"].get(dom):
                ax.plot(c["epochs"], c["cos"][dom], style, color="#1f77b4", marker="o", ms=3,
                        label=f"|cos(X,X')| {dom}")
            if c["ndcg"].get(dom):
                twin.plot(c["epochs"], c["ndcg"][dom], style, color="#d62728", marker="s", ms=3,
                          label=f"valid NDCG@10 {dom}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("|cos(X, X')| (valid)", color="#1f77b4")
        twin.set_ylabel("valid NDCG@10", color="#d62728")
        ax.set_title(c["title"], fontsize=8)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = twin.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="best")
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "|cos(X, X')| and validation NDCG@10 over training epochs"}]


def align_reg_plot(rows: List[Dict[str, Any]], path: Path) -> List[Dict[str, str]]:
    """rows: [{"model", "data", "align_reg", "ndcg": {dom: stat}, "cos": stat}]."""
    plt = _pyplot()
    cases = sorted({(r["model"], r["data"]) for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.6), squeeze=False)
    for k, (model, data) in enumerate(cases):
        rs = sorted((r for r in rows if (r["model"], r["data"]) == (model, data)), key=lambda r: r["align_reg"])
        xs = [r["align_reg"] for r in rs]
        col = DATA_COLORS[k % len(DATA_COLORS)]
        for dom, style in zip(DOMAINS, ("-o", "--s")):
            axes[0][0].errorbar(xs, [r["ndcg"][dom]["mean"] for r in rs], yerr=[r["ndcg"][dom]["std"] for r in rs],
                                fmt=style, color=col, capsize=3, label=f"{model}/{DATA_LABELS.get(data, data)} {dom}")
        axes[0][1].errorbar(xs, [r["cos"]["mean"] for r in rs], yerr=[r["cos"]["std"] for r in rs], fmt="-o",
                            color=col, capsize=3, label=f"{model}/{DATA_LABELS.get(data, data)}")
    axes[0][0].set_xlabel("align_reg L (loss + L |cos(X, X')|)")
    axes[0][0].set_ylabel("test NDCG@10")
    axes[0][1].set_xlabel("align_reg L")
    axes[0][1].set_ylabel("test |cos(X, X')|")
    for ax in axes[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "Forcing (L > 0) or suppressing (L < 0) orthogonality: NDCG@10 and |cos(X, X')|"}]


def scaling_curves(cases: List[Dict[str, Any]], path: Path) -> List[Dict[str, str]]:
    """cases: [{"model", "data", "curves": {name: [(params, ndcg_mean, ndcg_std)]}}] where
    ndcg is the mean of the two domains' NDCG@10."""
    plt = _pyplot()
    rows, cols = _grid(len(cases))
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    styles = {"bare": ("-o", "#7f7f7f"), "GCA_early": ("-s", "#1f77b4"), "bare_matched": ("D", "#2ca02c")}
    for ax, case in zip(axes.flat, cases):
        for name, pts in case["curves"].items():
            if not pts:
                continue
            pts = sorted(pts)
            fmt, col = styles.get(name, ("-^", None))
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], fmt=fmt, color=col,
                        capsize=3, label=name)
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters")
        ax.set_ylabel("test NDCG@10 (mean of A and B)")
        ax.set_title(f"{case['model']} on {DATA_LABELS.get(case['data'], case['data'])}", fontsize=9)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(cases):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [{"file": path.name, "caption": "NDCG@10 against trainable parameters: bare backbone at several widths vs backbone + GCA_early"}]
