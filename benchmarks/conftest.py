"""Prints the side-by-side table (median, speed-ups, peak memory) after the benchmarks."""

from benchmarks.harness import TABLE, torch_threads_note


def pytest_terminal_summary(terminalreporter):
    text = TABLE.render()
    if text:
        terminalreporter.write_sep("=", "GCA benchmark summary (" + torch_threads_note() + ")")
        terminalreporter.write_line(text)
