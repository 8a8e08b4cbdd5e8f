"""`cdsr experiment {table,alignment,scaling,protocol,report}` (also `python -m cdsr.experiments ...`).

Each experiment plans its list of runs from a preset (`--preset tiny|cpu|paper`) and the
options given, runs the ones not done yet (resumable: run the same command again after a
kill), then analyses every finished run into `<out>/report.md`, `<out>/summary.json` and
PNG figures. `--dry-run` lists the runs; `--analyse-only` rebuilds the report from the runs
already finished. `protocol` trains nothing: it compares finished runs of candidate schedules
with reference runs (`protocol.py`). `report` rebuilds docs/results.md's generated tables
from the summary.json files committed under docs/results/<name>/.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

from cdsr.config import ConfigError, available_cores
from cdsr.dataset import DataError
from cdsr.experiments import alignment, protocol, report, scaling, table
from cdsr.experiments.common import PRESETS, check_models, default_models, preset
from cdsr.experiments.runner import execute, load_results, plan_manifest, atomic_write_json, MANIFEST

EXPERIMENTS = {"table": table, "alignment": alignment, "scaling": scaling}
# What `report` can rebuild: the experiments, and `protocol`'s comparison of finished runs.
REPORTABLE = {**EXPERIMENTS, "protocol": protocol}


def _positions(text: str) -> List[int]:
    try:
        return [int(p) for p in text.replace(" ", "").split(",") if p != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"GCA positions look like 0 or 0,1; got {text!r}") from None


def _on_off(text: str) -> bool:
    low = text.lower()
    if low in ("on", "true", "1", "yes"):
        return True
    if low in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


def _per_preset(fn) -> str:
    """`tiny X, cpu Y, paper Z` of a preset-derived default."""
    return ", ".join(f"{name} {fn(name)}" for name in PRESETS)


def _preset_value(name: str, experiment: str, key: str):
    p = PRESETS[name]
    return p.get(experiment, {}).get(key, p.get(key))


def _words(v) -> str:
    return " ".join(str(x) for x in v) if isinstance(v, (list, tuple)) else str(v)


def _common(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--preset", default="paper", choices=tuple(PRESETS),
                   help="defaults for models, data, seeds, epochs: tiny (CI, synthetic, seconds), cpu (short "
                        "real-data runs), paper (the paper's protocol) (default: paper)")
    p.add_argument("--models", nargs="+", default=None, metavar="M",
                   help="backbones (default: the preset's: " + _per_preset(lambda n: "+".join(default_models(n))) + ")")
    p.add_argument("--data", nargs="+", default=None, metavar="D",
                   help="datasets: synthetic, abe, afk, csv (default: the preset's: "
                        + _per_preset(lambda n: "+".join(PRESETS[n]["data"])) + ")")
    p.add_argument("--seeds", nargs="+", type=int, default=None, metavar="S",
                   help="seeds (default: the preset's: " + _per_preset(lambda n: _words(_preset_value(n, name, "seeds")))
                        + ")")
    p.add_argument("--epochs", type=int, default=None, metavar="E",
                   help="max epochs per run, early stopping may end sooner (default: the preset's: "
                        + _per_preset(lambda n: _preset_value(n, name, "epochs")) + ")")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the runs train (default: cpu)")
    p.add_argument("--workers", type=int, default=None, metavar="W",
                   help=f"runs in parallel (default: 1 on cuda, else the available cores, here {available_cores()})")
    p.add_argument("--engine", default="local", choices=("local", "dask"),
                   help="where runs execute: local (a process pool of --workers) or dask (Dask distributed: the "
                        "cluster at --scheduler, else a LocalCluster of --workers processes) (default: local)")
    p.add_argument("--scheduler", default=None, metavar="ADDR",
                   help="Dask scheduler address, e.g. tcp://host:8786, with --engine dask; every worker must see "
                        "--out and the data at the same paths (default: none)")
    p.add_argument("--threads", type=int, default=None, metavar="T",
                   help="torch threads per run (default: available cores // workers)")
    p.add_argument("--out", default=None, metavar="DIR", help=f"output folder (default: runs/experiments/{name})")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="config override for every run (repeatable), e.g. --set lr=3e-4 (default: none)")
    p.add_argument("--quiet", action="store_true", help="one line per finished run only (no epoch lines)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and exit")
    p.add_argument("--analyse-only", action="store_true", help="do not train: report on the runs already finished")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add `experiment` (with `table`, `alignment`, `scaling`) to a `cdsr` sub-parser set."""
    exp = subparsers.add_parser("experiment", help="reproduce the paper's tables, alignment and scaling findings")
    sub = exp.add_subparsers(dest="experiment", required=True, metavar="{table,alignment,scaling,protocol,report}")

    t = sub.add_parser("table", help="bare vs GCA_early vs GCA_stack, per backbone and dataset, over seeds")
    _common(t, "table")
    t.add_argument("--stack", nargs="+", type=int, default=[0, 1], metavar="I",
                   help="GCA positions of the GCA_stack variant (default: 0 1)")
    t.add_argument("--variants", nargs="+", default=list(table.VARIANTS), metavar="V",
                   help="which of bare, GCA_early, GCA_stack to run, e.g. bare GCA_early for "
                        "LLM4CDSR's cells or bare for a protocol search (default: all three)")

    a = sub.add_parser("alignment", help="sweep GCA settings; |cos(X,X')| vs NDCG@10, its distribution, per-epoch curves")
    _common(a, "alignment")
    a.add_argument("--positions", nargs="+", type=_positions, default=None, metavar="P",
                   help="GCA position sets to sweep, e.g. 0 1 2 0,1 (default: each position of the model alone)")
    a.add_argument("--hidden", nargs="+", type=int, default=None, metavar="N",
                   help="hidden sizes (default: the preset's: "
                        + _per_preset(lambda n: _words(PRESETS[n]["alignment"]["hidden"])) + ")")
    a.add_argument("--heads", nargs="+", type=int, default=None, metavar="H",
                   help="GCA heads (default: the preset's: "
                        + _per_preset(lambda n: _words(PRESETS[n]["alignment"]["heads"])) + ")")
    a.add_argument("--activations", nargs="+", default=["sigmoid", "tanh"], choices=("sigmoid", "tanh"),
                   help="gate activations to sweep (default: sigmoid tanh)")
    a.add_argument("--layer-norm", nargs="+", type=_on_off, default=[True, False], metavar="on|off",
                   help="GCA LayerNorm settings to sweep (default: on off)")
    a.add_argument("--sample", type=int, default=None, metavar="N",
                   help="runs per backbone and dataset, drawn from the full grid, 0 = the whole grid (default: the "
                        "preset's: " + _per_preset(lambda n: PRESETS[n]["alignment"]["sample"]) + ")")
    a.add_argument("--track", type=int, default=None, metavar="K",
                   help="runs per backbone and dataset whose validation metrics are kept every epoch (default: the "
                        "preset's: " + _per_preset(lambda n: PRESETS[n]["alignment"]["track"]) + ")")
    a.add_argument("--align-reg", nargs="+", type=float, default=[0.0], metavar="L",
                   help="alignment regulariser weights to sweep: training loss + L*|cos(X,X')| (L > 0 pushes "
                        "toward orthogonality, L < 0 away) (default: 0 = off)")

    s = sub.add_parser("scaling", help="bare backbone at several widths vs backbone + GCA_early: NDCG@10 vs parameters")
    _common(s, "scaling")
    s.add_argument("--widths", nargs="+", type=int, default=None, metavar="N",
                   help="values of --width-key (default: the preset's: "
                        + _per_preset(lambda n: _words(PRESETS[n]["scaling"]["widths"])) + ")")
    s.add_argument("--width-key", default="hidden", metavar="KEY", help="config key that sets the width (default: hidden)")
    s.add_argument("--matched", dest="matched", action="store_true", default=None,
                   help="also run the parameter-matched bare baseline (scale_to_match) (default: on when every "
                        "backbone has the key)")
    s.add_argument("--no-matched", dest="matched", action="store_false", help="no parameter-matched baseline")
    pr = sub.add_parser("protocol", help="compare finished runs of cheaper schedules with reference runs "
                                         "(epochs, test and validation NDCG@10; chosen on validation)")
    pr.add_argument("--reference", required=True, metavar="DIR",
                    help="experiment folder of the reference runs (e.g. table --preset paper --variants bare)")
    pr.add_argument("--candidates", nargs="+", required=True, metavar="DIR",
                    help="experiment folders of the same runs under candidate schedules (--set overrides), "
                         "one protocol per folder")
    pr.add_argument("--out", default=None, metavar="DIR", help="output folder (default: runs/experiments/protocol)")
    r = sub.add_parser("report", help="rebuild docs/results.md's generated tables from docs/results/<name>/summary.json")
    r.add_argument("--results", default="docs/results", metavar="DIR",
                   help="folder of <name>/summary.json, each an experiment's summary.json copied there "
                        "(default: docs/results)")
    r.add_argument("--doc", default="docs/results.md", metavar="FILE",
                   help="markdown file whose <!-- results:NAME --> blocks are rewritten; a summary without "
                        "one gets a section appended (default: docs/results.md)")
    return exp


