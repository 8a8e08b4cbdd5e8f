"""The in-memory cross-domain dataset every loader produces.

Conventions (shared with `models`): users 1..U, domain-A items 1..nA, domain-B items
nA+1..nA+nB, 0 = padding. Each user's merged timeline (both domains, time order) is stored
as one CSR block (`offsets`, `items`, `times`) so that batch building can gather with numpy
instead of walking Python lists.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np

log = logging.getLogger("cdsr.data")

# Leave-one-out needs one (input, target) training pair, a validation and a test target.
MIN_TIMELINE = 3


class DataError(ValueError):
    """Malformed or unusable input data; the message names the file (and line) at fault."""


@dataclass
class CDSRDataset:
    name: str
    n_items_a: int
    n_items_b: int
    offsets: np.ndarray  # (U + 1,) int64: user u's timeline is items[offsets[u-1]:offsets[u]]
    items: np.ndarray  # (total,) int64 merged timelines
    times: np.ndarray  # (total,) int64 timestamps (0 when the source has none)
    domain_names: tuple = ("A", "B")
    source: str = ""
    notes: Dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.offsets = np.asarray(self.offsets, dtype=np.int64)
        self.items = np.asarray(self.items, dtype=np.int64)
        self.times = np.asarray(self.times, dtype=np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != len(self.items):
            raise DataError(f"{self.name}: offsets do not cover the item array")
        if len(self.items) and (self.items.min() < 1 or self.items.max() > self.n_items):
            raise DataError(f"{self.name}: item ids must lie in 1..{self.n_items}")
        self._padded: Optional[np.ndarray] = None

    # ---- basic facts -------------------------------------------------------------------
    @property
    def n_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_items(self) -> int:
        return self.n_items_a + self.n_items_b

    @property
    def n_interactions(self) -> int:
        return len(self.items)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def timeline(self, user: int) -> np.ndarray:
        """Merged item timeline of `user` (1-based id)."""
        if not 1 <= user <= self.n_users:
            raise IndexError(f"user must be in 1..{self.n_users}, got {user}")
        return self.items[self.offsets[user - 1]:self.offsets[user]]

    def domain_of(self, items: np.ndarray) -> np.ndarray:
        """0 for A, 1 for B, -1 for padding."""
        items = np.asarray(items)
        return np.where(items == 0, -1, (items > self.n_items_a).astype(np.int64))

    def padded(self) -> np.ndarray:
        """(U + 1, Tmax) right-padded timelines, row 0 unused: the gather source for batches."""
        if self._padded is None:
            lengths = self.lengths
            tmax = int(lengths.max()) if len(lengths) else 0
            out = np.zeros((self.n_users + 1, tmax), dtype=np.int64)
            rows = np.repeat(np.arange(1, self.n_users + 1), lengths)
            cols = np.arange(len(self.items)) - np.repeat(self.offsets[:-1], lengths)
            out[rows, cols] = self.items
            self._padded = out
        return self._padded

    def stats(self) -> Dict[str, float]:
        dom = self.items > self.n_items_a
        lengths = self.lengths
        return {
            "users": self.n_users,
            "items_a": self.n_items_a,
            "items_b": self.n_items_b,
            "interactions": self.n_interactions,
            "interactions_a": int((~dom).sum()),
            "interactions_b": int(dom.sum()),
            "mean_len": float(lengths.mean()) if len(lengths) else 0.0,
            "min_len": int(lengths.min()) if len(lengths) else 0,
            "max_len": int(lengths.max()) if len(lengths) else 0,
            "density_a": float((~dom).sum()) / max(1, self.n_users * self.n_items_a),
            "density_b": float(dom.sum()) / max(1, self.n_users * self.n_items_b),
        }

    def format_stats(self) -> str:
        s = self.stats()
        a, b = self.domain_names
        lines = [
            f"dataset      {self.name}" + (f"  ({self.source})" if self.source else ""),
            f"users        {s['users']:,}",
            f"items        {s['items_a']:,} / {s['items_b']:,}  (A={a} / B={b})",
            f"interactions {s['interactions']:,}  (A {s['interactions_a']:,}, B {s['interactions_b']:,})",
            f"per user     mean {s['mean_len']:.1f}, min {s['min_len']}, max {s['max_len']}",
            f"density      A {s['density_a']:.5f}, B {s['density_b']:.5f}",
        ]
        for k, v in self.notes.items():
            lines.append(f"filtered     {k}: {v:,}")
        return "\n".join(lines)


def from_timelines(name: str, n_items_a: int, n_items_b: int, timelines: Sequence[Sequence[int]],
                   times: Optional[Sequence[Sequence[int]]] = None, source: str = "",
                   domain_names: tuple = ("A", "B"), min_len: int = MIN_TIMELINE) -> CDSRDataset:
    """Build a dataset from per-user lists, dropping (and counting) too-short timelines."""
    keep: List[int] = [i for i, t in enumerate(timelines) if len(t) >= min_len]
    dropped = len(timelines) - len(keep)
    notes = {}
    if dropped:
        log.warning("%s: dropped %d users with fewer than %d interactions", name, dropped, min_len)
        notes[f"users with < {min_len} interactions"] = dropped
    if not keep:
        raise DataError(f"{name}: no user has at least {min_len} interactions ({source or 'no source'})")
    lengths = np.array([len(timelines[i]) for i in keep], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    items = np.concatenate([np.asarray(timelines[i], dtype=np.int64) for i in keep])
    if times is None:
        tarr = np.zeros_like(items)
    else:
        tarr = np.concatenate([np.asarray(times[i], dtype=np.int64) for i in keep])
    return CDSRDataset(name=name, n_items_a=n_items_a, n_items_b=n_items_b, offsets=offsets,
                       items=items, times=tarr, source=source, domain_names=domain_names, notes=notes)
