"""Command line: `cdsr train`, `cdsr evaluate`, `cdsr data stats` (also `python -m cdsr`).

Named options cover the common settings; `--set key=value` reaches every pipeline and model
hyper-parameter (`cdsr train --model M --list-config` lists them with their defaults).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import models
from cdsr import config as config_mod
from cdsr.config import DATA_NAMES, ConfigError
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


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default=None, metavar="D",
                   help=f"dataset: {', '.join(DATA_NAMES)} (default synthetic)")
    p.add_argument("--data-dir", default=None, metavar="P",
                   help="folder of an ABXI-format dataset (default $CDSR_DATA_DIR/<name> or ../shared/data/amazon/<name>)")
    p.add_argument("--csv-a", default=None, metavar="PATH", help="raw ratings CSV of domain A (--data csv)")
    p.add_argument("--csv-b", default=None, metavar="PATH", help="raw ratings CSV of domain B (--data csv)")
    p.add_argument("--csv-order", default=None, choices=("auto", "user-item", "item-user"),
                   help="column order of the CSVs: user-item (2014), item-user (2018), auto (default)")
    p.add_argument("--cache-dir", default=None, metavar="P", help="cache of preprocessed CSV data (default ~/.cache/cdsr)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any config key (repeatable), e.g. --set lr=3e-4 --set syn_signal=0.3")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cdsr", description="Cross-domain sequential recommendation with GCA.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{train,evaluate,data,experiment}")

    t = sub.add_parser("train", help="train and evaluate a model (writes results.json)")
    t.add_argument("--model", default="sasrec", metavar="M", help=f"backbone: {', '.join(models.MODEL_NAMES)}")
    _data_options(t)
    t.add_argument("--gca", type=int, nargs="*", default=None, metavar="I",
                   help="GCA positions, e.g. --gca 0 or --gca 0 1 (none = bare backbone)")
    t.add_argument("--gca-activation", default=None, choices=("sigmoid", "tanh"))
    t.add_argument("--gca-layernorm", dest="gca_layernorm", action="store_true", default=None)
    t.add_argument("--no-gca-layernorm", dest="gca_layernorm", action="store_false")
    t.add_argument("--heads", type=int, default=None, metavar="H", help="GCA attention heads")
    t.add_argument("--hidden", type=int, default=None, metavar="N", help="hidden size")
    t.add_argument("--scale-to-match", type=int, nargs="+", default=None, metavar="I",
                   help="parameter-matched baseline: widen the bare backbone to the parameter count "
                        "of backbone + GCA at these positions (e.g. --scale-to-match 0)")
    t.add_argument("--seed", type=int, default=None, metavar="S")
    t.add_argument("--epochs", type=int, default=None, metavar="E")
    t.add_argument("--batch-size", type=int, default=None, metavar="B")
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--device", default=None, choices=("cpu", "cuda"))
    t.add_argument("--out", default=None, metavar="DIR", help="run folder (default runs/<data>-<model>-gca..-s<seed>)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    t.add_argument("--list-config", action="store_true", help="print every config key with its value and exit")

    e = sub.add_parser("evaluate", help="evaluate a checkpoint on the validation and test splits")
    e.add_argument("--checkpoint", required=True, metavar="PATH", help="best.pt or last.pt of a run")
    e.add_argument("--data-dir", default=None, metavar="P", help="override the data folder recorded in the checkpoint")
    e.add_argument("--device", default=None, choices=("cpu", "cuda"))
    e.add_argument("--json", action="store_true", help="print the metrics as JSON")

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


def default_out(cfg: Dict[str, Any]) -> Path:
    gca = "gca" + "".join(str(p) for p in cfg["gca_positions"]) if cfg["gca_positions"] else "base"
    return Path("runs") / f"{cfg['data']}-{cfg['model']}-{gca}-s{cfg['seed']}"


def cmd_train(args: argparse.Namespace) -> int:
    from cdsr.distributed import init_from_env
    from cdsr.trainer import Trainer, format_table

    cfg = config_mod.make_config(args.model, _overrides(args), args.set)
    if args.list_config:
        print(json.dumps(cfg, indent=2))
        return 0
    ctx = init_from_env(cfg["device"])
    trainer = None
    try:
        out = Path(args.out) if args.out else default_out(cfg)
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
            print(f"results: {out / 'results.json'}")
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
    from cdsr.distributed import DistContext
    from cdsr.loaders import load_dataset
    from cdsr.trainer import evaluate, format_table, gathered_alignment

    path = Path(args.checkpoint)
    if not path.is_file():
        raise DataError(f"--checkpoint {path} does not exist")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ck, dict) or "model_state" not in ck or "config" not in ck:
        raise DataError(f"--checkpoint {path} is not a cdsr checkpoint (best.pt or last.pt of a run)")
    cfg = dict(ck["config"])
    if args.data_dir:
        cfg["data_dir"] = args.data_dir
    if args.device:
        cfg["device"] = args.device
    ds = load_dataset(cfg)
    if (ds.n_items_a, ds.n_items_b) != (ck["n_items_a"], ck["n_items_b"]):
        raise DataError(f"the dataset has {ds.n_items_a}/{ds.n_items_b} items but the checkpoint was trained "
                        f"on {ck['n_items_a']}/{ck['n_items_b']}")
    ctx = DistContext(device=torch.device(cfg["device"]))
    model = models.build_model(cfg["model"], ds.n_items_a, ds.n_items_b, cfg).to(ctx.device)
    model.load_state_dict(ck["model_state"])
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


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    except (ConfigError, DataError) as e:
        # Usage and data problems: one sentence, no traceback.
        print(f"cdsr: error: {e}", file=sys.stderr)
        return 2
    parser.error("unknown command")
    return 2


if __name__ == "__main__":
    sys.exit(main())
