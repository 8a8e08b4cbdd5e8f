"""`cdsr experiment protocol`: is a cheaper training schedule as good as the reference one?

It trains nothing. It reads finished runs from experiment folders: one reference (runs under
the reference protocol, e.g. `table --preset paper --variants bare`) and one or more
candidates (the same runs with `--set` schedule overrides). Each candidate is one protocol,
named by its overrides. For every model, dataset and GCA variant it compares the candidate
with the reference:

- epochs: the candidate's epochs run / the reference's (the budget: at most `max_epochs`,
  default 1/3), and whether early stopping ended every run (not the epoch cap);
- test NDCG@10 per domain: candidate / reference (the bar: at least `min_ratio`, default
  0.97, i.e. within 3%);
- validation NDCG@10 per domain, the same ratio.

The choice is made on validation only. Among the candidates that keep the epoch budget and
stop early on every dataset, the one chosen has the highest mean validation ratio. Its test
ratios then say whether it meets the bar; they play no part in the choice. Several seeds of
a cell are averaged first.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from cdsr.experiments.common import DATA_LABELS, DOMAINS

REFERENCE = "reference"
METRIC = "ndcg@10"


def protocol_name(sets: Sequence[str]) -> str:
    """A candidate protocol's name: its --set overrides, sorted, space-separated."""
    return " ".join(sorted(sets)) if sets else "(no overrides)"


def _metric(results: Dict[str, Any], split: str, domain: str) -> float:
    try:
        return float(results[split][domain][METRIC])
    except (KeyError, TypeError):
        return float("nan")


