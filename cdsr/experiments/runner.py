"""Resumable execution of a list of training runs.

Layout under an experiment's folder:

    manifest.json            every run of the experiment: id, labels, config, status, timings
    runs/<run id>/           one trainer output folder (results.json, last.pt, best.pt, train.log)

Why it is resumable: a run's folder name is derived from its config (a readable prefix plus a
hash of every key that changes the result), a run whose results.json exists with the same
config is done and never redone, and an unfinished run restarts from the trainer's per-epoch
checkpoint (`fit(resume=True)`). Killing a sweep and starting the same command again
therefore loses at most the epochs in flight.

Several commands may share one folder (say, one per backbone, started at different times):
a run trains under an exclusive lock on `runs/<id>/.lock` (`flock`, released when its
process ends, however it ends), so a run another process is training is left to it and
reported `busy` instead of being trained twice from one checkpoint; each command analyses
the runs it planned, and manifest.json is the plan of the command that wrote it last (one
command naming every run, e.g. with --analyse-only, rebuilds it for the whole folder).

Runs go to an engine: `local` (default), a process pool (`workers` processes, each with
`threads` torch threads) so that a sweep uses the cores it is given, with one worker in this
process (what a GPU run or a test wants); or `dask` (`dask_engine.py`), Dask distributed
workers on one or many machines sharing the output folder. Each finished run prints one
progress line with the elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import sys
import time
import traceback
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from cdsr.config import RESUMABLE_KEYS, comparable
from cdsr.trainer import CHECKPOINT

MANIFEST = "manifest.json"
RESULTS = "results.json"
RUNS_DIR = "runs"
LOCK = ".lock"


@dataclass
class RunSpec:
    """One training run: `labels` say what it is in the experiment's terms (model, data,
    variant, seed, ...) and are what the analysis groups by; `config` is the full run config
    (`cdsr.config.make_config`)."""

    labels: Dict[str, Any]
    config: Dict[str, Any]
    track_valid: bool = False
    # Alignment regulariser weight applied by the experiment's trainer (`align_reg.py`) for
    # models without their own `align_reg` config key; part of the run's identity.
    align_reg: float = 0.0
    _id: Optional[str] = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        if self._id is None:
            c = self.config
            gca = "gca" + "".join(str(p) for p in c.get("gca_positions") or []) if c.get("gca_positions") else "bare"
            if c.get("scale_to_match"):
                gca += "-matched"
            prefix = f"{c['data']}-{c['model']}-{gca}-h{c.get('hidden')}-s{c['seed']}"
            if self.align_reg:
                prefix += f"-reg{self.align_reg:g}"
            self._id = f"{prefix}-{config_hash(c, self.align_reg)}"
        return self._id


def identity(config: Dict[str, Any]) -> Dict[str, Any]:
    """The keys that change a run's result (device, threads, progress and epochs do not:
    the trainer resumes across them)."""
    return {k: v for k, v in comparable(config).items() if k not in RESUMABLE_KEYS}


def config_hash(config: Dict[str, Any], align_reg: float = 0.0) -> str:
    ident = identity(config)
    if align_reg:
        ident["__experiment_align_reg"] = float(align_reg)
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def atomic_write_json(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_done(spec: RunSpec, run_dir: Path) -> bool:
    """results.json exists for this config and covers the epochs asked for (or stopped early)."""
    res = read_json(run_dir / RESULTS)
    if not res or "config" not in res:
        return False
    old = res["config"]
    if identity(old) != identity(spec.config):
        raise RuntimeError(f"{run_dir / RESULTS} holds a run with a different config than run "
                           f"{spec.run_id}; move that folder away")
    stopped_early = res.get("epochs_run", 0) < old.get("epochs", 0)
    return stopped_early or old.get("epochs", 0) >= spec.config["epochs"]


def brief_metrics(results: Dict[str, Any]) -> Dict[str, Any]:
    """What a progress line and the manifest show of a finished run."""
    test = results.get("test") or {}
    out: Dict[str, Any] = {"n_params": results.get("n_params"), "best_epoch": results.get("best_epoch"),
                           "epochs_run": results.get("epochs_run")}
    for d in ("A", "B"):
        if d in test:
            out[f"ndcg@10_{d}"] = test[d].get("ndcg@10")
    cos = [a["cos_x_xprime"] for a in (results.get("alignment") or {}).values()]
    if cos:
        out["cos_x_xprime"] = sum(cos) / len(cos)
    return out


def run_one(run_dir: str, config: Dict[str, Any], track_valid: bool = False, align_reg: float = 0.0,
            echo: bool = False) -> Dict[str, Any]:
    """Train one run into `run_dir` (resuming it if a checkpoint is there). Never raises for a
    failing run: returns {"status": "failed", "error": ...} and leaves error.txt behind, so that
    one bad configuration does not stop a sweep. `echo` also sends the trainer's epoch lines
    to stderr, prefixed with the run's id (progress inside long runs). A run whose lock
    another process holds is not touched: {"status": "busy", ...}."""
    path = Path(run_dir)
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / LOCK, "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        return {"status": "busy", "wall_s": 0.0,
                "error": f"another process is training this run ({path / LOCK} is locked); left to it"}
    try:
        return _train_locked(path, config, track_valid, align_reg, echo)
    finally:
        lock.close()  # releases the flock


def _train_locked(path: Path, config: Dict[str, Any], track_valid: bool, align_reg: float,
                  echo: bool) -> Dict[str, Any]:
    from cdsr.experiments.probe import ProbedTrainer

    logger = logging.getLogger("cdsr")
    handler = logging.FileHandler(path / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    handlers = [handler]
    if echo:
        live = logging.StreamHandler(sys.stderr)
        live.setFormatter(logging.Formatter(f"%(asctime)s   {path.name}: %(message)s", "%H:%M:%S"))
        handlers.append(live)
    old_level, old_propagate = logger.level, logger.propagate
    for h in handlers:
        logger.addHandler(h)
    logger.setLevel(logging.INFO)
    # The per-run log file holds the epoch lines; the sweep's own output stays one line a run.
    logger.propagate = False
    start = time.perf_counter()
    try:
        trainer = ProbedTrainer(config, path, track_valid=track_valid, align_reg=align_reg)
        results = trainer.fit(resume=(path / CHECKPOINT).is_file())
        if align_reg:
            results["align_reg"] = float(align_reg)
            atomic_write_json(results, path / RESULTS)
        (path / "error.txt").unlink(missing_ok=True)
        return {"status": "done", "wall_s": time.perf_counter() - start, "metrics": brief_metrics(results)}
    except Exception as e:  # noqa: BLE001 - reported per run, the sweep goes on
        (path / "error.txt").write_text(traceback.format_exc())
        return {"status": "failed", "wall_s": time.perf_counter() - start,
                "error": f"{type(e).__name__}: {e}"}
    finally:
        for h in handlers:
            logger.removeHandler(h)
            h.close()
        logger.setLevel(old_level)
        logger.propagate = old_propagate


def _fmt_time(seconds: float) -> str:
    seconds = int(max(0.0, seconds))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}" if h else f"{rem // 60}:{rem % 60:02d}"


def _progress_line(i: int, total: int, run_id: str, outcome: Dict[str, Any], elapsed: float,
                   eta: Optional[float]) -> str:
    width = len(str(total))
    head = f"[{i:>{width}}/{total}] {outcome['status']:<6} {run_id}"
    if outcome["status"] == "done":
        m = outcome.get("metrics") or {}
        parts = [f"ndcg@10 {d} {m[f'ndcg@10_{d}']:.4f}" for d in ("A", "B")
                 if isinstance(m.get(f"ndcg@10_{d}"), float)]
        if "cos_x_xprime" in m:
            parts.append(f"|cos(X,X')| {m['cos_x_xprime']:.3f}")
        detail = "  ".join(parts)
    else:
        detail = outcome.get("error", "")
    tail = f"({outcome.get('wall_s', 0.0):.0f}s) elapsed {_fmt_time(elapsed)}"
    if eta is not None:
        tail += f", ~{_fmt_time(eta)} left"
    return f"{head}  {detail}  {tail}"


def plan_manifest(experiment: str, specs: List[RunSpec], out_dir: Path, meta: Dict[str, Any]) -> Dict[str, Any]:
    ids = [s.run_id for s in specs]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ValueError(f"the run list has duplicate runs (same config twice): {', '.join(dup)}")
    old = read_json(out_dir / MANIFEST) or {}
    old_runs = {r["id"]: r for r in old.get("runs", [])}
    runs = []
    for s in specs:
        entry = {"id": s.run_id, "labels": s.labels, "track_valid": s.track_valid, "config": s.config}
        if s.align_reg:
            entry["align_reg"] = s.align_reg
        prev = old_runs.get(s.run_id, {})
        for key in ("wall_s", "metrics", "error"):
            if key in prev:
                entry[key] = prev[key]
        entry["status"] = "done" if is_done(s, out_dir / RUNS_DIR / s.run_id) else "pending"
        runs.append(entry)
    return {"experiment": experiment, "meta": meta, "runs": runs}


ENGINES = ("local", "dask")


def execute(experiment: str, specs: List[RunSpec], out_dir: os.PathLike | str, workers: int = 1,
            meta: Optional[Dict[str, Any]] = None, stream: Optional[TextIO] = None,
            echo: bool = False, engine: str = "local", scheduler: Optional[str] = None) -> Dict[str, Any]:
    """Run every spec not yet done (in `workers` processes, or on the Dask cluster at
    `scheduler` with engine="dask": without one, a LocalCluster of `workers` processes);
    returns the final manifest. `echo`: also print each run's epoch lines (stderr)."""
    stream = stream or sys.stdout
    if not isinstance(workers, int) or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    out = Path(out_dir).absolute()
    out.mkdir(parents=True, exist_ok=True)
    manifest = plan_manifest(experiment, specs, out, dict(meta or {}))
    by_id = {r["id"]: r for r in manifest["runs"]}
    spec_by_id = {s.run_id: s for s in specs}
    pending = [r["id"] for r in manifest["runs"] if r["status"] != "done"]
    total = len(specs)
    n_done = total_done = total - len(pending)
    atomic_write_json(manifest, out / MANIFEST)
    where = f"on the Dask cluster {scheduler}" if engine == "dask" and scheduler else \
        f"with {workers} {'Dask ' if engine == 'dask' else ''}worker(s)"
    print(f"{experiment}: {total} runs, {n_done} already done, {len(pending)} to run "
          f"{where}; output in {out}", file=stream, flush=True)
    start = time.perf_counter()
    walls: List[float] = []
    finished = 0

    def record(run_id: str, outcome: Dict[str, Any]) -> None:
        nonlocal finished, total_done
        finished += 1
        total_done += 1
        entry = by_id[run_id]
        entry.update({k: v for k, v in outcome.items() if k != "status"})
        entry["status"] = outcome["status"]
        if outcome["status"] == "done":
            entry.pop("error", None)
        if outcome["status"] != "busy":
            walls.append(outcome.get("wall_s", 0.0))
        atomic_write_json(manifest, out / MANIFEST)
        left = len(pending) - finished
        eta = (sum(walls) / len(walls)) * left / workers if left and walls else None
        print(_progress_line(total_done, total, run_id, outcome, time.perf_counter() - start, eta),
              file=stream, flush=True)

    def args_of(run_id: str):
        s = spec_by_id[run_id]
        return str(out / RUNS_DIR / run_id), s.config, s.track_valid, s.align_reg, echo

    if engine == "dask":
        from cdsr.experiments import dask_engine

        dask_engine.run_all([(run_id, run_one, args_of(run_id)) for run_id in pending], record,
                            scheduler=scheduler, workers=workers)
    elif workers == 1 or len(pending) <= 1:
        for run_id in pending:
            record(run_id, run_one(*args_of(run_id)))
    else:
        # spawn: a forked child would inherit the parent's torch thread pools mid-state.
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"))
        try:
            queue = list(pending)
            running = {}
            while queue or running:
                while queue and len(running) < workers:
                    run_id = queue.pop(0)
                    running[pool.submit(run_one, *args_of(run_id))] = run_id
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    run_id = running.pop(fut)
                    try:
                        outcome = fut.result()
                    except Exception as e:  # noqa: BLE001 - a crashed worker process
                        outcome = {"status": "failed", "error": f"worker crashed: {type(e).__name__}: {e}"}
                    record(run_id, outcome)
        except BaseException:
            # Interrupted (Ctrl-C): stop the workers now rather than wait for their runs; the
            # runs in flight keep their last epoch checkpoint and resume on the next start.
            for proc in list(getattr(pool, "_processes", {}).values()):
                proc.terminate()
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    failed = [r["id"] for r in manifest["runs"] if r["status"] == "failed"]
    busy = [r["id"] for r in manifest["runs"] if r["status"] == "busy"]
    n_done = sum(r["status"] == "done" for r in manifest["runs"])
    print(f"{experiment}: {n_done}/{total} runs done"
          + (f", {len(failed)} failed (see runs/<id>/error.txt): {', '.join(failed)}" if failed else "")
          + (f", {len(busy)} busy in another process (start the command again once they finish): "
             f"{', '.join(busy)}" if busy else "")
          + f"; {_fmt_time(time.perf_counter() - start)} this session", file=stream, flush=True)
    return manifest


def load_results(out_dir: os.PathLike | str, manifest: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """The finished runs of `manifest` (default: the folder's manifest.json), each {"id",
    "labels", "results"}, in manifest order."""
    out = Path(out_dir)
    if manifest is None:
        manifest = read_json(out / MANIFEST)
    if manifest is None:
        raise FileNotFoundError(f"no {MANIFEST} in {out}: run the experiment first")
    rows = []
    for r in manifest["runs"]:
        res = read_json(out / RUNS_DIR / r["id"] / RESULTS)
        if res is not None and identity(res.get("config", {})) == identity(r["config"]):
            rows.append({"id": r["id"], "labels": r["labels"], "results": res})
    return rows
