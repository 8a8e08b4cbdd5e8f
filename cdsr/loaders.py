"""Loaders for the two real-data formats.

(a) The ABXI authors' preprocessed format (`../shared/data/amazon/{abe,afk}`): one line per
    user, `uid item|ts item|ts ...` in time order, plus `map_item_50.txt` (JSON
    `{ASIN: [id, domain]}`) that fixes the two domains' id ranges.
(b) Raw Amazon ratings-only CSVs (no header): 2014 releases `user,item,rating,timestamp`,
    2018 releases `item,user,rating,timestamp`. They go through the same preprocessing as the
    ABXI data (overlapping users, item k-core, last N interactions, per-domain minimum) and the
    result is cached as `.npz`, keyed by the files' identity and the thresholds.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

from cdsr.dataset import MIN_TIMELINE, CDSRDataset, DataError, from_timelines

log = logging.getLogger("cdsr.data")

ABXI_NAMES = ("abe", "afk")
ABXI_DOMAINS = {"abe": ("Beauty", "Electronics"), "afk": ("Food", "Kitchen")}


# ---------------------------------------------------------------------------------------
# (a) ABXI preprocessed format
# ---------------------------------------------------------------------------------------
def _read_item_counts(map_path: Path) -> Tuple[int, int]:
    """(items of A, items of B) from `map_item_*.txt`, whose ids must be A = 1..nA and
    B = nA+1..nA+nB (the id layout the rest of the pipeline relies on)."""
    try:
        mapping = json.loads(map_path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{map_path}: not a text file (expected JSON {{ASIN: [id, domain]}})") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{map_path}: not valid JSON ({e})") from None
    if not isinstance(mapping, dict) or not mapping:
        raise DataError(f"{map_path}: expected a non-empty JSON object {{ASIN: [id, domain]}}")
    ids: List[List[int]] = [[], []]
    for asin, v in mapping.items():
        if not (isinstance(v, list) and len(v) == 2 and v[1] in (0, 1) and type(v[0]) is int):
            raise DataError(f"{map_path}: entry {asin!r} is {v!r}, expected [id, 0|1]")
        ids[v[1]].append(v[0])
    n_a, n_b = len(ids[0]), len(ids[1])
    for dom, lo in ((0, 1), (1, n_a + 1)):
        got = sorted(ids[dom])
        if got != list(range(lo, lo + len(got))):
            raise DataError(f"{map_path}: domain {dom} ids must be {lo}..{lo + len(got) - 1} "
                            f"(A first, then B), got {got[0]}..{got[-1]} with gaps or repeats")
    return n_a, n_b


def _text_lines(path: Path, expected: str) -> Iterator[Tuple[int, str]]:
    """(line number, text) of a UTF-8 file; a line that is not UTF-8 is a DataError naming it
    (decoded line by line: a decoder reading ahead would misplace the line number)."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                yield lineno, raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(f"{path}:{lineno}: not UTF-8 text ({expected})") from None


def _parse_abxi_line(parts: List[str], where: str, n_items: int) -> Tuple[List[int], List[int]]:
    """`uid item|ts item|ts ...` -> (items, timestamps); errors say which field is wrong."""
    if not parts[0].isdecimal():
        raise DataError(f"{where}: the user id {parts[0]!r} is not a non-negative integer "
                        f"(expected 'uid item|ts item|ts ...')")
    items: List[int] = []
    times: List[int] = []
    for j, tok in enumerate(parts[1:], 2):
        item, sep, ts = tok.partition("|")
        if not sep or not item.isdecimal() or not ts.removeprefix("-").isdecimal():
            raise DataError(f"{where}: field {j} is {tok!r}, expected 'item|timestamp' (two integers)")
        i = int(item)
        if not 1 <= i <= n_items:
            raise DataError(f"{where}: unknown item id {i} in field {j} (valid ids are 1..{n_items})")
        items.append(i)
        times.append(int(ts))
    if len(items) < MIN_TIMELINE:
        # A preprocessed file never holds such a user (ABXI keeps >= 5 per domain): the line is
        # cut short, or the file is not in this format.
        raise DataError(f"{where}: user {parts[0]} has {len(items)} interaction(s), fewer than the "
                        f"{MIN_TIMELINE} leave-one-out needs (a truncated line?)")
    return items, times


