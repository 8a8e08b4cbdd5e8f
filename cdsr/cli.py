"""Command line: `cdsr train`, `cdsr evaluate`, `cdsr data stats` (also `python -m cdsr`).

Named options cover the common settings; `--set key=value` reaches every pipeline and model
hyper-parameter (`cdsr train --model M --list-config` lists them with their defaults).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import json
import logging
import os
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import models
from cdsr import config as config_mod
from cdsr.config import DATA_NAMES, RESUMABLE_KEYS, ConfigError
from cdsr.dataset import DataError

log = logging.getLogger("cdsr")

# Named option -> config key (None values mean "not given": keep the default).
NAMED = {
    "data": "data", "data_dir": "data_dir", "csv_a": "csv_a", "csv_b": "csv_b", "csv_order": "csv_order",
    "cache_dir": "cache_dir", "gca": "gca_positions", "gca_activation": "gca_activation",
    "gca_layernorm": "gca_layer_norm", "heads": "gca_heads", "hidden": "hidden", "seed": "seed",
    "epochs": "epochs", "device": "device", "batch_size": "batch_size", "lr": "lr",
    "scale_to_match": "scale_to_match",
}


def _setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(message)s", datefmt="%H:%M:%S")


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors: `cdsr train: error: ... (see cdsr train --help)`
    instead of the usage block followed by the message. Sub-parsers inherit the class."""

    def error(self, message: str):  # noqa: D401 - argparse's hook
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _defaults_text(key: str, fmt=str) -> str:
    """`default: X` for a config key, or each model's value where the models disagree."""
    per_model = {m: config_mod.valid_keys(m)[key] for m in _models_with(key)}
    if not per_model:
        return f"default: {fmt(config_mod.PIPELINE_DEFAULTS[key])}"
    values = list(per_model.values())
    if all(v == values[0] for v in values):
        return f"default: {fmt(values[0])}"
    return "default: " + ", ".join(f"{m} {fmt(v)}" for m, v in per_model.items())


