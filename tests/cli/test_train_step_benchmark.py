"""benchmarks/train_step.py runs a preset's real training step and validation and prints one
table row per model (the tool the training-cost figures in benchmarks/RESULTS.md come from)."""

import pytest

from benchmarks import train_step


def test_prints_one_row_per_model(capsys):
    assert train_step.main(["--models", "sasrec", "--data", "synthetic", "--preset", "tiny", "--steps", "2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| sasrec |")]
    assert len(rows) == 1
    cells = [c.strip() for c in rows[0].strip("|").split("|")]
    step_mean, step_min = (float(x) for x in cells[2].split("/"))
    assert 0 < step_min <= step_mean
    assert int(cells[4]) >= 1 and float(cells[5]) > 0 and float(cells[6]) > 0


def test_rejects_zero_steps(capsys):
    with pytest.raises(SystemExit):
        train_step.main(["--steps", "0"])
    assert "--steps must be >= 1" in capsys.readouterr().err
