"""Run folders, logs, defaults: what a second `cdsr train` does to the first, what `--help`
says, and the defaults the issue asked about (tiny preset, CPU threads)."""

import argparse
import json

import pytest
import torch

from cdsr import config as config_mod
from cdsr.cli import build_parser, default_out
from tests.cli.common import TINY, main_in_process, results_path


def _train(tmp_path, *extra):
    return main_in_process(["train", *TINY, *extra], tmp_path)


def _stamp(run_dir):
    return {f: (run_dir / f).read_bytes() for f in ("results.json", "best.pt", "train.log")}


def test_runs_do_not_overwrite_each_other(tmp_path):
    first = _train(tmp_path)
    assert first.returncode == 0, first
    a = tmp_path / results_path(first.stdout).parent
    assert a.name == "synthetic-sasrec-base-s0-hidden=16-max_len=20-preset=tiny"
    # the log sits next to results.json and holds the command and the epochs
    log = (a / "train.log").read_text()
    assert "cdsr train --set synthetic_preset=tiny" in log and "epoch 1 loss" in log
    before = _stamp(a)

    # Another hidden size: its own folder; the first run is untouched.
    second = _train(tmp_path, "--hidden", "32")
    assert second.returncode == 0, second
    b = tmp_path / results_path(second.stdout).parent
    assert b != a and b.name == "synthetic-sasrec-base-s0-hidden=32-max_len=20-preset=tiny"
    assert (b / "train.log").is_file() and (b / "results.json").is_file()
    assert _stamp(a) == before
    assert json.loads((b / "results.json").read_text())["config"]["hidden"] == 32

    # Forcing the second config into the first folder is refused, in one line, before anything is written.
    clash = _train(tmp_path, "--hidden", "32", "--out", str(a))
    assert clash.returncode == 2, clash
    assert clash.stderr.strip() == (f"cdsr: error: {a} holds a different run (hidden 16 there vs 32); "
                                    f"give --out DIR for this one, or remove that folder")
    assert _stamp(a) == before
    # ... and so is resuming it with another config.
    clash = _train(tmp_path, "--hidden", "32", "--out", str(a), "--resume")
    assert clash.returncode == 2 and "different config for hidden" in clash.stderr, clash
    assert _stamp(a) == before

    # More epochs of the same run: the same folder; continuing needs --resume.
    more = _train(tmp_path, "--epochs", "2")
    assert more.returncode == 2, more
    assert "holds this run trained for 1 epochs; pass --resume to continue it to 2 epochs" in more.stderr
    resumed = _train(tmp_path, "--epochs", "2", "--resume")
    assert resumed.returncode == 0, resumed
    assert tmp_path / results_path(resumed.stdout).parent == a
    assert json.loads((a / "results.json").read_text())["epochs_run"] == 2
    log = (a / "train.log").read_text()
    assert log.startswith(before["train.log"].decode()), "a resumed run appends to its log"
    assert "resumed from" in log and "epoch 2 loss" in log

    # The same config again without --resume retrains it in place (same numbers: same seed).
    again = _train(tmp_path, "--epochs", "2")
    assert again.returncode == 0, again
    assert json.loads((a / "results.json").read_text())["test"] == json.loads(
        (tmp_path / results_path(resumed.stdout)).read_text())["test"]


@pytest.mark.parametrize("model", ["sasrec", "llm4cdsr"])
def test_default_names_tell_configs_apart(model):
    base = {"data": "synthetic", "seed": 0}
    variants = [{}, {"hidden": 32}, {"gca_positions": [0]}, {"gca_positions": [0], "gca_heads": 4},
                {"gca_positions": [0], "gca_activation": "tanh"}, {"gca_positions": [0], "gca_layer_norm": False},
                {"seed": 1}, {"lr": 3e-4}, {"batch_size": 64}, {"data": "abe"}]
    sets = [[], ["synthetic_preset=tiny"], ["max_len=30", "dropout=0.1", "eval_negatives=500", "weight_decay=0.1",
                                            "warmup_epochs=2", "patience=9"]]
    names = {}
    for v in variants:
        for s in sets:
            cfg = config_mod.make_config(model, {**base, **v}, s)
            name = default_out(cfg).name
            assert name not in names, f"{name}: {names.get(name)} and {(v, s)}"
            names[name] = (v, s)
    # what does not change the result does not change the name
    plain = default_out(config_mod.make_config(model, base))
    assert plain.name == f"synthetic-{model}-base-s0"
    for execution in ({"threads": 1}, {"epochs": 3}, {"device": "cpu"}):
        assert default_out(config_mod.make_config(model, {**base, **execution})) == plain
    # a preset's own default (tiny: 20 evaluation negatives) is not a difference
    tiny = config_mod.make_config(model, base, ["synthetic_preset=tiny"])
    assert tiny["eval_negatives"] == 20 and default_out(tiny).name == f"synthetic-{model}-base-s0-preset=tiny"