def _models_with(key: str) -> List[str]:
    return [m for m in models.MODEL_NAMES if key in config_mod.valid_keys(m)]


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="D",
                   help=f"dataset: {', '.join(DATA_NAMES)} (default: {config_mod.PIPELINE_DEFAULTS['data']})")
    p.add_argument("--data-dir", default=None, metavar="P",
                   help="folder of an ABXI-format dataset (default: $CDSR_DATA_DIR/<name>, else "
                        "../shared/data/amazon/<name>)")
    p.add_argument("--csv-a", default=None, metavar="PATH",
                   help="raw ratings CSV of domain A, for --data csv (default: none; required there)")
    p.add_argument("--csv-b", default=None, metavar="PATH",
                   help="raw ratings CSV of domain B, for --data csv (default: none; required there)")
    p.add_argument("--csv-order", default=None, choices=("auto", "user-item", "item-user"),
                   help="column order of the CSVs: user-item (2014), item-user (2018), auto (default: auto)")
    p.add_argument("--cache-dir", default=None, metavar="P",
                   help="cache of preprocessed CSV data (default: $CDSR_CACHE_DIR, else ~/.cache/cdsr)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set lr=3e-4 --set syn_signal=0.3 "
                        "(default: none; `cdsr train --model M --list-config` lists the keys and defaults)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cdsr", description="Cross-domain sequential recommendation with GCA.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging; tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,data,experiment}")
    d_ = config_mod.PIPELINE_DEFAULTS

    t = sub.add_parser("train", help="train and evaluate a model (writes results.json)")
    t.add_argument("--model", default="sasrec", metavar="M",
                   help=f"backbone: {', '.join(models.MODEL_NAMES)}; --set model=M overrides it (default: sasrec)")
    t.add_argument("--preset", default=None, choices=("tiny", "cpu", "paper"),
                   help="start from an experiment preset's settings for this model and data, e.g. paper = the "
                        "ABXI authors' schedule, negatives and optimiser (cdsr/experiments/common.py); named "
                        "options and --set override them (default: none)")
    _data_options(t)
    t.add_argument("--gca", type=int, nargs="*", default=None, metavar="I",
                   help="GCA positions, e.g. --gca 0 or --gca 0 1 (default: none = the bare backbone)")
    t.add_argument("--gca-activation", default=None, choices=("sigmoid", "tanh"),
                   help=f"gate activation of the GCA modules ({_defaults_text('gca_activation')})")
    t.add_argument("--gca-layernorm", dest="gca_layernorm", action="store_true", default=None,
                   help="LayerNorm after each GCA module (default: on)")
    t.add_argument("--no-gca-layernorm", dest="gca_layernorm", action="store_false",
                   help="no LayerNorm after the GCA modules")
    t.add_argument("--heads", type=int, default=None, metavar="H",
                   help=f"GCA attention heads ({_defaults_text('gca_heads')})")
    t.add_argument("--hidden", type=int, default=None, metavar="N", help=f"hidden size ({_defaults_text('hidden')})")
    t.add_argument("--scale-to-match", type=int, nargs="+", default=None, metavar="I",
                   help="parameter-matched baseline: widen the bare backbone to the parameter count "
                        "of backbone + GCA at these positions, e.g. --scale-to-match 0 (default: none; "
                        f"models with it: {', '.join(_models_with('scale_to_match'))})")
    t.add_argument("--seed", type=int, default=None, metavar="S", help=f"random seed (default: {d_['seed']})")
    t.add_argument("--epochs", type=int, default=None, metavar="E",
                   help=f"at most this many epochs; early stopping may end sooner ({_defaults_text('epochs')})")
    t.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help=f"training users per step ({_defaults_text('batch_size')})")
    t.add_argument("--lr", type=float, default=None, help=f"learning rate ({_defaults_text('lr', lambda v: f'{v:g}')})")
    t.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help=f"where to train; CPU runs use every available core unless --set threads=N "
                        f"(default: {d_['device']})")
    t.add_argument("--out", default=None, metavar="DIR",
                   help="run folder (default: runs/<data>-<model>-<gca>-s<seed> followed by the settings "
                        "that differ from the defaults, e.g. runs/synthetic-sasrec-gca0-s0-hidden=32)")
    t.add_argument("--resume", action="store_true",
                   help="continue the run in the run folder from its last checkpoint (default: off; a fresh run "
                        "never replaces a run of another config)")
    t.add_argument("--list-config", action="store_true", help="print every config key with its value and exit")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation and test splits")
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="best.pt or last.pt of a run (required)")
    e.add_argument("--data-dir", default=None, metavar="P",
                   help="data folder (default: the one recorded in the checkpoint)")
    e.add_argument("--device", default=None, choices=("cpu", "cuda"),
                   help="where to evaluate (default: the one recorded in the checkpoint)")
    e.add_argument("--json", action="store_true", help="print the metrics as JSON (default: a table)")

    d = sub.add_parser("data", help="dataset utilities")
    dsub = d.add_subparsers(dest="data_command", required=True, metavar="{stats}")
    s = dsub.add_parser("stats", help="print a dataset's size and density")
    _data_options(s)
    # The paper's experiments live one layer up (cdsr.experiments calls the trainer); they are
    # imported here so `cdsr experiment ...` and `python -m cdsr.experiments ...` are one CLI.
    from cdsr.experiments.cli import add_parser as add_experiment_parser
    add_experiment_parser(sub)
    return parser


def _overrides(args: argparse.Namespace) -> Dict[str, Any]:
    out = {}
    for opt, key in NAMED.items():
        v = getattr(args, opt, None)
        if v is not None:
            out[key] = v
    return out


# Short names of config keys in run folder names.
_NAME_ALIASES = {"gca_heads": "heads", "synthetic_preset": "preset"}
# Already in the folder name's prefix.
_NAME_PREFIX_KEYS = {"data", "model", "gca_positions", "scale_to_match", "seed"}
_NAME_SAFE = re.compile(r"^[A-Za-z0-9._+,=-]+$")
_NAME_MAX = 80


def _name_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return ",".join(_name_value(x) for x in v)
    return str(v)


