"""Leave-one-out batches against hand-built examples and a brute-force reference; the seeded
evaluation candidates; the training sampler's determinism and sharding."""

import numpy as np
import pytest

from cdsr.batching import TrainSampler, build_eval_set
from cdsr.dataset import DataError, from_timelines
from cdsr.synthetic import PRESETS, generate

# nA = 3 (items 1..3), nB = 3 (items 4..6)
TOY = [[1, 4, 2, 5, 6, 3, 4, 2, 6], [4, 5, 1], [6, 1, 2, 4, 5]]


def toy():
    return from_timelines("toy", 3, 3, TOY)


def test_train_batch_by_hand():
    ds = toy()
    s = TrainSampler(ds, max_len=8, batch_size=4, n_negatives={"A": 2, "B": 3}, seed=0)
    # user 2 has 3 interactions: one training item only, no (input, target) pair
    assert sorted(s.users.tolist()) == [1, 3]
    b = s.build(np.array([1]), np.random.default_rng(0))
    row = {k: v[0].tolist() for k, v in b.items() if k not in ("user",)}
    # training items of user 1: [1, 4, 2, 5, 6, 3, 4] (the last two are valid / test)
    assert row["seq"] == [0, 0, 1, 4, 2, 5, 6, 3]
    assert row["target"] == [0, 0, 4, 2, 5, 6, 3, 4]
    assert row["seq_domain"] == [-1, -1, 0, 1, 0, 1, 1, 0]
    assert row["target_domain"] == [-1, -1, 1, 0, 1, 1, 0, 1]
    assert row["seq_a"] == [0, 0, 0, 0, 0, 1, 2, 3]
    assert row["time_a"] == [-1, -1, -1, -1, -1, 2, 4, 7]
    assert row["target_a"] == [0, 0, 0, 0, 0, 2, 3, 0]
    assert row["seq_b"] == [0, 0, 0, 0, 0, 4, 5, 6]
    assert row["time_b"] == [-1, -1, -1, -1, -1, 3, 5, 6]
    assert row["target_b"] == [0, 0, 0, 0, 0, 5, 6, 4]
    assert row["last_a"] == [-1, -1, 5, 5, 6, 6, 6, 7]
    assert row["last_b"] == [-1, -1, -1, 5, 5, 6, 7, 7]
    assert b["neg_a"].shape == (1, 8, 2) and b["neg_b"].shape == (1, 8, 3)
    assert b["neg_a"].min() >= 1 and b["neg_a"].max() <= 3
    assert b["neg_b"].min() >= 4 and b["neg_b"].max() <= 6


def test_window_truncates_to_most_recent():
    ds = toy()
    s = TrainSampler(ds, max_len=3, batch_size=4, n_negatives={"A": 1, "B": 1}, seed=0)
    b = s.build(np.array([1]), np.random.default_rng(0))
    assert b["seq"][0].tolist() == [5, 6, 3] and b["target"][0].tolist() == [6, 3, 4]
    assert b["seq_a"][0].tolist() == [0, 0, 3] and b["time_a"][0].tolist() == [-1, -1, 2]


def _brute(seq_row, ext_row, n_a):
    """Reference for one row, written the slow, obvious way."""
    length = len(seq_row)
    out = {}
    for key, is_d in (("a", lambda x: 0 < x <= n_a), ("b", lambda x: x > n_a)):
        cols = [t for t in range(length) if is_d(seq_row[t])]
        pad = length - len(cols)
        out[f"seq_{key}"] = [0] * pad + [seq_row[t] for t in cols]
        out[f"time_{key}"] = [-1] * pad + cols
        nxt = []
        for t in cols:
            later = [ext_row[j] for j in range(t + 1, length + 1) if is_d(ext_row[j])]
            nxt.append(later[0] if later else 0)
        out[f"target_{key}"] = [0] * pad + nxt
        last = []
        for t in range(length):
            seen = [pad + i for i, c in enumerate(cols) if c <= t]
            last.append(seen[-1] if seen else -1)
        out[f"last_{key}"] = last
    return out


