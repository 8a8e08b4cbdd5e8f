"""Loaders (ABXI format, raw ratings CSVs), their error messages, and the synthetic generator."""

import json
from pathlib import Path

import numpy as np
import pytest

from cdsr.dataset import DataError
from cdsr.loaders import load_abxi, load_ratings_pair, preprocess_two_domains, read_ratings_csv
from cdsr.synthetic import PRESETS, SyntheticSpec, generate

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data" / "amazon"


@pytest.mark.skipif(not (SHARED / "abe").is_dir(), reason="shared Amazon data not present")
def test_abe_matches_published_counts():
    ds = load_abxi(SHARED / "abe", "abe")
    assert ds.n_users == 4474
    assert (ds.n_items_a, ds.n_items_b) == (10379, 14188)
    assert ds.n_interactions == 114129
    # every user has both domains and at least 10 interactions (ABXI's preprocessing)
    assert ds.lengths.min() >= 10


def _write_abxi(d: Path, lines, n_a=3, n_b=2):
    d.mkdir(parents=True, exist_ok=True)
    mapping = {f"A{i}": [i, 0] for i in range(1, n_a + 1)}
    mapping.update({f"B{i}": [n_a + i, 1] for i in range(1, n_b + 1)})
    (d / "map_item_50.txt").write_text(json.dumps(mapping))
    (d / "toy_50_preprocessed.txt").write_text("".join(line + "\n" for line in lines))
    return d


def test_abxi_toy(tmp_path):
    d = _write_abxi(tmp_path / "toy", ["0 1|10 4|11 2|12 5|13", "", "2 2|1 5|1 1|2"])
    ds = load_abxi(d)
    assert ds.n_users == 2 and ds.n_items_a == 3 and ds.n_items_b == 2
    assert ds.timeline(1).tolist() == [1, 4, 2, 5]
    assert ds.timeline(2).tolist() == [2, 5, 1]
    assert ds.times[:4].tolist() == [10, 11, 12, 13]


def test_abxi_short_line_is_an_error_not_a_dropped_user(tmp_path):
    # ABXI's preprocessing keeps >= 5 interactions per domain: a line with fewer than the 3
    # leave-one-out needs is cut short (or not this format), not a user to drop quietly.
    d = _write_abxi(tmp_path / "toy", ["0 1|10 4|11 2|12 5|13", "1 3|5 4|6", "2 2|1 5|1 1|2"])
    with pytest.raises(DataError, match=r"toy_50_preprocessed.txt:2: user 1 has 2 interaction\(s\)"):
        load_abxi(d)


@pytest.mark.parametrize("bad, match", [
    ("0 1|10 4-11", r"toy_50_preprocessed.txt:2: field 3 is '4-11', expected 'item\|timestamp'"),
    ("0 1|10 9|11 2|3", r"toy_50_preprocessed.txt:2: unknown item id 9"),
    ("x 1|10 2|11 3|12", r"toy_50_preprocessed.txt:2: the user id 'x'"),
    ("0 1|10 2|11 3", r"toy_50_preprocessed.txt:2: field 4 is '3'"),
    ("0 1|10 2|11 3|", r"toy_50_preprocessed.txt:2: field 4 is '3\|'"),
    ("0 1|10 2|11|5 3|4", r"toy_50_preprocessed.txt:2: field 3 is '2\|11\|5'"),
    ("0", r"toy_50_preprocessed.txt:2: user 0 has 0 interaction"),
])
def test_abxi_malformed_lines_name_file_and_line(tmp_path, bad, match):
    d = _write_abxi(tmp_path / "toy", ["0 1|10 4|11 2|12", bad])
    with pytest.raises(DataError, match=match) as err:
        load_abxi(d)
    # the message is ours, not numpy's or int()'s
    assert "literal" not in str(err.value) and "inhomogeneous" not in str(err.value)


