"""An experiment's `report.md` and `summary.json`: what ran, then the analysis."""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path
from typing import Any, Dict, List

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
                              **(analysis.get("summary") or {})}), out_dir / "summary.json")
    return path


def dumps(obj: Any) -> str:
    return json.dumps(_clean(obj), indent=2)
