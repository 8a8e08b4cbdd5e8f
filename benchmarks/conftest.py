"""Prints the side-by-side table (median, speed-ups, peak memory) after the benchmarks, and
writes it to the file named by GCA_BENCH_TABLE when set (benchmarks/gpu_check.sh uses it)."""

import os

from benchmarks.harness import TABLE, torch_threads_note


def pytest_terminal_summary(terminalreporter):
    text = TABLE.render()
    if text:
        terminalreporter.write_sep("=", "GCA benchmark summary (" + torch_threads_note() + ")")
        terminalreporter.write_line(text)
        path = os.environ.get("GCA_BENCH_TABLE")
        if path:
            with open(path, "w") as f:
                f.write(text + "\n")
