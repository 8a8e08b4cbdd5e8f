"""The run list executor: resumability, exact continuation, failure isolation, and the
per-epoch alignment probe, on the synthetic `tiny` data (about a second per run)."""

import json

import pytest
import torch

import models
from cdsr.batching import build_eval_set
from cdsr.experiments.common import run_config
from cdsr.experiments.runner import RESULTS, RUNS_DIR, RunSpec, execute, is_done, load_results
from cdsr.loaders import load_dataset
from cdsr.trainer import evaluate


def tiny(seed=0, positions=(), epochs=2, **sets):
    cfg = run_config("sasrec", "synthetic", seed, preset_name="tiny", epochs=epochs, device="cpu", threads=1,
                     sets=[f"{k}={v}" for k, v in sets.items()], controlled={"gca_positions": list(positions)})
    return cfg


def spec(**kw):
    track = kw.pop("track_valid", False)
    cfg = tiny(**kw)
    return RunSpec({"seed": cfg["seed"], "positions": cfg["gca_positions"]}, cfg, track_valid=track)


def results_of(out, s):
    return json.loads((out / RUNS_DIR / s.run_id / RESULTS).read_text())


def test_finished_runs_are_never_redone(tmp_path, capsys):
    specs = [spec(), spec(positions=[0])]
    manifest = execute("t", specs, tmp_path)
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    stamp = [(tmp_path / RUNS_DIR / s.run_id / RESULTS).stat().st_mtime_ns for s in specs]
    capsys.readouterr()
    execute("t", specs, tmp_path)
    assert "2 already done, 0 to run" in capsys.readouterr().out
    assert stamp == [(tmp_path / RUNS_DIR / s.run_id / RESULTS).stat().st_mtime_ns for s in specs]
    rows = load_results(tmp_path)
    assert [r["id"] for r in rows] == [s.run_id for s in specs]
    assert rows[1]["results"]["alignment"], "a GCA run reports its test-set alignment probe"


def test_killed_run_continues_exactly(tmp_path):
    # A run killed after its first epoch: its checkpoint is there, its results.json is not.
    short = spec(epochs=1, positions=[0])
    execute("t", [short], tmp_path / "a")
    first = results_of(tmp_path / "a", short)
    (tmp_path / "a" / RUNS_DIR / short.run_id / RESULTS).unlink()
    full = spec(epochs=2, positions=[0])
    assert full.run_id == short.run_id, "epochs is not part of a run's identity: more epochs continue the run"
    assert not is_done(full, tmp_path / "a" / RUNS_DIR / full.run_id)
    execute("t", [full], tmp_path / "a")
    resumed = results_of(tmp_path / "a", full)
    assert resumed["history"][0]["loss"] == first["history"][0]["loss"]
    # Same result as a run that was never interrupted.
    execute("t", [full], tmp_path / "b")
    straight = results_of(tmp_path / "b", full)
    assert resumed["test"] == straight["test"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in straight["history"]]


def test_a_failing_run_does_not_stop_the_sweep(tmp_path, capsys):
    bad_cfg = run_config("sasrec", "abe", 0, preset_name="tiny", epochs=1, device="cpu", threads=1,
                         sets=[f"data_dir={tmp_path / 'missing'}"], controlled={"gca_positions": []})
    specs = [RunSpec({"seed": 0}, bad_cfg), spec(epochs=1)]
    manifest = execute("t", specs, tmp_path)
    assert [r["status"] for r in manifest["runs"]] == ["failed", "done"]
    assert "missing" in manifest["runs"][0]["error"]
    assert (tmp_path / RUNS_DIR / specs[0].run_id / "error.txt").is_file()
    out = capsys.readouterr().out
    assert "1 failed" in out and specs[0].run_id in out
    saved = json.loads((tmp_path / "manifest.json").read_text())
    assert [r["status"] for r in saved["runs"]] == ["failed", "done"]