def _cells(rows: List[Dict[str, Any]]) -> Dict[Tuple[str, str, str, str], Dict[str, Any]]:
    """(protocol, model, data, GCA positions) -> means over seeds of epochs run, test and
    validation NDCG@10 per domain, and whether early stopping ended every run."""
    groups: Dict[Tuple[str, str, str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        lab = r["labels"]
        where = "GCA" + str(list(lab["positions"])) if lab.get("positions") else "bare"
        groups.setdefault((lab["protocol"], lab["model"], lab["data"], where), []).append(r["results"])
    out = {}
    for key, res in groups.items():
        out[key] = {
            "seeds": len(res),
            "epochs_run": float(np.mean([x.get("epochs_run") or 0 for x in res])),
            "best_epoch": float(np.mean([x.get("best_epoch") or 0 for x in res])),
            "early_stopped": all(bool(x.get("early_stopped")) for x in res),
            "test": {d: float(np.nanmean([_metric(x, "test", d) for x in res])) for d in DOMAINS},
            "valid": {d: float(np.nanmean([_metric(x, "valid", d) for x in res])) for d in DOMAINS},
            "wall_time_s": float(np.sum([x.get("wall_time_s") or 0.0 for x in res])),
        }
    return out


def compare(rows: List[Dict[str, Any]], max_epochs: float = 1 / 3, min_ratio: float = 0.97) -> Dict[str, Any]:
    cells = _cells(rows)
    refs = {(m, d, v): c for (p, m, d, v), c in cells.items() if p == REFERENCE}
    comparisons = []
    for (p, m, d, v), c in sorted(cells.items()):
        if p == REFERENCE:
            continue
        ref = refs.get((m, d, v))
        if ref is None:
            comparisons.append({"protocol": p, "model": m, "data": d, "variant": v, "reference": False})
            continue
        entry = {"protocol": p, "model": m, "data": d, "variant": v, "reference": True, "seeds": c["seeds"],
                 "epochs_run": c["epochs_run"], "reference_epochs_run": ref["epochs_run"],
                 "epochs_ratio": c["epochs_run"] / ref["epochs_run"] if ref["epochs_run"] else float("nan"),
                 "early_stopped": c["early_stopped"], "reference_early_stopped": ref["early_stopped"],
                 "test": c["test"], "reference_test": ref["test"], "valid": c["valid"],
                 "reference_valid": ref["valid"],
                 "test_ratio": {k: c["test"][k] / ref["test"][k] for k in DOMAINS},
                 "valid_ratio": {k: c["valid"][k] / ref["valid"][k] for k in DOMAINS},
                 "wall_time_s": c["wall_time_s"], "reference_wall_time_s": ref["wall_time_s"]}
        entry["within_budget"] = bool(entry["epochs_ratio"] <= max_epochs + 1e-9 and c["early_stopped"])
        entry["meets_bar"] = bool(all(entry["test_ratio"][k] >= min_ratio for k in DOMAINS))
        comparisons.append(entry)
    # The choice, on validation only: candidates within budget on every (model, data) the
    # reference covers, highest mean validation ratio.
    by_protocol: Dict[str, List[Dict[str, Any]]] = {}
    for e in comparisons:
        by_protocol.setdefault(e["protocol"], []).append(e)
    eligible = {p: es for p, es in by_protocol.items()
                if all(e["reference"] and e["within_budget"] for e in es)
                and {(e["model"], e["data"], e["variant"]) for e in es} == set(refs)}
    chosen = None
    if eligible:
        def score(p):
            return float(np.mean([e["valid_ratio"][k] for e in eligible[p] for k in DOMAINS]))
        name = max(eligible, key=score)
        chosen = {"protocol": name, "mean_valid_ratio": score(name),
                  "meets_bar": all(e["meets_bar"] for e in eligible[name])}
    return {"comparisons": comparisons, "chosen": chosen, "max_epochs": max_epochs, "min_ratio": min_ratio,
            "references": [{"model": m, "data": d, "variant": v, **c} for (m, d, v), c in sorted(refs.items())]}


def markdown(result: Dict[str, Any]) -> str:
    lines = ["## Reference runs", "",
             "| model | data | variant | seeds | epochs run | best epoch | early-stopped | test NDCG@10 A | "
             "test NDCG@10 B | valid NDCG@10 A | valid NDCG@10 B |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["references"]:
        lines.append(f"| {r['model']} | {DATA_LABELS.get(r['data'], r['data'])} | {r['variant']} | {r['seeds']} | {r['epochs_run']:.0f} | "
                     f"{r['best_epoch']:.0f} | {'yes' if r['early_stopped'] else 'no'} | {r['test']['A']:.4f} | "
                     f"{r['test']['B']:.4f} | {r['valid']['A']:.4f} | {r['valid']['B']:.4f} |")
    lines += ["", f"## Candidates against the reference (budget: at most {result['max_epochs']:.3g} of the "
              f"reference's epochs, ended by early stopping; bar: test NDCG@10 at least "
              f"{result['min_ratio']:.0%} of the reference's in both domains)", "",
              "| protocol | model | data | variant | epochs run (x ref) | early-stopped | test NDCG@10 A (x ref) | "
              "test NDCG@10 B (x ref) | valid x ref A / B | within budget | meets bar |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in result["comparisons"]:
        if not e["reference"]:
            lines.append(f"| `{e['protocol']}` | {e['model']} | {DATA_LABELS.get(e['data'], e['data'])} | "
                         f"{e['variant']} | no reference run for this cell | | | | | | |")
            continue
        lines.append(
            f"| `{e['protocol']}` | {e['model']} | {DATA_LABELS.get(e['data'], e['data'])} | {e['variant']} | "
            f"{e['epochs_run']:.0f} ({e['epochs_ratio']:.2f}) | {'yes' if e['early_stopped'] else 'no'} | "
            f"{e['test']['A']:.4f} ({e['test_ratio']['A']:.3f}) | {e['test']['B']:.4f} ({e['test_ratio']['B']:.3f}) | "
            f"{e['valid_ratio']['A']:.3f} / {e['valid_ratio']['B']:.3f} | {'yes' if e['within_budget'] else 'no'} | "
            f"{'yes' if e['meets_bar'] else 'no'} |")
    c = result["chosen"]
    lines += [""]
    if c is None:
        lines.append("**Chosen:** none. No candidate kept the epoch budget, ended by early stopping, on every "
                     "dataset the reference covers.")
    else:
        lines.append(f"**Chosen on validation:** `{c['protocol']}` (mean validation NDCG@10 ratio "
                     f"{c['mean_valid_ratio']:.3f}). Its test NDCG@10 "
                     + ("is within the bar on every dataset and domain." if c["meets_bar"]
                        else "misses the bar somewhere (table above): it is not a substitute for the reference."))
    return "\n".join(lines) + "\n"


def analyse(rows: List[Dict[str, Any]], out_dir) -> Dict[str, Any]:
    result = compare(rows)
    return {"markdown": markdown(result), "figures": [], "summary": {"protocol_search": result}}


def collect(reference: str, candidates: Sequence[str]) -> Tuple[Dict[str, Any], List[Dict[str, Any]]]:
    """The finished runs of the reference folder and the candidate folders as one manifest
    and its rows, each run labelled with its protocol (REFERENCE, or its --set overrides)."""
    from pathlib import Path

    from cdsr.experiments.runner import MANIFEST, load_results, read_json

    runs, rows, commands = [], [], []
    seen, folders = set(), set()
    for kind, folder in [(REFERENCE, reference)] + [("candidate", c) for c in candidates]:
        path = Path(folder)
        if path.resolve() in folders:
            raise ValueError(f"{path}: this folder is given twice (--reference / --candidates)")
        folders.add(path.resolve())
        manifest = read_json(path / MANIFEST)
        if manifest is None:
            raise FileNotFoundError(f"no {MANIFEST} in {path}: not an experiment folder")
        meta = manifest.get("meta") or {}
        name = REFERENCE if kind == REFERENCE else protocol_name(meta.get("sets") or [])
        if name in seen:
            raise ValueError(f"{path}: protocol {name!r} is given twice")
        seen.add(name)
        commands.append(meta.get("command", ""))
        entries = {r["id"]: r for r in manifest["runs"]}
        for row in load_results(path):
            labels = dict(row["labels"], protocol=name)
            runs.append(dict(entries[row["id"]], labels=labels, status="done", preset=meta.get("preset"),
                             sets=list(meta.get("sets") or [])))
            rows.append({"id": row["id"], "labels": labels, "results": row["results"]})
    manifest = {"experiment": "protocol", "meta": {"command": " ; ".join(commands), "preset": None, "sets": []},
                "runs": runs}
    return manifest, rows
