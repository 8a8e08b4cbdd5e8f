"""The runner on a real Dask cluster (distributed.LocalCluster: 2 worker processes, 1 thread
each), through `cdsr experiment alignment --engine dask --scheduler ADDR` (two runs): every run's worker is
killed after its first epoch (SIGKILL, $CDSR_KILL_AT_EPOCH), the scheduler hands the task to
a worker again, the run resumes from its checkpoint and ends exactly where an uninterrupted
run ends; finished runs are never submitted again."""

import json

import pytest

from cdsr.experiments import cli
from cdsr.experiments.runner import MANIFEST, RESULTS, RUNS_DIR, execute
from cdsr.trainer import KILL_AT_EPOCH, KILLED_MARKER

distributed = pytest.importorskip("distributed")

SWEEP = ["alignment", "--preset", "tiny", "--positions", "0", "--hidden", "16", "--heads", "4", "--activations",
         "sigmoid", "--layer-norm", "on", "off", "--sample", "0", "--track", "0", "--seeds", "0", "--epochs", "2",
         "--threads", "1", "--quiet"]


def test_killed_workers_resume_and_match_an_uninterrupted_run(tmp_path, capsys):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                                  env={KILL_AT_EPOCH: "1"}) as cluster:
        dask = SWEEP + ["--engine", "dask", "--scheduler", cluster.scheduler_address, "--out", str(tmp_path / "dask")]
        assert cli.main(dask) == 0
        assert "2 runs, 0 already done, 2 to run on the Dask cluster" in capsys.readouterr().out
        ids = [r["id"] for r in json.loads((tmp_path / "dask" / MANIFEST).read_text())["runs"]]
        for run_id in ids:
            run = tmp_path / "dask" / RUNS_DIR / run_id
            assert (run / KILLED_MARKER).is_file(), "the worker of every run was killed once"
            assert "resumed from" in (run / "train.log").read_text()
        assert cli.main(dask) == 0
        assert "2 already done, 0 to run" in capsys.readouterr().out
    assert cli.main(SWEEP + ["--workers", "1", "--out", str(tmp_path / "local")]) == 0  # never killed
    for run_id in ids:
        got = json.loads((tmp_path / "dask" / RUNS_DIR / run_id / RESULTS).read_text())
        want = json.loads((tmp_path / "local" / RUNS_DIR / run_id / RESULTS).read_text())
        assert got["test"] == want["test"] and got["alignment"] == want["alignment"]
        assert [h["loss"] for h in got["history"]] == [h["loss"] for h in want["history"]]
        assert got["best_epoch"] == want["best_epoch"] and got["epochs_run"] == want["epochs_run"] == 2


def test_engine_and_scheduler_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="engine must be one of local, dask"):
        execute("t", [], tmp_path, engine="ray")
    assert cli.main(["table", "--preset", "tiny", "--scheduler", "tcp://127.0.0.1:1", "--dry-run"]) == 2
    assert "--scheduler needs --engine dask" in capsys.readouterr().err