def default_out(cfg: Dict[str, Any]) -> Path:
    """runs/<data>-<model>-<gca>-s<seed>, then `-key=value` for every setting that changes the
    result and differs from the defaults of that model on that data (keys in alphabetical
    order). Settings whose values do not fit a folder name (paths) or that would make it longer
    than 80 characters are folded into one `-cfg<hash>` of them. Runs whose configs differ
    therefore get different folders; device, threads, epochs and data paths are not part of
    the name (a run continued with more epochs is the same run: --resume)."""
    if cfg["gca_positions"]:
        variant = "gca" + "".join(str(p) for p in cfg["gca_positions"])
    elif cfg.get("scale_to_match"):
        variant = "matched" + "".join(str(p) for p in cfg["scale_to_match"])
    else:
        variant = "base"
    name = f"{cfg['data']}-{cfg['model']}-{variant}-s{cfg['seed']}"
    base = config_mod.default_config(cfg)
    differing = sorted(k for k in cfg if k not in RESUMABLE_KEYS and k not in _NAME_PREFIX_KEYS
                       and cfg[k] != base.get(k))
    hashed: Dict[str, Any] = {}
    for k in differing:
        part = f"-{_NAME_ALIASES.get(k, k)}={_name_value(cfg[k])}"
        if _NAME_SAFE.match(part[1:]) and len(name) + len(part) <= _NAME_MAX:
            name += part
        else:
            hashed[k] = cfg[k]
    if hashed:
        digest = hashlib.sha1(json.dumps(hashed, sort_keys=True, default=str).encode()).hexdigest()[:8]
        name += f"-cfg{digest}"
    return Path("runs") / name


