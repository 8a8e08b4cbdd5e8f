"""What the command-line tests share: the tiny settings, and two ways to run `cdsr` as a user
does: a subprocess of `python -m cdsr ...` (exit status and stderr exactly as a shell sees
them) and `cdsr.cli.main(argv)` in this process (the same code path the `cdsr` script and
`python -m cdsr` run, without paying the interpreter and torch start-up per call).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
SHARED_ABE = ROOT.parent / "shared" / "data" / "amazon" / "abe"

# Tiny synthetic data (64 users, 40 / 60 items), one epoch, small models: seconds per run.
TINY = ["--set", "synthetic_preset=tiny", "--epochs", "1", "--hidden", "16", "--set", "max_len=20",
        "--set", "progress=never"]


@dataclass
class Result:
    argv: List[str]
    returncode: int
    stdout: str
    stderr: str

    def __str__(self) -> str:  # what a failing assertion shows
        return (f"cdsr {' '.join(self.argv)} -> {self.returncode}\n--- stdout\n{self.stdout[-2000:]}"
                f"\n--- stderr\n{self.stderr[-3000:]}")


def env(tmp: Path, **extra: str) -> Dict[str, str]:
    """The environment of a subprocess: this checkout importable, caches under `tmp`, not
    inside a torchrun job."""
    out = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               CDSR_CACHE_DIR=str(tmp / "cache"))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "CDSR_DATA_DIR"):
        out.pop(k, None)
    out.update(extra)
    return out


def run(argv: Sequence[str], cwd: Path, timeout: float = 300, **extra_env: str) -> Result:
    """`python -m cdsr <argv>` in `cwd`."""
    done = subprocess.run([sys.executable, "-m", "cdsr", *argv], cwd=cwd, env=env(Path(cwd), **extra_env),
                          capture_output=True, text=True, timeout=timeout)
    return Result(list(argv), done.returncode, done.stdout, done.stderr)


def run_many(cases: Iterable[Sequence[str]], cwd: Path, workers: Optional[int] = None) -> List[Result]:
    """Several independent `python -m cdsr` commands, a few at a time (most of each is the
    interpreter's start-up, which parallelises)."""
    cases = list(cases)
    workers = workers or max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda a: run(a, cwd), cases))


def main_in_process(argv: Sequence[str], cwd: Path) -> Result:
    """`cdsr.cli.main(argv)` with `cwd` as working directory, its stdout and stderr captured as
    a fresh process would show them: log lines go to stderr at INFO (what `cdsr` sets up), an
    uncaught exception becomes a traceback on stderr and status 1, SystemExit (argparse) its
    status."""
    import logging
    import traceback

    from cdsr.cli import main

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(message)s", "%H:%M:%S"))
    root.handlers, root.level = [handler], logging.INFO
    old = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 2
            except Exception:  # noqa: BLE001 - what the interpreter would print
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(old)
        root.handlers, root.level = saved
    return Result(list(argv), code, out.getvalue(), err.getvalue())


def main_many(cases: Iterable[Sequence[str]], cwd: Path) -> List[Result]:
    return [main_in_process(a, cwd) for a in cases]


def results_path(stdout: str) -> Path:
    """The `results: <path>` line `cdsr train` prints."""
    for line in stdout.splitlines():
        if line.startswith("results: "):
            return Path(line.split()[1])
    raise AssertionError(f"no 'results:' line in:\n{stdout}")
