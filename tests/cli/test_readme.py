"""Every command README.md shows in its pipeline sections ("The pipeline: `cdsr`" and
"Reproducing the paper"), run at tiny sizes on synthetic data, so that README cannot drift
from what `cdsr` does.

The commands are read out of README.md, not copied here. Each is shrunk by fixed rules
(`shrink_*`): real datasets become the synthetic tiny preset, long sweeps lose seeds and
samples; what the line asks for otherwise (model, GCA positions, heads, seed, options) is
kept. The run folder README names for a `cdsr train` line must be the one `cdsr train` gives
that exact line, and the `cdsr evaluate` line then evaluates the tiny run's checkpoint. The
`text` synopsis may only name options that exist, and the data stats comment must match the
real data when it is here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

import models
from cdsr import config as config_mod
from cdsr.cli import _overrides, build_parser, default_out
from tests.cli.common import ROOT, TINY, main_in_process, results_path

SECTIONS = ("## The pipeline: `cdsr`", "## Reproducing the paper: `cdsr experiment`")


def _section(text: str, title: str) -> str:
    start = text.index(title)
    nxt = text.find("\n## ", start + len(title))
    return text[start:nxt if nxt >= 0 else len(text)]


def _blocks(section: str, lang: str) -> List[str]:
    return re.findall(rf"```{lang}\n(.*?)```", section, flags=re.S)


def readme_sections() -> List[str]:
    text = (ROOT / "README.md").read_text()
    return [_section(text, t) for t in SECTIONS]


def readme_commands() -> List[Tuple[str, List[str], str]]:
    """(line, argv after `cdsr`, trailing comment) of every `cdsr ...` line of the bash blocks."""
    out = []
    for section in readme_sections():
        for block in _blocks(section, "bash"):
            # A line ending in a backslash continues on the next one.
            for line in re.sub(r"\\\n\s*", "", block).splitlines():
                code, _, comment = line.partition("#")
                words = shlex.split(code)
                if words and words[0] == "cdsr":
                    out.append((line.strip(), words[1:], comment.strip()))
    return out


COMMANDS = readme_commands()


def _cases(kind):
    """pytest parameters of README's lines of one kind, named by the line."""
    return [pytest.param(line, argv, comment, id=" ".join(argv)) for line, argv, comment in COMMANDS
            if _kind(argv) == kind or argv[0] == kind]


def _drop_option(argv: List[str], name: str) -> List[str]:
    """argv without `name` and the values that follow it."""
    out, skip = [], False
    for a in argv:
        if a == name:
            skip = True
            continue
        if skip and not a.startswith("--"):
            continue
        skip = False
        out.append(a)
    return out


def _replace_option(argv: List[str], name: str, values: List[str]) -> List[str]:
    return _drop_option(argv, name) + [name, *values] if name in argv else argv


def shrink_train(argv: List[str]) -> List[str]:
    argv = _drop_option(_drop_option(argv, "--data-dir"), "--epochs")
    argv = _replace_option(argv, "--data", ["synthetic"])
    return argv + TINY


def shrink_experiment(argv: List[str]) -> List[str]:
    argv = _replace_option(argv, "--preset", ["tiny"])
    argv = _replace_option(argv, "--data", ["synthetic"])
    argv = _replace_option(argv, "--seeds", ["0"])
    argv = _replace_option(argv, "--epochs", ["1"])
    argv = _replace_option(argv, "--sample", ["2"])
    if "--scheduler" in argv:
        # A multi-node line: the same command on the local engine, output here (the Dask
        # engine runs against a real cluster in tests/experiments/test_dask_engine.py).
        argv = _replace_option(_drop_option(_drop_option(argv, "--scheduler"), "--out"), "--engine", ["local"])
    return argv + ["--quiet"]


def _kind(argv: List[str]) -> str:
    return " ".join(argv[:2]) if argv[0] in ("data", "experiment") else argv[0]


def test_readme_shows_every_command():
    kinds = {_kind(a) for _, a, _ in COMMANDS}
    assert {"train", "evaluate", "data stats", "experiment table", "experiment alignment",
            "experiment scaling"} <= kinds, kinds
    tiny = {" ".join(a[:2]) for _, a, _ in COMMANDS if a[0] == "experiment" and "tiny" in a}
    assert tiny == {"experiment table", "experiment alignment", "experiment scaling"}, \
        "README shows each experiment's tiny preset"


def test_synopsis_names_only_real_options():
    parsers = {}

    def collect(parser, prefix=""):
        parsers[prefix] = {o for a in parser._actions for o in a.option_strings}
        for a in parser._actions:
            if hasattr(a, "choices") and isinstance(a.choices, dict):
                for name, sub in a.choices.items():
                    collect(sub, f"{prefix} {name}".strip())

    collect(build_parser())
    synopsis = [b for s in readme_sections() for b in _blocks(s, "text")]
    assert synopsis, "README's synopsis block is gone"
    command = None
    for line in "".join(synopsis).splitlines():
        words = line.split("#")[0].split()
        if words and words[0] == "cdsr":
            command = " ".join(w for w in words[1:3] if not w.startswith(("-", "[")) and "|" not in w)
            command = command if command in parsers else words[1]
        for opt in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", line):
            assert opt in parsers[command], f"README's synopsis shows `cdsr {command} {opt}`, which does not exist"