def test_duplicate_runs_are_refused(tmp_path):
    with pytest.raises(ValueError, match="duplicate"):
        execute("t", [spec(), spec()], tmp_path)
    with pytest.raises(ValueError, match="workers"):
        execute("t", [spec()], tmp_path, workers=0)


def test_epoch_probe_is_the_validation_probe_of_that_epoch(tmp_path):
    s = spec(positions=[0], track_valid=True)
    execute("t", [s], tmp_path)
    res = results_of(tmp_path, s)
    assert [h["epoch"] for h in res["history"]] == [1, 2]
    assert all(set(h["alignment"]) == {"gca0_ab", "gca0_ba"} for h in res["history"])
    # Re-evaluate the last epoch's weights on the validation set: same probe, same metrics.
    ck = torch.load(tmp_path / RUNS_DIR / s.run_id / "last.pt", map_location="cpu", weights_only=False)
    cfg = ck["config"]
    ds = load_dataset(cfg)
    model = models.build_model("sasrec", ds.n_items_a, ds.n_items_b, cfg)
    model.load_state_dict(ck["model_state"])
    model.reset_alignment()
    valid = evaluate(model, ds, build_eval_set(ds, "valid", cfg["eval_negatives"], cfg["eval_seed"]), cfg,
                     __import__("cdsr.distributed", fromlist=["DistContext"]).DistContext(device=torch.device("cpu")))
    last = res["history"][-1]
    for name, a in model.alignment_stats().items():
        assert last["alignment"][name]["cos_x_xprime"] == pytest.approx(a["cos_x_xprime"], abs=1e-6)
    assert last["valid"]["A"]["ndcg@10"] == pytest.approx(valid["A"]["ndcg@10"])
    assert last["valid"]["B"]["mrr"] == pytest.approx(valid["B"]["mrr"])


def test_models_with_data_derived_tables_are_prepared(tmp_path):
    if "llm4cdsr" not in models.MODEL_NAMES:
        pytest.skip("llm4cdsr is not registered")
    cfg = run_config("llm4cdsr", "synthetic", 0, preset_name="tiny", epochs=1, device="cpu", threads=1, sets=[],
                     controlled={"gca_positions": [0]})
    manifest = execute("t", [RunSpec({"seed": 0}, cfg)], tmp_path)
    assert manifest["runs"][0]["status"] == "done", manifest["runs"][0].get("error")


def test_a_run_another_process_trains_is_left_to_it(tmp_path, capsys):
    # Two commands sharing one folder: the run whose lock is held (here by this test, as the
    # other command's worker would) is reported busy and not touched; the others train.
    import fcntl

    held, free = spec(epochs=1), spec(epochs=1, positions=[0])
    run_dir = tmp_path / RUNS_DIR / held.run_id
    run_dir.mkdir(parents=True)
    with open(run_dir / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        manifest = execute("t", [held, free], tmp_path)
        assert [r["status"] for r in manifest["runs"]] == ["busy", "done"]
        assert not (run_dir / RESULTS).exists() and not (run_dir / "train.log").exists()
        out = capsys.readouterr().out
        assert "1/2 runs done" in out and "1 busy in another process" in out and held.run_id in out
    # The lock is gone with its holder: the next start trains the run.
    manifest = execute("t", [held, free], tmp_path)
    assert [r["status"] for r in manifest["runs"]] == ["done", "done"]
    assert "1 already done, 1 to run" in capsys.readouterr().out


def test_each_command_analyses_its_own_runs(tmp_path):
    # A second command into the same folder rewrites manifest.json with its plan; the first
    # command's analysis reads the runs of its own plan, not the file.
    first, second = [spec(epochs=1)], [spec(epochs=1, positions=[0])]
    m1 = execute("t", first, tmp_path)
    execute("t", second, tmp_path)
    assert [r["id"] for r in load_results(tmp_path, m1)] == [first[0].run_id]
    assert [r["id"] for r in load_results(tmp_path)] == [second[0].run_id]
