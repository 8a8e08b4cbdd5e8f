"""Leave-one-out splits, vectorised batch building, seeded negative sampling.

Every batch key follows the pipeline <-> models contract (see the team brief): sequences are
left-padded with 0, most recent on the right, width L = max_len. All construction is numpy
over the whole batch (no per-item Python loops): windows are gathered from the dataset's
padded timeline matrix, compaction uses cumulative sums, and "next item of the same domain"
and "latest item of a domain" are reverse-cummin / forward-cummax scans.

Split (on each user's merged timeline of length n): train on items [0, n-2), validate on item
n-2 with history [0, n-2), test on item n-1 with history [0, n-1).

Training negatives (`neg_sampling`): `per_user` draws, for every position, the model's
`n_negatives` items of each domain uniformly with replacement (models pool them per user);
`per_position` is the ABXI authors' draw: at every position, K items of each domain without
replacement, excluding the user's training items of that domain, fresh for every position
and epoch (`draw_distinct`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from cdsr.dataset import CDSRDataset, DataError

SPLITS = ("valid", "test")
NEG_SAMPLING = ("per_user", "per_position")
_SPLIT_IDS = {"valid": 1, "test": 2}


def _window(padded: np.ndarray, users: np.ndarray, end: np.ndarray, width: int) -> np.ndarray:
    """(B, width) left-padded window of each user's timeline ending just before `end`."""
    cols = end[:, None] - width + np.arange(width)[None, :]
    valid = cols >= 0
    out = padded[users[:, None], np.maximum(cols, 0)]
    return np.where(valid, out, 0)


def _domain(items: np.ndarray, n_items_a: int) -> np.ndarray:
    return np.where(items == 0, -1, (items > n_items_a).astype(np.int64))


def history_features(seq: np.ndarray, n_items_a: int, following: Optional[np.ndarray] = None
                     ) -> Dict[str, np.ndarray]:
    """Merged-sequence derived keys. `following` (B,) is the item after the window's last
    column (training); when given, `target*` keys are built as well."""
    b, length = seq.shape
    out: Dict[str, np.ndarray] = {"seq": seq, "seq_domain": _domain(seq, n_items_a)}
    rows_all = np.arange(b)[:, None]
    if following is not None:
        # The window extended by one column holds every target: targets of column t is t + 1.
        ext = np.concatenate([seq, following[:, None]], axis=1)
        target = np.where(seq == 0, 0, ext[:, 1:])
        out["target"] = target
        out["target_domain"] = _domain(target, n_items_a)
        ext_dom = _domain(ext, n_items_a)
    for d, key in ((0, "a"), (1, "b")):
        is_d = out["seq_domain"] == d
        count = is_d.sum(axis=1)
        # Compacted position of each domain-d item (left-padded: the latest sits at L-1).
        pos = np.cumsum(is_d, axis=1) - 1 + (length - count)[:, None]
        rows, cols = np.nonzero(is_d)
        comp = np.zeros_like(seq)
        comp[rows, pos[rows, cols]] = seq[rows, cols]
        time_d = np.full_like(seq, -1)
        time_d[rows, pos[rows, cols]] = cols
        out[f"seq_{key}"] = comp
        out[f"time_{key}"] = time_d
        out[f"last_{key}"] = np.maximum.accumulate(np.where(is_d, pos, -1), axis=1)
        if following is not None:
            # Next column (strictly after t) holding a domain-d item, via a reverse cummin.
            width = length + 1
            idx = np.where(ext_dom == d, np.arange(width)[None, :], width)
            nxt = np.minimum.accumulate(idx[:, ::-1], axis=1)[:, ::-1][:, 1:]
            nxt_item = np.where(nxt < width, ext[rows_all, np.minimum(nxt, width - 1)], 0)
            tgt = np.zeros_like(seq)
            tgt[rows, pos[rows, cols]] = nxt_item[rows, cols]
            out[f"target_{key}"] = tgt
    return out


