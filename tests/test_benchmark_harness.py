"""The benchmark harness's estimators (the benchmarks themselves run with --benchmark-only).

`paired_speedup` is driven by a fake clock: each call advances it by a chosen cost, so the
estimate is checked exactly, without sleeping or depending on the machine's load.
"""

import types

import pytest

from benchmarks import harness


class FakeClock:
    def __init__(self):
        self.now = 1000.0
        self.events = []

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(perf_counter=c.perf_counter))
    monkeypatch.setattr(harness, "synchronize", lambda device: c.events.append(("sync", device)))
    return c


def _timed(clock, name, costs):
    """A workload whose i-th call takes costs[i] seconds of the fake clock."""
    calls = []

    def fn():
        clock.events.append(name)
        clock.now += costs[len(calls) % len(costs)]
        calls.append(name)
    return fn, calls


def test_median_of_per_pair_ratios(clock):
    # per-pair ratios 3, 5, 4, 3, 5: their median is 4, while the ratio of the two medians
    # (50 / 10) is 5 and the ratio of the means (291.8 / 62.6) is about 4.66
    base, b_calls = _timed(clock, "b", [3.0, 50.0, 400.0, 6.0, 1000.0])
    fused, f_calls = _timed(clock, "f", [1.0, 10.0, 100.0, 2.0, 200.0])
    assert harness.paired_speedup(base, fused, "cpu", min_time=0.0, min_pairs=5) == 4.0
    assert len(b_calls) == len(f_calls) == 5


def test_order_alternates_and_every_call_is_synchronised(clock):
    base, _ = _timed(clock, "b", [2.0])
    fused, _ = _timed(clock, "f", [1.0])
    assert harness.paired_speedup(base, fused, "cuda", min_time=0.0, min_pairs=4) == 2.0
    calls = [e for e in clock.events if isinstance(e, str)]
    assert calls == ["b", "f", "f", "b", "b", "f", "f", "b"]  # neither side always runs first
    s = ("sync", "cuda")
    assert clock.events[:6] == [s, "b", s, s, "f", s]
    assert clock.events.count(s) == 2 * len(calls)


def test_runs_until_both_min_pairs_and_min_time(clock):
    base, b_calls = _timed(clock, "b", [4.0])
    fused, _ = _timed(clock, "f", [1.0])
    # each pair takes 5 s of the clock: 3 pairs satisfy min_pairs, min_time=50 needs 10
    assert harness.paired_speedup(base, fused, "cpu", min_time=50.0, min_pairs=3) == 4.0
    assert len(b_calls) == 10
    # min_pairs wins over a short min_time
    base, b_calls = _timed(clock, "b", [4.0])
    fused, _ = _timed(clock, "f", [1.0])
    harness.paired_speedup(base, fused, "cpu", min_time=1.0, min_pairs=7)
    assert len(b_calls) == 7
    # and it never runs more than 200 pairs
    base, b_calls = _timed(clock, "b", [4.0])
    fused, _ = _timed(clock, "f", [1.0])
    harness.paired_speedup(base, fused, "cpu", min_time=1e9, min_pairs=3)
    assert len(b_calls) == 200


def test_a_hiccup_in_one_pair_does_not_move_the_estimate(clock):
    base, _ = _timed(clock, "b", [8.0, 8.0, 8.0, 8.0, 8.0, 8.0, 8.0])
    fused, _ = _timed(clock, "f", [2.0, 2.0, 2.0, 500.0, 2.0, 2.0, 2.0])
    assert harness.paired_speedup(base, fused, "cpu", min_time=0.0, min_pairs=7) == 4.0
