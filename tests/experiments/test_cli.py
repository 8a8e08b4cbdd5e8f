"""The three commands end to end on the `tiny` preset (what CI runs), their outputs, a
resumed re-run, and the usage errors."""

import argparse
import json
import math

import pytest

from cdsr.experiments import cli

COMMON = ["--preset", "tiny", "--threads", "1"]
# The table runs carry one --set, which their summary records as part of their protocol.
TABLE = ["table", *COMMON, "--workers", "1", "--set", "eval_batch_size=32"]


def _strict_json(path):
    def no_nan(token):
        raise AssertionError(f"{path} holds {token}: not standard JSON")
    return json.loads(path.read_text(), parse_constant=no_nan)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    codes = {
        "table": cli.main([*TABLE, "--out", str(root / "table")]),
        # Two workers: the process-pool path.
        "alignment": cli.main(["alignment", *COMMON, "--workers", "2", "--out", str(root / "alignment")]),
        "scaling": cli.main(["scaling", *COMMON, "--workers", "1", "--out", str(root / "scaling")]),
        "reg": cli.main(["alignment", *COMMON, "--workers", "1", "--positions", "0", "--hidden", "16", "--heads", "4",
                         "--activations", "sigmoid", "--layer-norm", "on", "--sample", "0", "--track", "0",
                         "--align-reg", "-10", "0", "10", "--out", str(root / "reg")]),
    }
    return root, codes


@pytest.mark.parametrize("name,sections,figures", [
    ("table", ["## Table 1 layout", "| sasrec | synthetic |", "+ GCA_early GCA[0]", "+ GCA_stack GCA[0,1]",
               "HR@5 A", "MRR B", "## Change against the bare backbone", "## Alignment probe of the GCA runs",
               "| sasrec | synthetic | GCA_early | 0."], ["table_ndcg10.png"]),
    ("alignment", ["Pearson correlation", "| sasrec | A |", "| sasrec | B |", "median [q1, q3]",
                   "Over training epochs", "tracked (run, domain) curves"],
     ["alignment_scatter.png", "alignment_box.png", "alignment_epochs.png"]),
    ("scaling", ["NDCG@10 against trainable parameters", "Parameter-efficiency ratio", "| sasrec | synthetic | bare | 8 |"],
     ["scaling.png"]),
])
def test_experiment_outputs(outputs, name, sections, figures):
    root, codes = outputs
    assert codes[name] == 0
    out = root / name
    report = (out / "report.md").read_text()
    for s in sections:
        assert s in report, f"{name} report lacks {s!r}"
    assert "## What ran" in report and "threads per run: 1" in report
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["runs"] and all(r["status"] == "done" for r in manifest["runs"])
    summary = _strict_json(out / "summary.json")
    assert summary["what_ran"]["runs_done"] == len(manifest["runs"])
    pytest.importorskip("matplotlib")
    for f in figures:
        assert (out / f).stat().st_size > 5000, f"{f} missing or empty"
        assert f"]({f})" in report


def test_run_counts_and_alignment_content(outputs):
    root, _ = outputs
    assert len(json.loads((root / "table" / "manifest.json").read_text())["runs"]) == 6  # 3 variants x 2 seeds
    align = _strict_json(root / "alignment" / "summary.json")
    assert len(json.loads((root / "alignment" / "manifest.json").read_text())["runs"]) == 8
    panels = {(p["model"], p["domain"]): p for p in align["correlations"]}
    assert panels[("sasrec", "A")]["n"] == 8 and -1.0 <= panels[("sasrec", "A")]["r"] <= 1.0
    assert all(0.0 <= pt[0] <= 1.0 for pt in panels[("sasrec", "B")]["points"])
    assert len(align["epoch_tracks"]) == 2 and all(len(t["epochs"]) == 3 for t in align["epoch_tracks"])
    assert all(t["r"]["A"]["n"] == 3 for t in align["epoch_tracks"])
    sc = _strict_json(root / "scaling" / "summary.json")
    bare = sorted((p["n_params"], p["width"]) for p in sc["points"] if p["variant"] == "bare")
    assert [w for _, w in bare] == [8, 16, 32], "wider bare backbones have more parameters"
    assert len(sc["efficiency"]) == 3 and all(math.isfinite(e["mean"]["ratio"]) for e in sc["efficiency"])


