"""Bad input on the command line ends in one line on stderr that names the problem, and a
non-zero exit status; never a traceback.

Every case runs through `cdsr.cli.main(argv)` with stderr captured as a fresh process shows it
(log lines included, an escaping exception as its traceback); the cases in `IN_A_SHELL` also
run as `python -m cdsr ...` subprocesses, so the check sees exactly what a shell would.
"""

import json
import shutil

import numpy as np
import pytest
import torch

from tests.cli.common import SHARED_ABE, TINY, main_many, run_many

NO_CUDA = not torch.cuda.is_available()

# (id, argv, what the one line must say). `{d}` is the folder holding the bad inputs.
CASES = [
    # --device cuda on a machine without CUDA (every command that takes --device)
    ("train-cuda", ["train", "--device", "cuda", *TINY], "cdsr: error: --device cuda: "),
    ("experiment-cuda", ["experiment", "table", "--preset", "tiny", "--device", "cuda", "--out", "{d}/exp"],
     "cdsr: error: --device cuda: "),
    # --checkpoint: not a checkpoint, missing, a folder, a torch file of something else
    ("ckpt-garbage", ["evaluate", "--checkpoint", "{d}/garbage.pt"],
     "cdsr: error: --checkpoint {d}/garbage.pt is not a cdsr checkpoint (torch.load: "),
    ("ckpt-missing", ["evaluate", "--checkpoint", "{d}/missing.pt"],
     "cdsr: error: --checkpoint {d}/missing.pt does not exist"),
    ("ckpt-folder", ["evaluate", "--checkpoint", "{d}"], "cdsr: error: --checkpoint {d} is a folder"),
    ("ckpt-other", ["evaluate", "--checkpoint", "{d}/other.pt"],
     "cdsr: error: --checkpoint {d}/other.pt is not a cdsr checkpoint (best.pt or last.pt of a run)"),
    # ABXI-format data: a malformed line (no numpy message), a truncated line, through both commands
    ("abxi-malformed", ["data", "stats", "--data", "abe", "--data-dir", "{d}/abe_malformed"],
     "cdsr: error: {d}/abe_malformed/toy_50_preprocessed.txt:3: field 3 is '2-12', expected 'item|timestamp'"),
    ("abxi-truncated", ["train", "--data", "abe", "--data-dir", "{d}/abe_truncated", *TINY],
     "cdsr: error: {d}/abe_truncated/toy_50_preprocessed.txt:3: user 7 has 1 interaction(s)"),
    ("abxi-no-folder", ["data", "stats", "--data", "abe", "--data-dir", "{d}/nope"],
     "cdsr: error: data directory for 'abe' not found"),
    # raw ratings CSVs: a malformed line, a truncated line, a missing file
    ("csv-malformed", ["data", "stats", "--data", "csv", "--csv-a", "{d}/a.csv", "--csv-b", "{d}/b_malformed.csv",
                       "--csv-order", "user-item", "--cache-dir", "{d}/cache"],
     "cdsr: error: {d}/b_malformed.csv:2: timestamp 'soon' is not a number"),
    ("csv-truncated", ["data", "stats", "--data", "csv", "--csv-a", "{d}/a.csv", "--csv-b", "{d}/b_truncated.csv",
                       "--csv-order", "user-item", "--cache-dir", "{d}/cache"],
     "cdsr: error: {d}/b_truncated.csv:3: expected 4 comma-separated columns"),
    ("csv-missing", ["data", "stats", "--data", "csv", "--csv-a", "{d}/a.csv", "--csv-b", "{d}/nope.csv"],
     "cdsr: error: ratings file {d}/nope.csv does not exist"),
    ("csv-without-files", ["data", "stats", "--data", "csv"], "cdsr: error: --data csv needs --csv-a PATH"),
    # LLM4CDSR's .npy tables: missing, not .npy, wrong shape, not all three
    ("npy-missing", ["train", "--model", "llm4cdsr", *TINY, "--set", "emb_global_npy={d}/missing.npy",
                     "--set", "emb_a_npy={d}/a.npy", "--set", "emb_b_npy={d}/b.npy"],
     "cdsr: error: llm4cdsr: emb_global_npy: no such file {d}/missing.npy"),
    ("npy-not-npy", ["train", "--model", "llm4cdsr", *TINY, "--set", "emb_global_npy={d}/text.npy",
                     "--set", "emb_a_npy={d}/a.npy", "--set", "emb_b_npy={d}/b.npy"],
     "cdsr: error: llm4cdsr: emb_global_npy: {d}/text.npy is not a .npy file"),
    ("npy-shape", ["train", "--model", "llm4cdsr", *TINY, "--set", "emb_global_npy={d}/g.npy",
                   "--set", "emb_a_npy={d}/b.npy", "--set", "emb_b_npy={d}/b.npy"],
     "cdsr: error: llm4cdsr: emb_a_npy: {d}/b.npy has 60 rows, expected 40"),
    ("npy-one-of-three", ["train", "--model", "llm4cdsr", *TINY, "--set", "emb_global_npy={d}/g.npy"],
     "cdsr: error: llm4cdsr: give all three frozen tables or none; missing emb_a_npy, emb_b_npy"),
    # --set: unknown keys, values of the wrong type or range
    ("set-unknown", ["train", "--set", "hiden=32"], "cdsr: error: --set: unknown key 'hiden'; did you mean hidden?"),
    ("set-other-model", ["train", "--set", "emb_seed=1"],
     "cdsr: error: --set: model sasrec has no config key 'emb_seed' (models with it: llm4cdsr)"),
    ("set-no-equals", ["train", "--set", "lr"], "cdsr: error: --set expects key=value, got 'lr'"),
    ("set-type", ["train", "--set", "threads=abc"], "cdsr: error: --set threads: expected an integer, got 'abc'"),
    ("set-number", ["train", "--set", "lr=fast"], "cdsr: error: --set lr: expected a number, got 'fast'"),
    ("set-range", ["train", "--set", "lr=-1"], "cdsr: error: lr must be a positive number, got -1.0"),
    ("set-seed", ["train", "--seed", "-1"], "cdsr: error: seed must be a non-negative integer, got -1"),
    ("set-synthetic", ["train", "--set", "syn_users=0"], "cdsr: error: syn_users=0: synthetic n_users must be >= 1, got 0"),
    ("set-preset", ["train", "--set", "synthetic_preset=huge"],
     "cdsr: error: unknown synthetic_preset 'huge'; valid choices: tiny, small, afk"),
    ("set-positions", ["train", "--set", 'gca_positions=[0,"a"]'],
     "cdsr: error: gca_positions must be a list of integers like [0,1], got [0, 'a']"),
    ("set-csv-order", ["data", "stats", "--set", "csv_order=sideways"], "cdsr: error: csv_order must be one of"),
    ("set-dropout", ["train", *TINY, "--set", "dropout=2"],
     "cdsr: error: sasrec: dropout probability has to be between 0 and 1, but got 2.0"),
    ("set-backend", ["train", *TINY, "--gca", "0", "--set", "gca_backend=nope"], "cdsr: error: gca_backend=nope: "),
    ("eval-negatives", ["train", *TINY, "--set", "eval_negatives=999"],
     "cdsr: error: synthetic-tiny: user 1 has only"),
    # unknown names, bad option values (argparse's errors are one line too)
    ("model", ["train", "--model", "nope"], "cdsr: error: unknown model 'nope'; valid models: "),
    ("data", ["train", "--data", "nope"], "cdsr: error: unknown data 'nope'; valid choices: synthetic, abe, afk, csv"),
    ("data-stats", ["data", "stats", "--data", "nope"], "cdsr: error: unknown data 'nope'"),
    ("gca-position", ["train", "--gca", "7"], "cdsr: error: gca_positions [7] not offered by sasrec"),
    ("heads", ["train", "--heads", "3"], "cdsr: error: gca_heads (3) must divide hidden (64)"),
    ("argparse-float", ["train", "--lr", "abc"],
     "cdsr train: error: argument --lr: invalid float value: 'abc' (see cdsr train --help)"),
    ("argparse-choice", ["train", "--gca-activation", "relu"], "cdsr train: error: argument --gca-activation: "),
    ("argparse-command", [], "cdsr: error: the following arguments are required: "),
    ("experiment-model", ["experiment", "table", "--preset", "tiny", "--models", "nope", "--out", "{d}/exp"],
     "cdsr: error: --models: unknown model 'nope'"),
    ("experiment-data", ["experiment", "table", "--preset", "tiny", "--data", "abe", "--set", "data_dir={d}/nope",
                         "--out", "{d}/exp"], "cdsr: error: data directory for 'abe' not found"),
    # an --out that cannot be a folder
    ("out-is-a-file", ["train", *TINY, "--out", "{d}/a.csv"], "cdsr: error: FileExistsError: "),
]
SKIP = {"train-cuda": NO_CUDA is False, "experiment-cuda": NO_CUDA is False}
# One case of each kind as a real process as well (the interpreter's start-up is most of each).
IN_A_SHELL = ["train-cuda", "ckpt-garbage", "abxi-malformed", "abxi-truncated", "csv-truncated", "npy-not-npy",
              "set-type", "argparse-float", "experiment-data", "out-is-a-file"]