def test_abxi_map_ids_must_be_a_then_b(tmp_path):
    d = _write_abxi(tmp_path / "toy", ["0 1|10 4|11 2|12"])
    (d / "map_item_50.txt").write_text(json.dumps({"A1": [1, 0], "A2": [3, 0], "B1": [2, 1]}))
    with pytest.raises(DataError, match="map_item_50.txt: domain 0 ids must be 1..2"):
        load_abxi(d)
    (d / "map_item_50.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="map_item_50.txt: not a text file"):
        load_abxi(d)


def test_abxi_empty_file_and_missing_dir(tmp_path):
    d = _write_abxi(tmp_path / "toy", [])
    with pytest.raises(DataError, match="empty"):
        load_abxi(d)
    with pytest.raises(DataError, match="does not exist"):
        load_abxi(tmp_path / "nope")


# ---- raw ratings CSVs ----------------------------------------------------------------------
def _rows():
    """Two domains; item k-core 2, per-domain minimum 1. User u3 is only in domain A, item
    AX has one rating (dropped by the k-core), user u1 has more than max_per_user=4."""
    a = [("u1", "0000000001", 1), ("u2", "0000000001", 2), ("u1", "0000000002", 5),
         ("u2", "0000000002", 6), ("u3", "0000000001", 7), ("u1", "000000000X", 8)]
    b = [("u1", "B000000001", 3), ("u2", "B000000001", 4), ("u1", "B000000002", 9),
         ("u2", "B000000002", 1), ("u1", "B000000001", 10)]
    return a, b


def _write_csv(path: Path, rows, order):
    with open(path, "w") as f:
        for u, i, t in rows:
            f.write(f"{u},{i},5.0,{t}\n" if order == "user-item" else f"{i},{u},5.0,{t}\n")
    return path


@pytest.mark.parametrize("order", ["user-item", "item-user"])
def test_csv_both_orders_same_dataset(tmp_path, order):
    a, b = _rows()
    pa = _write_csv(tmp_path / "a.csv", a, order)
    pb = _write_csv(tmp_path / "b.csv", b, order)
    ds = load_ratings_pair(str(pa), str(pb), order="auto", item_min=2, max_per_user=4,
                           user_min_per_domain=1, cache_dir=str(tmp_path / "cache"))
    assert ds.n_users == 2  # u3 is not in domain B
    assert (ds.n_items_a, ds.n_items_b) == (2, 2)  # AX dropped (one rating)
    # u1: A1@1 B1@3 A2@5 B2@9 B1@10 -> last 4 ; u2: B2@1 A1@2 B1@4 A2@6
    assert ds.timeline(1).tolist() == [3, 2, 4, 3]
    assert ds.timeline(2).tolist() == [4, 1, 3, 2]
    assert ds.notes  # filtered counts are recorded
    # second call is served from the cache and identical
    assert len(list((tmp_path / "cache").glob("*.npz"))) == 1
    again = load_ratings_pair(str(pa), str(pb), order="auto", item_min=2, max_per_user=4,
                              user_min_per_domain=1, cache_dir=str(tmp_path / "cache"))
    assert np.array_equal(again.items, ds.items) and np.array_equal(again.offsets, ds.offsets)


def test_csv_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text("A1234567890AB,0000000001,5.0,100\nA1234567890AB,0000000002,5.0\n")
    with pytest.raises(DataError, match=r"bad.csv:2: expected 4"):
        read_ratings_csv(p, "user-item")
    p.write_text("A1234567890AB,0000000001,5.0,soon\n")
    with pytest.raises(DataError, match=r"bad.csv:1: timestamp"):
        read_ratings_csv(p, "user-item")
    p.write_text("")
    with pytest.raises(DataError, match="empty"):
        read_ratings_csv(p)
    with pytest.raises(DataError, match="does not exist"):
        read_ratings_csv(tmp_path / "missing.csv")
    p.write_text("A1234567890AB,0000000001,5.0,100\n,0000000002,5.0,101\n")
    with pytest.raises(DataError, match=r"bad.csv:2: the user id \(column 1\) is empty"):
        read_ratings_csv(p, "user-item")
    p.write_bytes(b"A1234567890AB,0000000001,5.0,100\n\xff\xfe,x,5.0,1\n")
    with pytest.raises(DataError, match=r"bad.csv:2: not UTF-8 text"):
        read_ratings_csv(p, "user-item")


def test_csv_damaged_cache_is_rebuilt(tmp_path):
    a, b = _rows()
    pa = _write_csv(tmp_path / "a.csv", a, "user-item")
    pb = _write_csv(tmp_path / "b.csv", b, "user-item")
    kw = dict(order="user-item", item_min=2, max_per_user=4, user_min_per_domain=1, cache_dir=str(tmp_path / "c"))
    ds = load_ratings_pair(str(pa), str(pb), **kw)
    (cached,) = (tmp_path / "c").glob("*.npz")
    cached.write_bytes(b"not a zip")
    again = load_ratings_pair(str(pa), str(pb), **kw)
    assert np.array_equal(again.items, ds.items)


def test_preprocess_user_minimum_per_domain():
    a = ([0, 0, 1], [0, 0, 0], [1, 2, 3])
    b = ([0, 1, 1], [0, 0, 0], [4, 5, 6])
    # user 0 has 2 A / 1 B, user 1 has 1 A / 2 B: nobody qualifies
    with pytest.raises(DataError, match="no user is left"):
        preprocess_two_domains(a, b, item_min=1, max_per_user=50, user_min_per_domain=2)
    ds = preprocess_two_domains(a, b, item_min=1, max_per_user=50, user_min_per_domain=1)
    assert ds.n_users == 2 and ds.timeline(1).tolist() == [1, 1, 2]


# ---- synthetic -------------------------------------------------------------------------------
def test_synthetic_deterministic_per_seed():
    a, b = generate(PRESETS["tiny"]), generate(PRESETS["tiny"])
    assert np.array_equal(a.items, b.items) and np.array_equal(a.offsets, b.offsets)
    c = generate(SyntheticSpec(**{**PRESETS["tiny"].__dict__, "seed": 1}))
    assert not np.array_equal(a.items[:200], c.items[:200])
    assert a.items.min() >= 1 and a.items.max() <= a.n_items


def _next_a_given_last_b(ds, k):
    """Concentration of the next A item's cluster given the latest B item's cluster."""
    counts = np.zeros((k, k))
    for u in range(1, ds.n_users + 1):
        last_b = -1
        for it in ds.timeline(u):
            if it > ds.n_items_a:
                last_b = (it - ds.n_items_a - 1) % k
            elif last_b >= 0:
                counts[last_b, (it - 1) % k] += 1
    return (counts.max(axis=1).sum() / counts.sum())


def test_synthetic_planted_signal_strength():
    base = PRESETS["tiny"].__dict__
    k = base["n_clusters"]
    strong = _next_a_given_last_b(generate(SyntheticSpec(**{**base, "n_users": 400, "signal": 1.0})), k)
    none = _next_a_given_last_b(generate(SyntheticSpec(**{**base, "n_users": 400, "signal": 0.0})), k)
    assert strong > 0.99  # B fully determines the next A cluster
    assert none < 0.45  # close to 1/k = 0.25


def test_synthetic_spec_checks():
    with pytest.raises(ValueError, match="signal"):
        SyntheticSpec(signal=1.5)
    with pytest.raises(ValueError, match="min_len"):
        SyntheticSpec(min_len=2)


def test_csv_order_undetectable(tmp_path):
    p = tmp_path / "odd.csv"
    p.write_text("u1,i1,5.0,1\nu2,i2,4.0,2\n")
    with pytest.raises(DataError, match="--csv-order"):
        read_ratings_csv(p)


def test_missing_data_dir_is_a_clear_error(tmp_path, monkeypatch):
    from cdsr.loaders import resolve_abxi_dir

    monkeypatch.setenv("CDSR_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match="--data-dir or set CDSR_DATA_DIR"):
        resolve_abxi_dir("abe")
    (tmp_path / "abe").mkdir()
    assert resolve_abxi_dir("abe") == tmp_path / "abe"