def load_abxi(data_dir: str | os.PathLike, name: Optional[str] = None) -> CDSRDataset:
    """Read `<dir>/*_preprocessed.txt` and `<dir>/map_item_*.txt`."""
    d = Path(data_dir)
    if not d.is_dir():
        raise DataError(f"data directory {d} does not exist")
    txts = sorted(glob.glob(str(d / "*_preprocessed.txt")))
    if len(txts) != 1:
        raise DataError(f"{d}: expected exactly one *_preprocessed.txt file, found {len(txts)}")
    maps = sorted(glob.glob(str(d / "map_item_*.txt")))
    if len(maps) != 1:
        raise DataError(f"{d}: expected exactly one map_item_*.txt file, found {len(maps)}")
    path = Path(txts[0])
    n_a, n_b = _read_item_counts(Path(maps[0]))
    name = name or d.name
    n_items = n_a + n_b

    timelines: List[np.ndarray] = []
    times: List[np.ndarray] = []
    for lineno, line in _text_lines(path, "expected 'uid item|ts item|ts ...'"):
        parts = line.split()
        if not parts:
            continue
        items, ts = _parse_abxi_line(parts, f"{path}:{lineno}", n_items)
        timelines.append(np.array(items, dtype=np.int64))
        times.append(np.array(ts, dtype=np.int64))
    if not timelines:
        raise DataError(f"{path}: the file is empty")
    return from_timelines(name, n_a, n_b, timelines, times, source=str(path),
                          domain_names=ABXI_DOMAINS.get(name, ("A", "B")))


# ---------------------------------------------------------------------------------------
# (b) raw ratings CSVs
# ---------------------------------------------------------------------------------------
CSV_ORDERS = ("auto", "user-item", "item-user")
# Amazon ASINs are 10 characters (B0xxxxxxxx or an ISBN); reviewer ids are longer.
_ASIN = re.compile(r"^[0-9A-Z]{10}$")


def detect_csv_order(path: Path, sample: int = 2000) -> str:
    votes = [0, 0]
    for lineno, line in _text_lines(path, "expected a ratings CSV: user,item,rating,timestamp"):
        if lineno > sample:
            break
        cols = line.strip().split(",")
        if len(cols) < 4:
            continue
        votes[0] += bool(_ASIN.match(cols[0]))
        votes[1] += bool(_ASIN.match(cols[1]))
    if votes[0] == votes[1]:
        raise DataError(f"{path}: cannot tell which column holds item ids; pass --csv-order "
                        f"user-item (2014 releases) or item-user (2018 releases)")
    return "item-user" if votes[0] > votes[1] else "user-item"


def read_ratings_csv(path: str | os.PathLike, order: str = "auto",
                     user_vocab: Optional[Dict[str, int]] = None):
    """-> (user codes, item codes, timestamps, item vocab); errors name the file and line.

    Raw ids become integer codes while reading (a dict per vocabulary), so multi-million-row
    files never become arrays of Python strings. `user_vocab` is shared between the two
    domains' files so that the same reviewer gets the same code.
    """
    path = Path(path)
    if order not in CSV_ORDERS:
        raise ValueError(f"order must be one of {CSV_ORDERS}, got {order!r}")
    if not path.is_file():
        raise DataError(f"ratings file {path} does not exist")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty")
    if order == "auto":
        order = detect_csv_order(path)
    ui = (0, 1) if order == "user-item" else (1, 0)
    user_vocab = {} if user_vocab is None else user_vocab
    item_vocab: Dict[str, int] = {}
    users, items, ts = [], [], []
    for lineno, line in _text_lines(path, "expected a ratings CSV"):
        line = line.strip()
        if not line:
            continue
        cols = line.split(",")
        if len(cols) != 4:
            raise DataError(f"{path}:{lineno}: expected 4 comma-separated columns "
                            f"({order.replace('-', ',')},rating,timestamp), got {len(cols)}")
        try:
            t = float(cols[3])
            if not math.isfinite(t):
                raise ValueError
        except ValueError:
            raise DataError(f"{path}:{lineno}: timestamp {cols[3]!r} is not a number") from None
        for what, col in (("user", ui[0]), ("item", ui[1])):
            if not cols[col].strip():
                raise DataError(f"{path}:{lineno}: the {what} id (column {col + 1}) is empty")
        users.append(user_vocab.setdefault(cols[ui[0]], len(user_vocab)))
        items.append(item_vocab.setdefault(cols[ui[1]], len(item_vocab)))
        ts.append(int(t))
    if not users:
        raise DataError(f"{path}: no rating rows")
    return (np.array(users, np.int64), np.array(items, np.int64), np.array(ts, np.int64), item_vocab)