def _write_abxi(folder, lines):
    folder.mkdir()
    mapping = {f"A{i}": [i, 0] for i in range(1, 4)}
    mapping.update({f"B{i}": [3 + i, 1] for i in range(1, 3)})
    (folder / "map_item_50.txt").write_text(json.dumps(mapping))
    (folder / "toy_50_preprocessed.txt").write_text("".join(line + "\n" for line in lines))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    (d / "garbage.pt").write_text("garbage\n")
    torch.save({"weights": torch.zeros(2)}, d / "other.pt")
    good = ["0 1|10 4|11 2|12 5|13", "1 3|5 4|6 1|7"]
    _write_abxi(d / "abe_malformed", good + ["7 1|10 2-12 3|13"])
    _write_abxi(d / "abe_truncated", good + ["7 1|10"])
    (d / "a.csv").write_text("A1234567890AB,0000000001,5.0,100\n")
    (d / "b_malformed.csv").write_text("A1234567890AB,B000000001,5.0,100\nA1234567890AB,B000000002,5.0,soon\n")
    (d / "b_truncated.csv").write_text("A1234567890AB,B000000001,5.0,100\n\nA1234567890AB,B000000002,5.0\n")
    (d / "text.npy").write_text("1 2 3\n")
    np.save(d / "g.npy", np.zeros((100, 1024), np.float32))  # tiny: 40 + 60 items
    np.save(d / "a.npy", np.zeros((40, 16), np.float32))
    np.save(d / "b.npy", np.zeros((60, 16), np.float32))
    cases = [(cid, [a.replace("{d}", str(d)) for a in argv], want.replace("{d}", str(d)))
             for cid, argv, want in CASES if not SKIP.get(cid)]
    in_process = main_many([argv for _, argv, _ in cases], cwd=d)
    shell_cases = [c for c in cases if c[0] in IN_A_SHELL]
    in_shell = run_many([argv for _, argv, _ in shell_cases], cwd=d)
    yield ({cid: (res, want) for (cid, _, want), res in zip(cases, in_process)},
           {cid: (res, want) for (cid, _, want), res in zip(shell_cases, in_shell)})
    shutil.rmtree(d, ignore_errors=True)