def to_torch(batch: Dict[str, np.ndarray]) -> Dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in batch.items()}


def draw_distinct(rng: np.random.Generator, n_free: np.ndarray, k: int) -> np.ndarray:
    """(R, k) values, row r a uniform random k-subset of [0, n_free[r]) in random order.

    Vectorised rejection: draw all k with replacement, keep each value's first occurrence in
    its row, redraw the later duplicates, repeat. Given how many distinct values a round
    leaves, they are a uniform subset of what was still free (symmetry over the labels), so
    the union is a uniform k-subset. A round leaves about k^2 / (2 n_free) duplicates per
    row, so it ends in a few rounds unless k is close to n_free (k <= n_free is required)."""
    n_free = np.asarray(n_free, dtype=np.int64)
    if k > 0 and len(n_free) and int(n_free.min()) < k:
        raise ValueError(f"cannot draw {k} distinct values from {int(n_free.min())}")
    vals = rng.integers(0, n_free[:, None], size=(len(n_free), k))
    active = np.arange(len(n_free))  # rows that may still hold duplicates
    while k > 1 and len(active):
        # value * k + column sorts by value, then column: a plain sort (no argsort) finds each
        # value's later occurrences and where they sit.
        ranked = np.sort(vals[active] * k + np.arange(k), axis=1)
        later = ranked[:, 1:] // k == ranked[:, :-1] // k
        rows, cols = np.nonzero(later)
        if not len(rows):
            break
        vals[active[rows], ranked[rows, cols + 1] % k] = rng.integers(0, n_free[active[rows]])
        active = np.unique(active[rows])
    return vals


@dataclass
class SeenItems:
    """Each user's distinct training items of one domain, as within-domain indices 0..n-1,
    sorted, flat with offsets; `skip` maps a draw over a user's unseen items to an item id."""

    lo: int  # item id of within-domain index 0, minus 1
    size: int  # items in the domain
    flat: np.ndarray  # sorted seen indices of user 1, then user 2, ...
    start: np.ndarray  # (n_users + 1,) offsets into flat

    def __post_init__(self) -> None:
        counts = np.diff(self.start)
        owner = np.repeat(np.arange(len(counts)), counts)
        shifted = self.flat - (np.arange(len(self.flat)) - np.repeat(self.start[:-1], counts))
        # Non-decreasing: users in order, s_j - j within a user (s strictly increasing).
        self.keys = owner * (self.size + 1) + shifted

    def n_free(self, users: np.ndarray) -> np.ndarray:
        return self.size - (self.start[users] - self.start[users - 1])

    def item_ids(self, users: np.ndarray, draws: np.ndarray) -> np.ndarray:
        """draws (R, k) over [0, n_free of users[r]) -> item ids: the v-th unseen item is v
        plus the number of seen indices s_j with s_j - j <= v (s sorted), per user."""
        # The searched keys are only those of `users` (distinct, in first-seen order, renumbered
        # 0..): a few thousand that stay in cache instead of every user's.
        span = self.size + 1
        ids, local = np.unique(users, return_inverse=True)
        counts = self.start[ids] - self.start[ids - 1]
        first = np.repeat(self.start[ids - 1] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        pick = first + np.arange(int(counts.sum()))
        keys = np.repeat(np.arange(len(ids)), counts) * span + (self.keys[pick] - (ids - 1).repeat(counts) * span)
        head = np.concatenate([[0], np.cumsum(counts)[:-1]])
        u = local.reshape(-1)[:, None]
        below = np.searchsorted(keys, u * span + draws, side="right") - head[u]
        return draws + below + self.lo + 1


def seen_items(dataset: CDSRDataset, train_end: np.ndarray, domain: int) -> SeenItems:
    """The distinct items of `domain` among each user's first train_end[u-1] items."""
    lengths = dataset.lengths
    owner = np.repeat(np.arange(dataset.n_users), lengths)
    index = np.arange(len(dataset.items)) - np.repeat(dataset.offsets[:-1], lengths)
    items = dataset.items
    lo, size = (dataset.n_items_a, dataset.n_items_b) if domain else (0, dataset.n_items_a)
    keep = (index < train_end[owner]) & ((items > dataset.n_items_a) == bool(domain))
    owner, local = owner[keep], items[keep] - lo - 1
    key = np.unique(owner * (size + 1) + local)  # sorted by user, then item; duplicates gone
    owner, local = key // (size + 1), key % (size + 1)
    start = np.zeros(dataset.n_users + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=dataset.n_users), out=start[1:])
    return SeenItems(lo, size, local, start)