def preprocess_two_domains(a, b, *, item_min: int = 10, max_per_user: int = 50,
                           user_min_per_domain: int = 5, name: str = "csv",
                           source: str = "") -> CDSRDataset:
    """ABXI-style preprocessing of two (user codes, item codes, ts) triples.

    Order (as in the ABXI pipeline): drop items with < item_min ratings in their domain, keep
    users present in both domains, merge by time, keep each user's last max_per_user
    interactions, drop users with < user_min_per_domain interactions in either domain.
    Item codes are per domain; user codes are shared by the two domains.
    """
    notes: Dict[str, int] = {}
    frames = []
    for dom, (u, i, t) in enumerate((a, b)):
        u, i, t = (np.asarray(x, dtype=np.int64) for x in (u, i, t))
        cnt = np.bincount(i) if len(i) else np.zeros(0, np.int64)
        keep = cnt[i] >= item_min
        notes[f"domain {'AB'[dom]} ratings of items with < {item_min} ratings"] = int((~keep).sum())
        frames.append((u[keep], i[keep], t[keep]))
    common = np.intersect1d(frames[0][0], frames[1][0])
    if len(common) == 0:
        raise DataError(f"{name}: no user appears in both domains after the item filter")
    users = np.concatenate([frames[0][0], frames[1][0]])
    items_raw = np.concatenate([frames[0][1], frames[1][1]])
    dom = np.concatenate([np.zeros(len(frames[0][0]), np.int64), np.ones(len(frames[1][0]), np.int64)])
    ts = np.concatenate([frames[0][2], frames[1][2]])
    both = np.isin(users, common)
    notes["ratings of users not in both domains"] = int((~both).sum())
    users, items_raw, dom, ts = users[both], items_raw[both], dom[both], ts[both]

    # Sort by (user, time, domain, item) so ties keep a reproducible order.
    uid_vals, uid = np.unique(users, return_inverse=True)
    order = np.lexsort((items_raw, dom, ts, uid))
    uid, items_raw, dom, ts = uid[order], items_raw[order], dom[order], ts[order]
    counts = np.bincount(uid, minlength=len(uid_vals))
    ends = np.cumsum(counts)
    from_end = ends[uid] - np.arange(len(uid))  # 1 = most recent
    keep = from_end <= max_per_user
    notes[f"ratings beyond each user's last {max_per_user}"] = int((~keep).sum())
    uid, items_raw, dom, ts = uid[keep], items_raw[keep], dom[keep], ts[keep]
    per_dom = np.zeros((len(uid_vals), 2), np.int64)
    np.add.at(per_dom, (uid, dom), 1)
    ok_user = (per_dom >= user_min_per_domain).all(axis=1)
    notes[f"users with < {user_min_per_domain} interactions in a domain"] = int((~ok_user).sum())
    keep = ok_user[uid]
    uid, items_raw, dom, ts = uid[keep], items_raw[keep], dom[keep], ts[keep]
    if len(uid) == 0:
        raise DataError(f"{name}: no user is left after preprocessing ({notes})")

    # Re-index: A items 1..nA, B items nA+1..nA+nB (in code order), users in code order.
    a_ids = np.unique(items_raw[dom == 0])
    b_ids = np.unique(items_raw[dom == 1])
    item = np.where(dom == 0, np.searchsorted(a_ids, items_raw) + 1,
                    np.searchsorted(b_ids, items_raw) + 1 + len(a_ids))
    new_uid = np.unique(uid, return_inverse=True)[1]
    lengths = np.bincount(new_uid)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    ds_timelines = [item[offsets[k]:offsets[k + 1]] for k in range(len(lengths))]
    ds_times = [ts[offsets[k]:offsets[k + 1]] for k in range(len(lengths))]
    ds = from_timelines(name, len(a_ids), len(b_ids), ds_timelines, ds_times, source=source)
    ds.notes.update({k: v for k, v in notes.items() if v})
    for k, v in notes.items():
        if v:
            log.info("%s: filtered %s: %d", name, k, v)
    return ds


def _cache_key(paths, order, params) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = Path(p).stat()
        h.update(f"{Path(p).resolve()}|{st.st_size}|{st.st_mtime_ns}".encode())
    h.update(json.dumps([order, params], sort_keys=True).encode())
    return h.hexdigest()[:16]


def save_npz(ds: CDSRDataset, path: Path) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, offsets=ds.offsets, items=ds.items, times=ds.times,
             meta=np.array(json.dumps({"name": ds.name, "n_items_a": ds.n_items_a,
                                       "n_items_b": ds.n_items_b, "source": ds.source,
                                       "notes": ds.notes, "domain_names": list(ds.domain_names)})))
    os.replace(tmp, path)


def load_npz(path: Path) -> CDSRDataset:
    z = np.load(path)
    meta = json.loads(str(z["meta"]))
    return CDSRDataset(name=meta["name"], n_items_a=meta["n_items_a"], n_items_b=meta["n_items_b"],
                       offsets=z["offsets"], items=z["items"], times=z["times"], source=meta["source"],
                       notes=meta["notes"], domain_names=tuple(meta["domain_names"]))


def default_cache_dir() -> Path:
    return Path(os.environ.get("CDSR_CACHE_DIR", Path.home() / ".cache" / "cdsr"))