def test_paths_and_long_settings_fold_into_a_hash():
    cfg = config_mod.make_config("llm4cdsr", {}, ["emb_global_npy=/data/g.npy", "emb_a_npy=/data/a.npy",
                                                  "emb_b_npy=/data/b.npy"])
    name = default_out(cfg).name
    assert "/" not in name and name.startswith("synthetic-llm4cdsr-base-s0-cfg")
    other = config_mod.make_config("llm4cdsr", {}, ["emb_global_npy=/data/g2.npy", "emb_a_npy=/data/a.npy",
                                                    "emb_b_npy=/data/b.npy"])
    assert default_out(other).name != name


def test_tiny_preset_needs_no_other_setting(tmp_path):
    """README's `--set synthetic_preset=tiny` on its own (it used to need eval_negatives too)."""
    cfg = config_mod.make_config("sasrec", {}, ["synthetic_preset=tiny"])
    assert cfg["eval_negatives"] == 20
    assert config_mod.make_config("sasrec", {}, ["synthetic_preset=tiny", "eval_negatives=30"])["eval_negatives"] == 30
    assert config_mod.make_config("sasrec", {})["eval_negatives"] == 999
    out = main_in_process(["train", "--set", "synthetic_preset=tiny", "--epochs", "1", "--set", "progress=never"],
                          tmp_path)
    assert out.returncode == 0, out
    results = json.loads((tmp_path / results_path(out.stdout)).read_text())
    assert results["config"]["eval_negatives"] == 20


def test_cpu_runs_use_the_available_cores(tmp_path):
    assert config_mod.PIPELINE_DEFAULTS["threads"] == 0
    cores = config_mod.available_cores()
    assert config_mod.resolve_threads({"threads": 0}) == cores
    assert config_mod.resolve_threads({"threads": 3}) == 3
    old = torch.get_num_threads()
    try:
        out = _train(tmp_path)
        assert out.returncode == 0, out
        log = (tmp_path / results_path(out.stdout).parent / "train.log").read_text()
        assert f"device cpu, {cores} threads" in log
        assert torch.get_num_threads() == cores
        out = _train(tmp_path, "--set", "threads=1", "--out", str(tmp_path / "one"))
        assert out.returncode == 0, out
        assert "device cpu, 1 threads" in (tmp_path / "one" / "train.log").read_text()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(old)


def _subparsers(parser, prefix=""):
    yield prefix or parser.prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _subparsers(sub, f"{prefix} {name}".strip())


def test_every_help_shows_real_defaults():
    seen = []
    for name, parser in _subparsers(build_parser()):
        text = parser.format_help()
        assert "None" not in text, f"`cdsr {name} --help` shows None"
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)) or action.nargs == 0 \
                    or action.required:
                continue  # -h, subcommands, on/off flags and required options have no default
            assert action.help and "default: " in action.help, \
                f"`cdsr {name} --help`: {'/'.join(action.option_strings)} does not say its default"
        seen.append(name)
    assert {"train", "evaluate", "data stats", "experiment table", "experiment alignment",
            "experiment scaling"} <= set(seen)
    # model-dependent defaults are given per model
    train = dict(_subparsers(build_parser()))["train"].format_help()
    assert "sasrec 64" in train and "llm4cdsr 128" in " ".join(train.split())