@pytest.mark.parametrize("case", [c[0] for c in CASES])
def test_bad_input_is_one_line(outcomes, case):
    if SKIP.get(case):
        pytest.skip("this machine has CUDA")
    _check(*outcomes[0][case])


@pytest.mark.parametrize("case", IN_A_SHELL)
def test_bad_input_is_one_line_in_a_shell(outcomes, case):
    if SKIP.get(case):
        pytest.skip("this machine has CUDA")
    _check(*outcomes[1][case])


def _check(res, want):
    assert res.returncode != 0, res
    assert "Traceback" not in res.stderr, res
    lines = res.stderr.strip("\n").splitlines()
    assert len(lines) == 1, res
    assert lines[0].startswith(want), f"expected the line to start with {want!r}\n{res}"


def test_every_case_is_distinct():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and set(IN_A_SHELL) <= set(ids)


@pytest.mark.skipif(not SHARED_ABE.is_dir(), reason="the Amazon abe data is not here")
def test_real_data_with_a_bad_option_is_still_one_line(tmp_path):
    from tests.cli.common import run

    res = run(["train", "--data", "abe", "--data-dir", str(SHARED_ABE), "--set", "eval_negatives=20000",
               "--epochs", "1", "--set", "progress=never"], tmp_path)
    assert res.returncode == 2 and "Traceback" not in res.stderr, res
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdsr: error: abe: user "), res