def test_history_features_match_brute_force():
    ds = generate(PRESETS["tiny"])
    rng = np.random.default_rng(1)
    s = TrainSampler(ds, max_len=10, batch_size=64, n_negatives={"A": 1, "B": 1}, seed=0)
    b = s.build(s.users, rng)
    ext = np.concatenate([b["seq"], b["target"][:, -1:]], axis=1)
    for r in range(len(s.users)):
        ref = _brute(b["seq"][r].tolist(), ext[r].tolist(), ds.n_items_a)
        for k, v in ref.items():
            assert b[k][r].tolist() == v, (r, k)


def test_eval_batch_history_and_targets():
    # the toy data with two more items per domain (B ids shifted by 2), so negatives exist
    ds = from_timelines("toy5", 5, 5, [[x if x <= 3 else x + 2 for x in t] for t in TOY])
    ev = build_eval_set(ds, "valid", n_negatives=2, seed=0)
    assert ev.end.tolist() == [7, 1, 3]
    assert ev.candidates[:, 0].tolist() == [2, 7, 6]
    assert ev.eval_domain.tolist() == [0, 1, 1]
    test = build_eval_set(ds, "test", n_negatives=2, seed=0)
    assert test.candidates[:, 0].tolist() == [8, 1, 7]
    # user 1's negatives: the only two B items never seen (9, 10)
    assert sorted(test.candidates[0, 1:].tolist()) == [9, 10]
    b = next(test.batches(ds, max_len=8, batch_size=8))
    assert b["seq"][0].tolist() == [1, 6, 2, 7, 8, 3, 6, 2]
    assert b["seq"][1].tolist() == [0] * 6 + [6, 7]
    assert b["seq_b"][1].tolist() == [0] * 6 + [6, 7] and b["seq_a"][1].tolist() == [0] * 8
    assert b["eval_domain"].tolist() == [1, 0, 1]
    assert "target" not in b and b["candidates"].shape == (3, 3)


def test_eval_candidates_seeded_and_exclude_user_items():
    ds = generate(PRESETS["tiny"])
    a = build_eval_set(ds, "test", n_negatives=20, seed=5)
    b = build_eval_set(ds, "test", n_negatives=20, seed=5)
    c = build_eval_set(ds, "valid", n_negatives=20, seed=5)
    assert np.array_equal(a.candidates, b.candidates)
    assert not np.array_equal(a.candidates[:, 1:], c.candidates[:, 1:])
    for r, u in enumerate(a.users):
        seen = set(ds.timeline(int(u)).tolist())
        negs = a.candidates[r, 1:]
        assert len(set(negs.tolist())) == 20  # no duplicates
        assert not seen & set(negs.tolist())
        if a.eval_domain[r] == 0:
            assert negs.min() >= 1 and negs.max() <= ds.n_items_a
        else:
            assert negs.min() > ds.n_items_a and negs.max() <= ds.n_items


def test_eval_negatives_more_than_available():
    with pytest.raises(DataError, match="eval_negatives"):
        build_eval_set(toy(), "test", n_negatives=999)


def test_sampler_deterministic_and_sharded():
    ds = generate(PRESETS["tiny"])
    one = TrainSampler(ds, 12, 16, {"A": 2, "B": 2}, seed=3)
    e1 = [b["user"].tolist() for b in one.epoch(4)]
    e1b = [b["user"].tolist() for b in one.epoch(4)]
    assert e1 == e1b
    assert [b["user"].tolist() for b in one.epoch(5)] != e1
    neg1 = [b["neg_a"] for b in one.epoch(4)]
    assert all((x == y).all() for x, y in zip(neg1, [b["neg_a"] for b in one.epoch(4)]))
    shards = [TrainSampler(ds, 12, 16, {"A": 2, "B": 2}, seed=3, rank=r, world_size=2) for r in range(2)]
    users = [sum((b["user"].tolist() for b in s.epoch(4)), []) for s in shards]
    assert len(users[0]) == len(users[1])
    assert set(users[0]) | set(users[1]) == set(one.users.tolist())
    assert shards[0].n_batches() == len(list(shards[0].epoch(4)))
