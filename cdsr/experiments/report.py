"""An experiment's `report.md` and `summary.json`: what ran, then the analysis; and
`cdsr experiment report`, which rebuilds docs/results.md's tables from committed summaries.

summary.json holds `runs`: one record per finished run (`run_record`), enough to redo the
experiment's analysis without the run folders: `rows_from_summary` turns the records back
into the rows the experiments' `analyse` reads. docs/results.md keeps its prose; each
experiment's generated part sits between `<!-- results:NAME -->` and `<!-- /results:NAME -->`
(NAME = the folder under docs/results/), and only that part is rewritten.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from cdsr.experiments.common import DATA_LABELS
from cdsr.experiments.runner import atomic_write_json


def _clean(obj: Any) -> Any:
    """JSON has no NaN: write null instead, so that summary.json stays standard JSON."""
    if isinstance(obj, float):
        return None if math.isnan(obj) or math.isinf(obj) else obj
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer)):
        return _clean(obj.item())
    return obj


def what_ran(manifest: Dict[str, Any], rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    runs = manifest["runs"]
    res = [r["results"] for r in rows]
    cfgs = [r["config"] for r in runs]
    return {
        "runs_planned": len(runs),
        "runs_done": len(rows),
        "runs_failed": sum(r["status"] == "failed" for r in runs),
        "runs_pending": sum(r["status"] == "pending" for r in runs),
        "models": sorted({c["model"] for c in cfgs}),
        "data": sorted({c["data"] for c in cfgs}),
        "seeds": sorted({c["seed"] for c in cfgs}),
        "max_epochs": sorted({c["epochs"] for c in cfgs}),
        "epochs_run": sorted({x.get("epochs_run") for x in res}),
        "devices": sorted({c["device"] for c in cfgs}),
        "train_time_s_total": float(sum(x.get("wall_time_s", 0.0) for x in res)),
        "train_time_s_mean": float(np.mean([x.get("wall_time_s", 0.0) for x in res])) if res else float("nan"),
        "eval_negatives": sorted({c.get("eval_negatives") for c in cfgs}),
    }


def settings_block(manifest: Dict[str, Any]) -> List[str]:
    """Per backbone, the config values every run shared (what the experiment did not vary)."""
    out = ["## Run settings", "", "Config values shared by all runs of a backbone (the swept keys are in the "
           "tables above; per-run configs are in manifest.json).", ""]
    by_model: Dict[str, List[Dict[str, Any]]] = {}
    for r in manifest["runs"]:
        by_model.setdefault(r["config"]["model"], []).append(r["config"])
    for model, cfgs in sorted(by_model.items()):
        shared = {k: v for k, v in cfgs[0].items()
                  if all(c.get(k) == v for c in cfgs) and k not in ("model", "progress", "threads")}
        out.append(f"- {model}: " + ", ".join(f"`{k}={json.dumps(v)}`" for k, v in sorted(shared.items())))
    return out + [""]


def write(out_dir: Path, experiment: str, manifest: Dict[str, Any], rows: List[Dict[str, Any]],
          analysis: Dict[str, Any]) -> Path:
    info = what_ran(manifest, rows)
    meta = manifest.get("meta", {})
    lines = [f"# Experiment `{experiment}`", "",
             f"Command: `{meta.get('command', '')}`", "",
             "## What ran", "",
             f"- runs: {info['runs_done']} done of {info['runs_planned']} planned"
             + (f", {info['runs_failed']} failed" if info["runs_failed"] else "")
             + (f", {info['runs_pending']} not run yet" if info["runs_pending"] else ""),
             f"- backbones: {', '.join(info['models'])}; data: "
             + ", ".join(f"{d} ({DATA_LABELS.get(d, d)})" for d in info["data"]),
             f"- seeds: {info['seeds']}; max epochs: {info['max_epochs']}; epochs actually run: {info['epochs_run']}",
             f"- evaluation: {info['eval_negatives']} sampled negatives per test user; test metrics at the best "
             f"validation epoch",
             f"- device: {', '.join(info['devices'])}; workers: {meta.get('workers')}; threads per run: "
             f"{meta.get('threads')}; preset: {meta.get('preset')}; machine: {platform.machine()} "
             f"({meta.get('cpu_count')} cores)",
             f"- training + evaluation time: {info['train_time_s_total']:.0f} s in total "
             f"({info['train_time_s_mean']:.1f} s per run on average)", ""]
    if meta.get("sets"):
        lines.insert(3, f"Config overrides: `{' '.join(meta['sets'])}`")
        lines.insert(4, "")
    if info["runs_done"] == 0:
        lines.append("No run has finished yet: nothing to analyse.")
    else:
        lines.append(analysis["markdown"])
        figs = [f for f in analysis.get("figures", [])]
        if figs:
            lines += ["## Figures", ""]
            for f in figs:
                lines.append(f"![{f['caption']}]({f['file']})" if f["file"] else f"- {f['caption']}")
                lines.append("")
    lines += settings_block(manifest)
    path = out_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    atomic_write_json(_clean({"experiment": experiment, "what_ran": info, "meta": meta,
                              **(analysis.get("summary") or {}), "runs": run_records(manifest, rows)}),
                      out_dir / "summary.json")
    return path


def early_stopped(results: Dict[str, Any]) -> bool:
    """Early stopping ended the run (not the epoch cap). Results written before the trainer
    recorded it: a run that stopped before its cap stopped early."""
    if "early_stopped" in results:
        return bool(results["early_stopped"])
    return int(results.get("epochs_run", 0)) < int((results.get("config") or {}).get("epochs", 0))


def run_record(entry: Dict[str, Any], results: Dict[str, Any], preset: Any,
               sets: Optional[List[str]] = None) -> Dict[str, Any]:
    """One run of summary.json: what it was (model, data, positions, seed, and its protocol:
    the preset plus the command's --set overrides), how its training ended, its validation
    (best epoch) and test metrics per domain and its alignment probes. Tracked runs keep
    their per-epoch history (the alignment experiment's curves)."""
    cfg = results.get("config") or entry.get("config") or {}
    rec = {
        "id": entry["id"], "labels": entry["labels"], "model": cfg.get("model"), "data": cfg.get("data"),
        "gca_positions": list(cfg.get("gca_positions") or []), "seed": cfg.get("seed"), "preset": preset,
        "sets": list(sets or []),
        "epochs_run": results.get("epochs_run"), "max_epochs": cfg.get("epochs"),
        "best_epoch": results.get("best_epoch"), "early_stopped": early_stopped(results),
        "n_params": results.get("n_params"), "n_params_target": results.get("n_params_target"),
        "valid": results.get("valid"), "test": results.get("test"), "alignment": results.get("alignment") or {},
        "wall_time_s": results.get("wall_time_s"),
        "config": {"early_stop_metric": cfg.get("early_stop_metric")},
    }
    if entry.get("track_valid"):
        rec["history"] = results.get("history") or []
    return rec


def run_records(manifest: Dict[str, Any], rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    entries = {r["id"]: r for r in manifest["runs"]}
    meta = manifest.get("meta") or {}
    out = []
    for r in rows:
        entry = entries.get(r["id"], {"id": r["id"], "labels": r["labels"]})
        # A manifest gathered from several experiments (`protocol`) names each run's own
        # preset and overrides; an experiment's own manifest has them once, in meta.
        out.append(run_record(entry, r["results"], entry.get("preset", meta.get("preset")),
                              entry.get("sets", meta.get("sets"))))
    return out


def rows_from_summary(summary: Dict[str, Any]) -> List[Dict[str, Any]]:
    """The `analyse` rows ({"id", "labels", "results"}) of a summary.json's run records."""
    return [{"id": rec["id"], "labels": rec["labels"], "results": rec} for rec in summary.get("runs") or []]


def _marked(name: str) -> tuple:
    return f"<!-- results:{name} -->", f"<!-- /results:{name} -->"


def rebuild_doc(results_dir: Path, doc: Path, experiments: Dict[str, Any]) -> List[str]:
    """Rewrite `doc`'s generated block of every results_dir/<name>/summary.json from its run
    records (figures go next to the summary); a summary without a block in `doc` gets one
    appended. Returns the names rebuilt. `experiments` maps an experiment name to its module."""
    results_dir, doc = Path(results_dir), Path(doc)
    summaries = sorted(results_dir.glob("*/summary.json"))
    if not summaries:
        raise FileNotFoundError(f"no <name>/summary.json under {results_dir}")
    text = doc.read_text() if doc.is_file() else "# Results\n"
    done = []
    for path in summaries:
        name = path.parent.name
        summary = json.loads(path.read_text())
        kind = summary.get("experiment")
        if kind not in experiments:
            raise ValueError(f"{path}: experiment {kind!r} is not one of {', '.join(experiments)}")
        rows = rows_from_summary(summary)
        if not rows:
            raise ValueError(f"{path} holds no run records (runs); write it with this version of cdsr")
        analysis = experiments[kind].analyse(rows, path.parent)
        rel = path.parent.relative_to(doc.parent) if path.parent.is_relative_to(doc.parent) else path.parent
        body = analysis["markdown"].strip() + "\n"
        for fig in analysis.get("figures") or []:
            if fig.get("file"):
                body += f"\n![{fig['caption']}]({(rel / Path(fig['file']).name).as_posix()})\n"
        ended = sum(bool(r["results"].get("early_stopped")) for r in rows)
        source = (f"Generated by `cdsr experiment report` from `{rel / 'summary.json'}` ({len(rows)} runs, "
                  f"{ended} ended by early stopping, {len(rows) - ended} by their epoch cap).")
        start, end = _marked(name)
        block = f"{start}\n{source}\n\n{body.strip()}\n{end}"
        if start in text and end in text:
            head, rest = text.split(start, 1)
            text = head + block + rest.split(end, 1)[1]
        else:
            text = text.rstrip("\n") + f"\n\n## {name}\n\n{block}\n"
        done.append(name)
    tmp = doc.with_name(doc.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(doc)
    return done


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2)
