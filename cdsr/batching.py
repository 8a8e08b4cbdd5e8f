"""Leave-one-out splits, vectorised batch building, seeded negative sampling.

Every batch key follows the pipeline <-> models contract (see the team brief): sequences are
left-padded with 0, most recent on the right, width L = max_len. All construction is numpy
over the whole batch (no per-item Python loops): windows are gathered from the dataset's
padded timeline matrix, compaction uses cumulative sums, and "next item of the same domain"
and "latest item of a domain" are reverse-cummin / forward-cummax scans.

Split (on each user's merged timeline of length n): train on items [0, n-2), validate on item
n-2 with history [0, n-2), test on item n-1 with history [0, n-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterator, Optional

import numpy as np
import torch

from cdsr.dataset import CDSRDataset, DataError

SPLITS = ("valid", "test")
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


@dataclass
class TrainSampler:
    """One training sample per user per epoch: its whole training prefix (last L+1 items).

    The order and the negatives of epoch e depend only on (seed, e, rank), so a run restarted
    at the beginning of an epoch replays it exactly (the basis of bit-exact --resume).
    """

    dataset: CDSRDataset
    max_len: int
    batch_size: int
    n_negatives: Dict[str, int]
    seed: int
    rank: int = 0
    world_size: int = 1

    def __post_init__(self) -> None:
        lengths = self.dataset.lengths
        self.train_end = lengths - 2  # items [0, n-2) are training items
        # A user needs two training items for one (input, target) pair.
        self.users = np.nonzero(self.train_end >= 2)[0] + 1
        if len(self.users) == 0:
            raise DataError(f"{self.dataset.name}: no user has enough interactions to train on")
        self.local_batch = max(1, -(-self.batch_size // self.world_size))

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
        ka, kb = int(self.n_negatives.get("A", 0)), int(self.n_negatives.get("B", 0))
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
