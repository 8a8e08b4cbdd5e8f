"""`cdsr experiment protocol`: the comparison of candidate schedules with a reference (the
budget, the bar, the choice on validation only) and its plumbing (folders in, summary.json
and report out, `report` rebuilds it)."""

import json

import pytest

from cdsr.experiments import cli, protocol


def _row(proto, data, seed, epochs, test, valid, stopped=True, positions=()):
    return {"id": f"{proto}-{data}-{seed}",
            "labels": {"protocol": proto, "model": "abxi", "data": data, "positions": list(positions), "seed": seed},
            "results": {"epochs_run": epochs, "best_epoch": epochs - 5, "early_stopped": stopped,
                        "wall_time_s": 10.0 * epochs,
                        "test": {"A": {"ndcg@10": test[0]}, "B": {"ndcg@10": test[1]}},
                        "valid": {"A": {"ndcg@10": valid[0]}, "B": {"ndcg@10": valid[1]}}}}


def _reference():
    return [_row("reference", "abe", 0, 150, (0.20, 0.10), (0.21, 0.11)),
            _row("reference", "afk", 0, 210, (0.19, 0.14), (0.20, 0.15))]


def _entry(result, proto, data):
    return next(e for e in result["comparisons"] if e["protocol"] == proto and e["data"] == data)


def test_budget_bar_and_ratios():
    rows = _reference() + [
        _row("good", "abe", 0, 45, (0.198, 0.099), (0.208, 0.109)),
        _row("good", "afk", 0, 70, (0.188, 0.139), (0.198, 0.149)),
        _row("long", "abe", 0, 51, (0.20, 0.10), (0.21, 0.11)),  # 51 / 150 = 0.34 > 1/3
        _row("long", "afk", 0, 60, (0.19, 0.14), (0.20, 0.15)),
        _row("capped", "abe", 0, 40, (0.20, 0.10), (0.21, 0.11), stopped=False),
        _row("capped", "afk", 0, 40, (0.19, 0.14), (0.20, 0.15)),
    ]
    r = protocol.compare(rows)
    good = _entry(r, "good", "abe")
    assert good["epochs_ratio"] == pytest.approx(0.3)
    assert good["test_ratio"]["A"] == pytest.approx(0.99) and good["test_ratio"]["B"] == pytest.approx(0.99)
    assert good["within_budget"] and good["meets_bar"]
    assert not _entry(r, "long", "abe")["within_budget"]  # over a third of the reference's epochs
    assert not _entry(r, "capped", "abe")["within_budget"]  # its epoch cap ended it
    assert r["chosen"]["protocol"] == "good" and r["chosen"]["meets_bar"]
    md = protocol.markdown(r)
    assert "**Chosen on validation:** `good`" in md and "| `long` | abxi | Beauty-Elec | bare | 51 (0.34) |" in md


def test_choice_uses_validation_only():
    """`better_valid` has the higher validation ratio and the worse test: it is chosen, and
    the report says that it misses the bar."""
    rows = _reference() + [
        _row("better_test", "abe", 0, 40, (0.200, 0.100), (0.200, 0.100)),
        _row("better_test", "afk", 0, 60, (0.190, 0.140), (0.190, 0.140)),
        _row("better_valid", "abe", 0, 40, (0.180, 0.090), (0.210, 0.110)),
        _row("better_valid", "afk", 0, 60, (0.170, 0.130), (0.200, 0.150)),
    ]
    r = protocol.compare(rows)
    assert r["chosen"]["protocol"] == "better_valid" and not r["chosen"]["meets_bar"]
    assert "misses the bar" in protocol.markdown(r)


def test_a_candidate_must_cover_every_reference_cell_and_seeds_average():
    rows = _reference() + [
        _row("abe_only", "abe", 0, 40, (0.2, 0.1), (0.21, 0.11)),
        _row("two_seeds", "abe", 0, 40, (0.19, 0.10), (0.20, 0.11)),
        _row("two_seeds", "abe", 1, 50, (0.21, 0.10), (0.22, 0.11)),
        _row("two_seeds", "afk", 0, 60, (0.19, 0.14), (0.20, 0.15)),
    ]
    r = protocol.compare(rows)
    assert r["chosen"]["protocol"] == "two_seeds"
    e = _entry(r, "two_seeds", "abe")
    assert e["seeds"] == 2 and e["epochs_run"] == 45 and e["test"]["A"] == pytest.approx(0.20)
    # a GCA variant without a reference cell is reported as such, not compared with bare
    r = protocol.compare(_reference() + [_row("x", "abe", 0, 40, (0.2, 0.1), (0.2, 0.1), positions=(0,))])
    assert r["comparisons"][0]["reference"] is False and r["chosen"] is None
    assert "no reference run for this cell" in protocol.markdown(r)


def test_command_writes_summary_and_report_rebuilds_it(tmp_path, capsys):
    common = ["--preset", "tiny", "--threads", "1", "--workers", "1", "--variants", "bare", "--seeds", "0"]
    ref, cand, out = tmp_path / "ref", tmp_path / "cand", tmp_path / "out"
    assert cli.main(["table", *common, "--out", str(ref)]) == 0
    assert cli.main(["table", *common, "--set", "lr=0.01", "--out", str(cand)]) == 0
    assert cli.main(["protocol", "--reference", str(ref), "--candidates", str(cand), "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["experiment"] == "protocol"
    by_proto = {r["labels"]["protocol"]: r for r in summary["runs"]}
    assert set(by_proto) == {"reference", "lr=0.01"}
    assert by_proto["lr=0.01"]["sets"] == ["lr=0.01"] and by_proto["reference"]["sets"] == []
    assert by_proto["reference"]["valid"]["A"]["ndcg@10"] > 0
    assert summary["protocol_search"]["comparisons"][0]["protocol"] == "lr=0.01"
    report_md = (out / "report.md").read_text()
    assert "## Candidates against the reference" in report_md and "| `lr=0.01` | sasrec | synthetic | bare |" in report_md
    # tiny runs end at their 2-epoch cap: no candidate keeps the budget
    assert "**Chosen:** none" in report_md
    # docs/results rebuild from the committed summary
    results = tmp_path / "docs" / "results" / "protocol-search"
    results.mkdir(parents=True)
    (results / "summary.json").write_text((out / "summary.json").read_text())
    doc = tmp_path / "docs" / "results.md"
    doc.write_text("# Results\n")
    assert cli.main(["report", "--results", str(results.parent), "--doc", str(doc)]) == 0
    assert "| `lr=0.01` | sasrec | synthetic | bare |" in doc.read_text()
    # errors are one line naming the argument
    capsys.readouterr()
    assert cli.main(["protocol", "--reference", str(ref), "--candidates", str(ref)]) == 2
    err = capsys.readouterr().err
    assert "is given twice" in err and len(err.strip().splitlines()) == 1
    assert cli.main(["protocol", "--reference", str(tmp_path / "nowhere"), "--candidates", str(cand)]) == 2
    assert "not an experiment folder" in capsys.readouterr().err