def load_ratings_pair(csv_a: str, csv_b: str, *, order: str = "auto", item_min: int = 10,
                      max_per_user: int = 50, user_min_per_domain: int = 5,
                      cache_dir: Optional[str] = None, name: str = "csv") -> CDSRDataset:
    """Preprocess two raw ratings CSVs (cached under cache_dir, default ~/.cache/cdsr)."""
    params = dict(item_min=item_min, max_per_user=max_per_user, user_min_per_domain=user_min_per_domain)
    for p in (csv_a, csv_b):
        if not Path(p).is_file():
            raise DataError(f"ratings file {p} does not exist" + (" (it is a folder)" if Path(p).is_dir() else ""))
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    cache_file = cache / f"{name}-{_cache_key((csv_a, csv_b), order, params)}.npz"
    if cache_file.is_file():
        try:
            ds = load_npz(cache_file)
            log.info("loaded preprocessed %s from cache %s", name, cache_file)
            return ds
        except Exception as e:  # noqa: BLE001 - a damaged cache entry is rebuilt, not fatal
            log.warning("cache %s is unreadable (%s: %s); preprocessing again", cache_file, type(e).__name__, e)
    user_vocab: Dict[str, int] = {}
    a = read_ratings_csv(csv_a, order, user_vocab)[:3]
    b = read_ratings_csv(csv_b, order, user_vocab)[:3]
    ds = preprocess_two_domains(a, b, name=name, source=f"{csv_a} + {csv_b}", **params)
    try:
        cache.mkdir(parents=True, exist_ok=True)
        save_npz(ds, cache_file)
        log.info("cached preprocessed %s at %s", name, cache_file)
    except OSError as e:  # a read-only cache must not stop the run
        log.warning("could not cache preprocessed %s at %s: %s", name, cache_file, e)
    return ds


def resolve_abxi_dir(name: str, data_dir: Optional[str] = None) -> Path:
    """--data-dir, else $CDSR_DATA_DIR/<name>, else ../shared/data/amazon/<name> from the repo root."""
    if data_dir:
        cand = [Path(data_dir)]
    elif os.environ.get("CDSR_DATA_DIR"):
        cand = [Path(os.environ["CDSR_DATA_DIR"]) / name]
    else:
        # The repo root (source checkout), then the working directory (an installed package
        # run from the repo root).
        root = Path(__file__).resolve().parent.parent
        cand = [root.parent / "shared" / "data" / "amazon" / name,
                Path.cwd().parent / "shared" / "data" / "amazon" / name]
    for c in cand:
        if c.is_dir():
            return c
    raise DataError(f"data directory for {name!r} not found (looked at {', '.join(map(str, cand))}); "
                    f"pass --data-dir or set CDSR_DATA_DIR")


def check_data_source(cfg) -> None:
    """Cheap up-front check that the data a config names can be found (a sweep checks this
    once instead of failing every run)."""
    name = cfg["data"]
    if name in ABXI_NAMES:
        resolve_abxi_dir(name, cfg.get("data_dir"))
    elif name == "csv":
        for key in ("csv_a", "csv_b"):
            if not cfg.get(key) or not Path(cfg[key]).is_file():
                raise DataError(f"ratings file {cfg.get(key)} ({key}) does not exist")


def load_dataset(cfg) -> CDSRDataset:
    """The dataset a run config names (`data` plus its options)."""
    from dataclasses import replace

    from cdsr.synthetic import PRESETS, SYNTHETIC_KEYS, generate

    name = cfg["data"]
    if name == "synthetic":
        preset = cfg.get("synthetic_preset", "small")
        if preset not in PRESETS:
            raise DataError(f"unknown synthetic_preset {preset!r}; valid choices: {', '.join(PRESETS)}")
        try:
            spec = replace(PRESETS[preset], **{f: cfg[k] for f, k in SYNTHETIC_KEYS.items() if cfg.get(k) is not None})
        except (TypeError, ValueError) as e:
            raise DataError(str(e)) from None
        return generate(spec, name=f"synthetic-{preset}")
    if name in ABXI_NAMES:
        return load_abxi(resolve_abxi_dir(name, cfg.get("data_dir")), name)
    if name == "csv":
        return load_ratings_pair(cfg["csv_a"], cfg["csv_b"], order=cfg.get("csv_order", "auto"),
                                 item_min=cfg.get("item_min", 10), max_per_user=cfg.get("max_per_user", 50),
                                 user_min_per_domain=cfg.get("user_min_per_domain", 5),
                                 cache_dir=cfg.get("cache_dir"))
    raise DataError(f"unknown data {name!r}; valid choices: synthetic, {', '.join(ABXI_NAMES)}, csv")