def test_inline_set_examples_are_valid():
    found = []
    for section in readme_sections():
        for key, value in re.findall(r"--set ([a-z_]+)=([^\s`,)]+)", section):
            if key == "key" or value.isupper():
                continue  # the placeholders `--set key=value`, `--set threads=N`
            owners = [m for m in models.MODEL_NAMES if key in config_mod.valid_keys(m)]
            assert owners, f"README's `--set {key}=...` is not a config key"
            for v in value.split("|"):
                config_mod.make_config(owners[0], {}, [f"{key}={v}"])
            found.append(key)
    assert "synthetic_preset" in found and "threads" in found


@pytest.fixture(scope="module")
def readme_runs(tmp_path_factory) -> Dict[str, Path]:
    """Each README `cdsr train` line, shrunk and run in one folder: README's run folder name
    (for the line as written) -> the tiny run's folder."""
    cwd = tmp_path_factory.mktemp("readme")
    runs = {}
    for line, argv, _ in COMMANDS:
        if argv[0] != "train":
            continue
        args = build_parser().parse_args(argv)
        named = default_out(config_mod.make_config(args.model, _overrides(args), args.set))
        out = main_in_process(shrink_train(argv), cwd)
        assert out.returncode == 0, f"README line `{line}` (shrunk) failed:\n{out}"
        run_dir = cwd / results_path(out.stdout).parent
        assert (run_dir / "train.log").is_file() and (run_dir / "results.json").is_file()
        runs[str(named)] = run_dir
    return runs


@pytest.mark.parametrize("line,argv,comment", _cases("train"))
def test_train_lines(readme_runs, line, argv, comment):
    args = build_parser().parse_args(argv)
    assert str(default_out(config_mod.make_config(args.model, _overrides(args), args.set))) in readme_runs


@pytest.mark.parametrize("line,argv,comment", _cases("evaluate"))
def test_evaluate_lines(readme_runs, tmp_path, line, argv, comment):
    ck = Path(argv[argv.index("--checkpoint") + 1])
    assert str(ck.parent) in readme_runs, (
        f"README evaluates {ck}, but its `cdsr train` lines write {sorted(readme_runs)}")
    argv = list(argv)
    argv[argv.index("--checkpoint") + 1] = str(readme_runs[str(ck.parent)] / ck.name)
    out = main_in_process(argv, tmp_path)
    assert out.returncode == 0, out
    assert "test   A" in out.stdout


@pytest.mark.parametrize("line,argv,comment", _cases("data stats"))
def test_data_stats_lines(tmp_path, line, argv, comment):
    # On synthetic data, as everywhere here ...
    small = _replace_option(_drop_option(argv, "--data-dir"), "--data", ["synthetic"]) + \
        ["--set", "synthetic_preset=tiny"]
    out = main_in_process(small, tmp_path)
    assert out.returncode == 0 and "users        64" in out.stdout, out
    # ... and as written, when its data is here: the numbers in the comment must be right.
    if "--data-dir" in argv and not (ROOT / argv[argv.index("--data-dir") + 1]).is_dir():
        pytest.skip(f"{argv[argv.index('--data-dir') + 1]} is not here")
    out = main_in_process(argv, ROOT)
    assert out.returncode == 0, out
    for number in re.findall(r"\d[\d,]*", comment):
        assert number in out.stdout, f"README says {number} for `{line}`; cdsr prints:\n{out.stdout}"


def _out(argv: List[str], cwd: Path) -> Path:
    return cwd / argv[argv.index("--out") + 1] if "--out" in argv else cwd / "runs" / "experiments" / argv[1]


@pytest.mark.parametrize("line,argv,comment", [c for c in _cases("experiment") if c.values[1][1] != "protocol"])
def test_experiment_lines(tmp_path, line, argv, comment):
    small = shrink_experiment(argv)
    out = main_in_process(small, tmp_path)
    assert out.returncode == 0, out
    name = argv[1]
    report = _out(small, tmp_path) / "report.md"
    assert report.is_file() and "## What ran" in report.read_text()
    assert f"{name}: " in out.stdout and "runs done" in out.stdout and "failed" not in out.stdout


def test_protocol_lines(tmp_path):
    """README's `protocol` line compares the folders its `table` lines write: run those
    lines (shrunk) in one folder, then the protocol line as written."""
    lines = [argv for _, argv, _ in COMMANDS if argv[0] == "experiment"]
    compare = [a for a in lines if a[1] == "protocol"]
    assert len(compare) == 1, "README shows one `cdsr experiment protocol` line"
    compare = compare[0]
    wanted = {compare[compare.index("--reference") + 1], compare[compare.index("--candidates") + 1]}
    for argv in lines:
        if argv[1] == "table" and "--out" in argv and argv[argv.index("--out") + 1] in wanted:
            out = main_in_process(shrink_experiment(argv), tmp_path)
            assert out.returncode == 0, out
            wanted.discard(argv[argv.index("--out") + 1])
    assert not wanted, f"README's protocol line reads {wanted}, which no README table line writes"
    out = main_in_process(compare, tmp_path)
    assert out.returncode == 0, out
    report = (_out(compare, tmp_path) / "report.md").read_text()
    assert "## Candidates against the reference" in report and "| `lr=0.0003 " in report
