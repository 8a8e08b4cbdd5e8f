"""The benchmark harness's estimators (the benchmarks themselves run with --benchmark-only)."""

import time

from benchmarks.harness import paired_speedup


def test_paired_speedup_is_the_ratio_of_interleaved_calls():
    calls = []

    def base():
        calls.append("b")
        time.sleep(0.02)

    def fused():
        calls.append("f")
        time.sleep(0.005)

    r = paired_speedup(base, fused, "cpu", min_time=0.0, min_pairs=5)
    assert 2.5 < r < 6.0  # 4 in theory; sleep overshoots by a little on a busy machine
    assert len(calls) == 10
    # the order inside a pair alternates: neither side always runs first
    assert calls[:4] == ["b", "f", "f", "b"]