def _resources(args) -> tuple:
    cores = available_cores()
    workers = args.workers if args.workers is not None else (1 if args.device == "cuda" else cores)
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    threads = args.threads if args.threads is not None else max(1, cores // workers)
    if threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {threads}")
    return workers, threads, cores


def plan(args) -> Dict[str, Any]:
    name = args.experiment
    p = preset(args.preset)
    models_ = check_models(args.models) if args.models else default_models(args.preset)
    datasets = args.data or p["data"]
    epochs = args.epochs if args.epochs is not None else p.get(name, {}).get("epochs", p["epochs"])
    if epochs < 1:
        raise ConfigError(f"--epochs must be >= 1, got {epochs}")
    if args.scheduler and args.engine != "dask":
        raise ConfigError("--scheduler needs --engine dask")
    workers, threads, cores = _resources(args)
    # Fail once, up front, for what would fail every run: a device or data that is not here.
    from cdsr.distributed import resolve_device
    from cdsr.loaders import check_data_source

    resolve_device(args.device)
    common = dict(preset_name=args.preset, epochs=epochs, device=args.device, threads=threads, sets=args.set)
    if name == "table":
        seeds = args.seeds or p["seeds"]
        specs = table.plan(models_, datasets, seeds, stack=args.stack, variants=args.variants, **common)
    elif name == "alignment":
        pa = p["alignment"]
        specs = alignment.plan(
            models_, datasets, positions=args.positions, hidden=args.hidden or pa["hidden"],
            heads=args.heads or pa["heads"], activations=args.activations, layer_norms=args.layer_norm,
            seeds=args.seeds or pa["seeds"], align_regs=args.align_reg,
            sample=pa["sample"] if args.sample is None else args.sample,
            track=pa["track"] if args.track is None else args.track, **common)
    elif name == "scaling":
        ps = p["scaling"]
        from cdsr.config import valid_keys

        matched = args.matched
        if matched is None:
            matched = all("scale_to_match" in valid_keys(m) for m in models_)
        specs = scaling.plan(models_, datasets, args.seeds or ps["seeds"], widths=args.widths or ps["widths"],
                             width_key=args.width_key, matched=matched, **common)
    else:
        raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(EXPERIMENTS)}")
    for spec in specs:
        check_data_source(spec.config)
    argv = getattr(args, "argv", None)
    argv = sys.argv[1:] if argv is None else argv
    meta = {"command": "cdsr " + " ".join(shlex.quote(a) for a in argv),
            "preset": args.preset, "engine": args.engine, "scheduler": args.scheduler, "workers": workers,
            "threads": threads, "cpu_count": cores, "sets": args.set}
    return {"specs": specs, "workers": workers, "meta": meta}