def test_rerun_trains_nothing_and_analyse_only(outputs, capsys):
    root, _ = outputs
    capsys.readouterr()
    assert cli.main([*TABLE, "--out", str(root / "table")]) == 0
    assert "6 already done, 0 to run" in capsys.readouterr().out
    (root / "table" / "report.md").unlink()
    assert cli.main([*TABLE, "--analyse-only", "--out", str(root / "table")]) == 0
    assert "## Table 1 layout" in (root / "table" / "report.md").read_text()


def test_dry_run_lists_the_runs(tmp_path, capsys):
    assert cli.main(["alignment", *COMMON, "--dry-run", "--sample", "0", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # Full grid: 2 positions x 2 hidden x 2 heads x 2 activations x 2 LayerNorm x 1 seed.
    assert "32 runs planned" in out
    assert not (tmp_path / "manifest.json").exists()


def test_table_variants_choose_the_cells(tmp_path, capsys):
    """LLM4CDSR's cells are bare and GCA_early; a protocol search trains bare only."""
    assert cli.main(["table", *COMMON, "--variants", "bare", "GCA_early", "--dry-run",
                     "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'variant': 'GCA_stack'" not in out and "'variant': 'GCA_early'" in out
    assert cli.main(["table", *COMMON, "--variants", "bare", "--dry-run", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "'variant': 'GCA_early'" not in out and "'variant': 'bare'" in out


@pytest.mark.parametrize("argv,message", [
    (["table", "--variants", "bare", "GCA_deep"], "--variants: unknown variant(s) GCA_deep"),
    (["table", "--stack", "0"], "at least two GCA positions"),
    (["table", "--stack", "0", "5"], "not offered by sasrec"),
    (["table", "--models", "nope"], "unknown model 'nope'"),
    (["table", "--set", "gca_positions=[0]"], "the experiment sets gca_positions itself"),
    (["alignment", "--models", "sasrec", "--positions", "0", "9"], "not offered by sasrec"),
    (["alignment", "--hidden", "6", "--heads", "4"], "must divide"),
    (["scaling", "--widths", "16"], "at least two widths"),
    (["scaling", "--width-key", "nope"], "not a config key"),
])
def test_usage_errors_name_the_argument(argv, message, capsys, tmp_path):
    assert cli.main([*argv, *COMMON, "--dry-run", "--out", str(tmp_path)]) == 2
    assert message in capsys.readouterr().err


def test_add_parser_plugs_into_a_cdsr_style_parser():
    parser = argparse.ArgumentParser(prog="cdsr")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.add_parser(sub)
    args = parser.parse_args(["experiment", "scaling", "--preset", "tiny", "--widths", "8", "16"])
    assert args.command == "experiment" and args.experiment == "scaling" and args.widths == [8, 16]


def test_align_reg_sweep_report(outputs):
    root, codes = outputs
    assert codes["reg"] == 0
    report = (root / "reg" / "report.md").read_text()
    assert "## Alignment regulariser" in report
    summary = _strict_json(root / "reg" / "summary.json")
    assert [r["align_reg"] for r in summary["align_reg"]] == [-10.0, 0.0, 10.0]
    cos = {r["align_reg"]: r["cos"]["mean"] for r in summary["align_reg"]}
    assert cos[10.0] < cos[-10.0]
    pytest.importorskip("matplotlib")
    assert (root / "reg" / "alignment_reg.png").stat().st_size > 5000


def test_a_killed_sweep_continues(tmp_path):
    """Kill -9 the command after its first finished run; the same command finishes the rest
    and does not redo the finished one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "cdsr.experiments", "table", *COMMON, "--workers", "1", "--quiet",
            "--seeds", "0", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=repo)
    deadline = time.time() + 120
    first = None
    while time.time() < deadline:
        line = proc.stdout.readline()
        if line.startswith("[1/3] done"):
            first = line.split()[2]
            break
        if not line and proc.poll() is not None:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert first, "the sweep never finished its first run"
    manifest = json.loads((out / "manifest.json").read_text())
    assert {r["id"]: r["status"] for r in manifest["runs"]}[first] == "done"
    stamp = (out / "runs" / first / "results.json").stat().st_mtime_ns
    again = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=repo, timeout=180)
    assert again.returncode == 0, again.stderr
    assert "already done" in again.stdout and f"done   {first}" not in again.stdout
    assert (out / "runs" / first / "results.json").stat().st_mtime_ns == stamp
    assert all(r["status"] == "done" for r in json.loads((out / "manifest.json").read_text())["runs"])


def test_summary_has_one_record_per_run(outputs):
    root, _ = outputs
    table = _strict_json(root / "table" / "summary.json")
    manifest = json.loads((root / "table" / "manifest.json").read_text())
    recs = {r["id"]: r for r in table["runs"]}
    assert set(recs) == {r["id"] for r in manifest["runs"]}
    for entry in manifest["runs"]:
        rec = recs[entry["id"]]
        res = json.loads((root / "table" / "runs" / entry["id"] / "results.json").read_text())
        assert (rec["model"], rec["data"], rec["seed"], rec["preset"]) == ("sasrec", "synthetic", entry["labels"]["seed"], "tiny")
        assert rec["gca_positions"] == entry["labels"]["positions"]
        assert rec["sets"] == ["eval_batch_size=32"]  # the protocol: preset + the command's overrides
        assert (rec["epochs_run"], rec["best_epoch"], rec["n_params"]) == (res["epochs_run"], res["best_epoch"], res["n_params"])
        # tiny: 2 epochs under patience 5, so the cap ended every run
        assert rec["early_stopped"] is False and rec["max_epochs"] == 2
        assert rec["test"]["A"]["ndcg@10"] == res["test"]["A"]["ndcg@10"] and rec["alignment"] == res["alignment"]
    tracked = [r for r in _strict_json(root / "alignment" / "summary.json")["runs"] if "history" in r]
    assert len(tracked) == 2 and all(len(r["history"]) == 3 for r in tracked)


def test_report_rebuilds_the_results_doc_from_summaries(outputs, tmp_path, capsys):
    root, _ = outputs
    results = tmp_path / "docs" / "results"
    for name in ("table", "scaling"):
        (results / name).mkdir(parents=True)
        (results / name / "summary.json").write_text((root / name / "summary.json").read_text())
    doc = tmp_path / "docs" / "results.md"
    doc.write_text("# Results\n\nprose kept\n\n<!-- results:table -->\nstale\n<!-- /results:table -->\n\nmore prose\n")
    assert cli.main(["report", "--results", str(results), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "stale" not in text and "prose kept" in text and "more prose" in text
    table_block = text.split("<!-- results:table -->")[1].split("<!-- /results:table -->")[0]
    assert "## Table 1 layout" in table_block and "+ GCA_stack GCA[0,1]" in table_block
    assert "(6 runs, 0 ended by early stopping, 6 by their epoch cap)" in table_block
    # the same numbers as the report written from the run folders
    row = next(line for line in (root / "table" / "report.md").read_text().splitlines() if line.startswith("| sasrec |"))
    assert row in table_block
    assert "## scaling" in text and "<!-- /results:scaling -->" in text
    again = text
    assert cli.main(["report", "--results", str(results), "--doc", str(doc)]) == 0
    assert doc.read_text() == again, "a rebuild from the same summaries changes nothing"
    assert cli.main(["report", "--results", str(tmp_path / "none"), "--doc", str(doc)]) == 2
    assert "no <name>/summary.json" in capsys.readouterr().err