@dataclass
class TrainSampler:
    """One training sample per user per epoch: its whole training prefix (last L+1 items).

    The order and the negatives of epoch e depend only on (seed, e, rank), so a run restarted
    at the beginning of an epoch replays it exactly (the basis of bit-exact --resume).

    `neg_sampling="per_position"` gives `neg_a` / `neg_b` of shape (B, L, K) with K =
    `per_position_k` (default: the model's own per-position counts), every position's K items
    distinct and none among the user's training items of that domain; padding positions get a
    draw too (models mask them), so that every row of the tensor is a valid negative set.
    """

    dataset: CDSRDataset
    max_len: int
    batch_size: int
    n_negatives: Dict[str, int]
    seed: int
    rank: int = 0
    world_size: int = 1
    neg_sampling: str = "per_user"
    per_position_k: int = 0

    def __post_init__(self) -> None:
        lengths = self.dataset.lengths
        self.train_end = lengths - 2  # items [0, n-2) are training items
        # A user needs two training items for one (input, target) pair.
        self.users = np.nonzero(self.train_end >= 2)[0] + 1
        if len(self.users) == 0:
            raise DataError(f"{self.dataset.name}: no user has enough interactions to train on")
        self.local_batch = max(1, -(-self.batch_size // self.world_size))
        if self.neg_sampling not in NEG_SAMPLING:
            raise ValueError(f"neg_sampling must be one of {', '.join(NEG_SAMPLING)}, got {self.neg_sampling!r}")
        self.seen: Dict[str, SeenItems] = {}
        self.k = {d: int(self.n_negatives.get(d, 0)) for d in "AB"}
        if self.neg_sampling == "per_position":
            for i, d in enumerate("AB"):
                want = self.k[d]
                if self.per_position_k:
                    if self.per_position_k < want:
                        raise ValueError(f"train_negatives={self.per_position_k} is fewer than the model's "
                                         f"{want} negatives per position of domain {d}")
                    want = self.per_position_k
                self.k[d] = want
                self.seen[d] = seen_items(self.dataset, self.train_end, i)
                free = self.seen[d].n_free(self.users)
                if want and int(free.min()) < want:
                    user = int(self.users[int(np.argmin(free))])
                    raise DataError(f"{self.dataset.name}: user {user} has only {int(free.min())} unseen "
                                    f"training items in domain {d}, fewer than train_negatives={want}")

    def n_batches(self) -> int:
        per_rank = -(-len(self.users) // self.world_size)
        return -(-per_rank // self.local_batch)

    def epoch(self, epoch: int) -> Iterator[Dict[str, torch.Tensor]]:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.users)
        # Every rank gets the same number of samples (wrap around) so DDP steps stay in lockstep.
        per_rank = -(-len(order) // self.world_size)
        order = np.resize(order, per_rank * self.world_size)
        shard = order[self.rank::self.world_size]
        neg_rng = np.random.default_rng([self.seed, epoch, 7919, self.rank])
        for start in range(0, len(shard), self.local_batch):
            users = shard[start:start + self.local_batch]
            yield to_torch(self.build(users, neg_rng))

    def build(self, users: np.ndarray, neg_rng: np.random.Generator) -> Dict[str, np.ndarray]:
        ds, length = self.dataset, self.max_len
        end = self.train_end[users - 1]
        win = _window(ds.padded(), users, end, length + 1)
        batch = history_features(win[:, :-1], ds.n_items_a, following=win[:, -1])
        batch["user"] = users.astype(np.int64)
        b = len(users)
        ka, kb = self.k["A"], self.k["B"]
        if self.neg_sampling == "per_position":
            rows = np.repeat(users, length)  # one row per (user, position)
            for d, k in (("A", ka), ("B", kb)):
                seen = self.seen[d]
                draws = draw_distinct(neg_rng, seen.n_free(rows), k)
                batch[f"neg_{d.lower()}"] = seen.item_ids(rows, draws).reshape(b, length, k)
            return batch
        batch["neg_a"] = neg_rng.integers(1, ds.n_items_a + 1, size=(b, length, ka))
        batch["neg_b"] = neg_rng.integers(ds.n_items_a + 1, ds.n_items + 1, size=(b, length, kb))
        return batch


@dataclass
class EvalSet:
    """Fixed candidates of one split: the positive plus `n_negatives` items of the target's
    domain that the user never interacted with, drawn once from default_rng([seed, split])."""

    split: str
    users: np.ndarray  # (N,) user ids
    end: np.ndarray  # (N,) index of the evaluated item in the user's timeline
    eval_domain: np.ndarray  # (N,) 0/1
    candidates: np.ndarray  # (N, 1 + K), column 0 = positive

    def __len__(self) -> int:
        return len(self.users)

    def shard(self, rank: int, world_size: int) -> "EvalSet":
        sl = slice(rank, None, world_size)
        return EvalSet(self.split, self.users[sl], self.end[sl], self.eval_domain[sl], self.candidates[sl])

    def batches(self, dataset: CDSRDataset, max_len: int, batch_size: int
                ) -> Iterator[Dict[str, torch.Tensor]]:
        for start in range(0, len(self.users), batch_size):
            sl = slice(start, start + batch_size)
            users = self.users[sl]
            seq = _window(dataset.padded(), users, self.end[sl], max_len)
            batch = history_features(seq, dataset.n_items_a)
            batch["user"] = users.astype(np.int64)
            batch["eval_domain"] = self.eval_domain[sl]
            batch["candidates"] = self.candidates[sl]
            yield to_torch(batch)


def build_eval_set(dataset: CDSRDataset, split: str, n_negatives: int = 999, seed: int = 0) -> EvalSet:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    lengths = dataset.lengths
    users = np.arange(1, dataset.n_users + 1)
    end = lengths - (2 if split == "valid" else 1)
    pos = dataset.items[dataset.offsets[:-1] + end]
    dom = (pos > dataset.n_items_a).astype(np.int64)
    rng = np.random.default_rng([seed, _SPLIT_IDS[split]])
    cands = np.empty((len(users), 1 + n_negatives), np.int64)
    cands[:, 0] = pos
    sizes = (dataset.n_items_a, dataset.n_items_b)
    for r in range(len(users)):
        d = int(dom[r])
        lo = dataset.n_items_a if d else 0  # domain offset: items are lo+1..lo+size
        tl = dataset.items[dataset.offsets[r]:dataset.offsets[r + 1]]
        seen = np.unique(tl[(tl > dataset.n_items_a) == bool(d)]) - lo - 1  # 0-based within domain
        n_free = sizes[d] - len(seen)
        if n_free < n_negatives:
            raise DataError(f"{dataset.name}: user {users[r]} has only {n_free} unseen items in domain "
                            f"{'AB'[d]}, fewer than eval_negatives={n_negatives}; lower eval_negatives")
        draw = rng.choice(n_free, size=n_negatives, replace=False)
        # Map the v-th unseen item to its id: skip the seen ids at or below it.
        shifted = seen - np.arange(len(seen))
        cands[r, 1:] = draw + np.searchsorted(shifted, draw, side="right") + lo + 1
    return EvalSet(split, users, end, dom, cands)