@contextlib.contextmanager
def _exit_on_sigterm():
    """While the sweep runs, `kill PID` raises SystemExit in it, which stops its worker
    processes (the default SIGTERM would leave them finishing their runs with no one to
    record them). The previous handler is restored afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def handle(args: argparse.Namespace) -> int:
    """Run (or, with --analyse-only, only report on) the experiment named by args.experiment."""
    name = args.experiment
    if name == "report":
        done = report.rebuild_doc(Path(args.results), Path(args.doc), REPORTABLE)
        print(f"{args.doc}: rebuilt {', '.join(done)} from {args.results}/<name>/summary.json")
        return 0
    if name == "protocol":
        manifest, rows = protocol.collect(args.reference, args.candidates)
        if not rows:
            raise ConfigError("--reference/--candidates: no finished run in those folders")
        out = Path(args.out) if args.out else Path("runs") / "experiments" / name
        out.mkdir(parents=True, exist_ok=True)
        path = report.write(out, name, manifest, rows, protocol.analyse(rows, out))
        print(f"report: {path}  (summary.json)")
        return 0
    try:
        planned = plan(args)
    except DataError:
        raise
    except ValueError as e:
        # Planning only validates what the user asked for: report it as a usage error (the
        # `cdsr` front end prints ConfigError as one line, no traceback).
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from None
    specs, workers, meta = planned["specs"], planned["workers"], planned["meta"]
    out = Path(args.out) if args.out else Path("runs") / "experiments" / name
    if args.dry_run:
        for s in specs:
            print(f"{s.run_id}  {s.labels}")
        print(f"{name}: {len(specs)} runs planned into {out}")
        return 0
    if args.analyse_only:
        out.mkdir(parents=True, exist_ok=True)
        manifest = plan_manifest(name, specs, out, meta)
        atomic_write_json(manifest, out / MANIFEST)
    else:
        with _exit_on_sigterm():
            manifest = execute(name, specs, out, workers=workers, meta=meta, echo=not args.quiet,
                               engine=args.engine, scheduler=args.scheduler)
    rows = load_results(out, manifest)  # this command's runs, whatever else shares the folder
    analysis = EXPERIMENTS[name].analyse(rows, out) if rows else {"markdown": "", "figures": []}
    path = report.write(out, name, manifest, rows, analysis)
    print(f"report: {path}  (summary.json, figures: "
          f"{', '.join(f['file'] for f in analysis.get('figures', []) if f['file']) or 'none'})")
    failed = [r for r in manifest["runs"] if r["status"] == "failed"]
    return 1 if failed else 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from cdsr.cli import Parser

    parser = Parser(prog="python -m cdsr.experiments",
                    description="Reproduce the paper's experiments (same as `cdsr experiment`).")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{experiment}")
    add_parser(sub)
    # Also accept the experiment name directly: `python -m cdsr.experiments table ...`.
    if argv and (argv[0] in EXPERIMENTS or argv[0] in ("protocol", "report")):
        argv = ["experiment"] + argv
    args = parser.parse_args(argv)
    args.argv = argv
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")
    try:
        return handle(args)
    except (ConfigError, ValueError, OSError) as e:
        if args.verbose:
            raise
        what = "" if isinstance(e, ValueError) else f"{type(e).__name__}: "
        print(f"cdsr experiment: error: {what}{' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdsr experiment: interrupted", file=sys.stderr)
        return 130