@contextlib.contextmanager
def _run_log(path: Path, append: bool, first_line: str = "") -> Iterator[None]:
    """Also write the run's log lines (pipeline and models) to `path` (train.log), after
    `first_line` (the command; in the file only)."""
    handler = logging.FileHandler(path, mode="a" if append else "w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%Y-%m-%d %H:%M:%S"))
    handler.setLevel(logging.INFO)
    if first_line:
        handler.handle(logging.makeLogRecord({"msg": first_line, "levelname": "INFO", "levelno": logging.INFO}))
    loggers = [logging.getLogger("cdsr"), logging.getLogger("models")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        if lg.getEffectiveLevel() > logging.INFO:  # the file gets INFO whatever stderr shows
            lg.setLevel(logging.INFO)
    try:
        yield
    except BaseException as e:
        msg = f"failed: {type(e).__name__}: {' '.join(str(e).split())}"
        handler.handle(logging.makeLogRecord({"msg": msg, "levelname": "ERROR", "levelno": logging.ERROR}))
        raise
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
        handler.close()


def _set_value(sets: List[str], key: str) -> Optional[str]:
    """The last `--set key=VALUE` text for `key`, or None."""
    found = None
    for item in sets:
        k, _, v = item.partition("=")
        if k.strip() == key:
            found = v.strip()
    return found


def train_config(args: argparse.Namespace) -> Dict[str, Any]:
    """`cdsr train`'s run config: model defaults <- --preset's settings for (model, data) <-
    named options <- --set. The model and data may come from --set model=M / data=D."""
    model = _set_value(args.set, "model") or args.model
    overrides = _overrides(args)
    if getattr(args, "preset", None):
        from cdsr.experiments.common import PRESETS, preset_settings

        data = _set_value(args.set, "data") or overrides.get("data") or config_mod.PIPELINE_DEFAULTS["data"]
        overrides = {"epochs": PRESETS[args.preset]["epochs"], **preset_settings(args.preset, model, data), **overrides}
    return config_mod.make_config(model, overrides, [s for s in args.set if s.partition("=")[0].strip() != "model"])


def cmd_train(args: argparse.Namespace) -> int:
    from cdsr.distributed import init_from_env, resolve_device
    from cdsr.trainer import LOG, Trainer, check_run_dir, format_table

    cfg = train_config(args)
    if args.list_config:
        print(json.dumps(cfg, indent=2))
        return 0
    out = Path(args.out) if args.out else default_out(cfg)
    resolve_device(cfg["device"])
    # Before anything is written: a fresh run never replaces a run of another config.
    check_run_dir(out, cfg, args.resume)
    ctx = init_from_env(cfg["device"])
    trainer = None
    try:
        log_ctx: Any = contextlib.nullcontext()
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            command = "cdsr " + " ".join(shlex.quote(a) for a in getattr(args, "argv", []))
            log_ctx = _run_log(out / LOG, append=args.resume, first_line=command)
        with log_ctx:
            t0 = time.perf_counter()
            trainer = Trainer(cfg, out, ctx=ctx)
            results = trainer.fit(resume=args.resume)
        if ctx.is_main:
            print(f"{cfg['model']} on {results['data']} (gca {cfg['gca_positions'] or 'none'}, seed {cfg['seed']}, "
                  f"{results['n_params']:,} params, world {ctx.world_size}): best epoch {results['best_epoch']}"
                  f"/{results['epochs_run']}, {time.perf_counter() - t0:.1f}s")
            print(format_table(results))
            for name, a in results["alignment"].items():
                print(f"alignment {name}: |cos(X,X')| {a['cos_x_xprime']:.4f}  |cos(X,Y)| {a['cos_x_y']:.4f}")
            print(f"results: {out / 'results.json'}  (log: {out / LOG})")
        # Every rank reaches here before any tears down its process group: a rank that
        # destroys its gloo context while a peer still has a collective in flight aborts
        # the peer at exit ("terminate called without an active exception"). Not on the
        # exception path, where a peer may never arrive.
        ctx.barrier()
    finally:
        # The DDP wrapper keeps the gloo process group alive past destroy_process_group; left
        # to interpreter shutdown, the group's worker threads were torn down with Python half
        # gone and a rank aborted now and then ("terminate called without an active
        # exception", SIGABRT). Drop it, and collect, while everything is still alive.
        del trainer
        gc.collect()
        ctx.close()
    if ctx.enabled:
        # Even so, the torchrun test still failed now and then at exit (gloo's threads at
        # interpreter finalization; PyTorch issue #190489, PR #179291). Everything this worker
        # had to do is done and written: leave without interpreter finalization, after
        # flushing what is buffered, so the launcher sees exit status 0.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    import torch

    from cdsr.batching import build_eval_set
    from cdsr.distributed import DistContext, resolve_device
    from cdsr.loaders import load_dataset
    from cdsr.trainer import build_model_for_data, evaluate, format_table, gathered_alignment, read_checkpoint

    path = Path(args.checkpoint)
    ck = read_checkpoint(path)
    cfg = dict(ck["config"])
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    if args.device:
        cfg["device"] = args.device
    ctx = DistContext(device=resolve_device(cfg["device"]))
    torch.set_num_threads(config_mod.resolve_threads(cfg))
    ds = load_dataset(cfg)
    if (ds.n_items_a, ds.n_items_b) != (ck["n_items_a"], ck["n_items_b"]):
        raise DataError(f"the dataset has {ds.n_items_a}/{ds.n_items_b} items but the checkpoint was trained "
                        f"on {ck['n_items_a']}/{ck['n_items_b']}")
    model = build_model_for_data(cfg, ds, ctx.device)
    try:
        model.load_state_dict(ck["model_state"])
    except (RuntimeError, TypeError, AttributeError) as e:
        reason = (str(e).strip().splitlines() or [""])[0][:120]
        raise DataError(f"--checkpoint {path}: its weights do not fit the {cfg['model']} its config describes "
                        f"({reason})") from None
    results: Dict[str, Any] = {"checkpoint": str(path), "epoch": ck.get("epoch")}
    for split in ("valid", "test"):
        es = build_eval_set(ds, split, cfg["eval_negatives"], cfg["eval_seed"])
        model.reset_alignment()
        results[split] = evaluate(model, ds, es, cfg, ctx)
    results["alignment"] = gathered_alignment(model, ctx)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"{cfg['model']} on {ds.name}, checkpoint {path} (epoch {ck.get('epoch')})")
        print(format_table(results))
        for name, a in results["alignment"].items():
            print(f"alignment {name}: |cos(X,X')| {a['cos_x_xprime']:.4f}  |cos(X,Y)| {a['cos_x_y']:.4f}")
    return 0


def cmd_data_stats(args: argparse.Namespace) -> int:
    from cdsr.loaders import load_dataset

    cfg = config_mod.make_config("sasrec", _overrides(args), args.set)
    print(load_dataset(cfg).format_stats())
    return 0


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text or type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = argv
    _setup_logging(args.verbose)
    try:
        if args.command == "train":
            return cmd_train(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        if args.command == "experiment":
            from cdsr.experiments.cli import handle as run_experiment
            return run_experiment(args)
        if args.command == "data" and args.data_command == "stats":
            return cmd_data_stats(args)
    except BrokenPipeError:
        # `cdsr ... | head`: the reader left; stop quietly (and keep Python from reporting the
        # failed flush of stdout at exit).
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (ConfigError, DataError, OSError, FloatingPointError) as e:
        # Usage, data and file problems: one line, no traceback (-v shows it).
        if args.verbose:
            raise
        what = "" if isinstance(e, (ConfigError, DataError)) else f"{type(e).__name__}: "
        print(f"cdsr: error: {what}{_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cdsr: interrupted", file=sys.stderr)
        return 130
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
