"""`cdsr train` then `cdsr evaluate` for every backbone, with GCA[0] and as the
parameter-matched bare baseline, on the tiny synthetic data.

LLM4CDSR used to fail in both commands ("frozen item tables not loaded"): only the
experiment runner prepared its data-derived tables. Every command now builds its model
through one function that prepares it; evaluation rebuilds the tables (checkpoints do not
hold them) and must reproduce the training run's numbers exactly.
"""

import json

import pytest

import models
from tests.cli.common import TINY, main_in_process, results_path, run



@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    # LLM4CDSR's substitute item tables are cached under $CDSR_CACHE_DIR.
    monkeypatch.setenv("CDSR_CACHE_DIR", str(tmp_path / "cache"))


def _train_then_evaluate(tmp_path, model, variant):
    trained = main_in_process(["train", "--model", model, *variant, *TINY], tmp_path)
    assert trained.returncode == 0, trained
    run_dir = tmp_path / results_path(trained.stdout).parent
    results = json.loads((run_dir / "results.json").read_text())
    assert (run_dir / "best.pt").is_file() and (run_dir / "last.pt").is_file()
    log = (run_dir / "train.log").read_text()
    assert "cdsr train --model" in log and "epoch 1 loss" in log
    evaluated = main_in_process(["evaluate", "--checkpoint", str(run_dir / "best.pt"), "--json"], tmp_path)
    assert evaluated.returncode == 0, evaluated
    again = json.loads(evaluated.stdout)
    # Same seeded candidates, same weights, the same data-derived tables: the same numbers.
    assert again["test"] == results["test"] and again["valid"] == results["valid"]
    assert again["alignment"] == results["alignment"]
    return run_dir, results


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_train_and_evaluate_with_gca0(tmp_path, model):
    run_dir, results = _train_then_evaluate(tmp_path, model, ["--gca", "0"])
    assert run_dir.name == f"synthetic-{model}-gca0-s0-hidden=16-max_len=20-preset=tiny"
    assert results["config"]["gca_positions"] == [0]
    assert set(results["alignment"]) == {"gca0_ab", "gca0_ba"}
    assert results["test"]["A"]["users"] + results["test"]["B"]["users"] == 64


@pytest.mark.parametrize("model", models.MODEL_NAMES)
def test_train_and_evaluate_scaled_to_match(tmp_path, model):
    run_dir, results = _train_then_evaluate(tmp_path, model, ["--scale-to-match", "0"])
    assert run_dir.name.startswith(f"synthetic-{model}-matched0-s0-")
    assert results["config"]["scale_to_match"] == [0] and results["alignment"] == {}
    assert abs(results["n_params"] - results["n_params_target"]) <= 0.02 * results["n_params_target"]


def test_llm4cdsr_commands_in_a_shell(tmp_path):
    """The issue's report, as typed: `cdsr train --model llm4cdsr`, then `cdsr evaluate`."""
    trained = run(["train", "--model", "llm4cdsr", *TINY], tmp_path)
    assert trained.returncode == 0, trained
    best = tmp_path / results_path(trained.stdout).parent / "best.pt"
    evaluated = run(["evaluate", "--checkpoint", str(best)], tmp_path)
    assert evaluated.returncode == 0, evaluated
    assert "test   A" in evaluated.stdout and "Traceback" not in evaluated.stderr


def test_llm4cdsr_under_torchrun(tmp_path):
    """Two gloo processes: every rank builds (and prepares) its model the same way."""
    import subprocess
    import sys

    from tests.cli.common import env

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cdsr",
           "train", "--model", "llm4cdsr", "--gca", "0", *TINY, "--out", str(tmp_path / "two")]
    done = subprocess.run(cmd, cwd=tmp_path, env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "two" / "results.json").read_text())
    assert results["world_size"] == 2 and set(results["alignment"]) == {"gca0_ab", "gca0_ba"}
    assert sum(results["test"][d]["users"] for d in "AB") == 64
    assert (tmp_path / "two" / "train.log").is_file()
