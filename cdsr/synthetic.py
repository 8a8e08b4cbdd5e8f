"""Synthetic cross-domain data with a planted, tunable cross-domain signal.

Why it exists: the README's main command must run with no download, and tests need data whose
right answer is known. The generative story:

- Items of each domain are split into `n_clusters` clusters (item i of a domain belongs to
  cluster i mod K); inside a cluster, popularity is skewed (low ranks drawn more often).
- Each user carries a latent interest cluster c_t that persists with probability `stickiness`
  per step and otherwise jumps uniformly. B items are drawn from c_t (noise: `noise_b`).
- A's next item: with probability `signal`, from cluster perm(cluster of the user's most recent
  B item) (perm is a fixed permutation of clusters), otherwise from a uniform cluster. So the
  user's B behaviour carries information about the next A item; signal = 0 removes it.

Generation loops over time steps and vectorises over users, so afk-sized data (7k users x 25)
takes well under a second. Deterministic per `seed`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from cdsr.dataset import CDSRDataset


@dataclass(frozen=True)
class SyntheticSpec:
    n_users: int = 5000
    n_items_a: int = 1200
    n_items_b: int = 1600
    mean_len: float = 20.0
    min_len: int = 6
    max_len: int = 50
    p_b: float = 0.6  # B is the denser domain, as in the paper's pairs
    n_clusters: int = 24
    stickiness: float = 0.8
    signal: float = 0.7
    noise_b: float = 0.2
    popularity_skew: float = 2.0  # rank = floor(m * u**skew): 1 is uniform, larger favours the head
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_users", "n_items_a", "n_items_b", "n_clusters", "min_len", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"synthetic {name} must be >= 1, got {getattr(self, name)}")
        if self.min_len < 3:
            raise ValueError(f"synthetic min_len must be >= 3 (leave-one-out), got {self.min_len}")
        if not self.mean_len > 0:
            raise ValueError(f"synthetic mean_len must be > 0, got {self.mean_len}")
        if self.max_len < self.min_len:
            raise ValueError(f"synthetic max_len ({self.max_len}) < min_len ({self.min_len})")
        if self.n_clusters > min(self.n_items_a, self.n_items_b):
            raise ValueError(f"synthetic n_clusters ({self.n_clusters}) exceeds a domain's item count")
        for name in ("p_b", "stickiness", "signal", "noise_b"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"synthetic {name} must be in [0, 1], got {v}")


PRESETS = {
    "tiny": SyntheticSpec(n_users=64, n_items_a=40, n_items_b=60, mean_len=12, min_len=6,
                          max_len=20, n_clusters=4),
    "small": SyntheticSpec(),
    "afk": SyntheticSpec(n_users=7144, n_items_a=11837, n_items_b=16258, mean_len=24.3,
                         n_clusters=64),
}

# Run-config defaults a preset changes (keys the user sets win). `tiny`'s domains have 40 and
# 60 items and its users at most 20 interactions, so every user has at least 20 unseen items
# in each domain: 20 evaluation negatives always fit, the paper's 999 never do.
PRESET_DEFAULTS = {
    "tiny": {"eval_negatives": 20},
}

# SyntheticSpec field -> run-config key (`--set syn_users=...` overrides the preset's value).
SYNTHETIC_KEYS = {"n_users": "syn_users", "n_items_a": "syn_items_a", "n_items_b": "syn_items_b",
                  "mean_len": "syn_mean_len", "signal": "syn_signal", "seed": "data_seed"}


def _draw_items(rng, cluster, n_items, k, skew, offset):
    """Item in `cluster` (vectorised): members are cluster, cluster + K, ...; head favoured."""
    members = (n_items - 1 - cluster) // k + 1  # items c, c+K, ... below n_items
    rank = np.floor(members * rng.random(cluster.shape) ** skew).astype(np.int64)
    rank = np.minimum(rank, members - 1)
    return offset + 1 + cluster + rank * k


def generate(spec: SyntheticSpec = SyntheticSpec(), name: str = "synthetic") -> CDSRDataset:
    rng = np.random.default_rng(spec.seed)
    u, k = spec.n_users, spec.n_clusters
    lengths = np.clip(rng.poisson(spec.mean_len, u), spec.min_len, spec.max_len)
    tmax = int(lengths.max())
    perm = rng.permutation(k)
    interest = rng.integers(0, k, u)
    last_b_cluster = np.full(u, -1)
    items = np.zeros((u, tmax), np.int64)
    for t in range(tmax):
        interest = np.where(rng.random(u) < spec.stickiness, interest, rng.integers(0, k, u))
        is_b = rng.random(u) < spec.p_b
        b_cluster = np.where(rng.random(u) < spec.noise_b, rng.integers(0, k, u), interest)
        b_item = _draw_items(rng, b_cluster, spec.n_items_b, k, spec.popularity_skew, spec.n_items_a)
        informed = (rng.random(u) < spec.signal) & (last_b_cluster >= 0)
        a_cluster = np.where(informed, perm[np.maximum(last_b_cluster, 0)], rng.integers(0, k, u))
        a_item = _draw_items(rng, a_cluster, spec.n_items_a, k, spec.popularity_skew, 0)
        items[:, t] = np.where(is_b, b_item, a_item)
        active = t < lengths
        last_b_cluster = np.where(active & is_b, b_cluster, last_b_cluster)
    mask = np.arange(tmax)[None, :] < lengths[:, None]
    flat = items[mask]
    times = (np.nonzero(mask)[1] * 86400).astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    params = ", ".join(f"{k_}={v}" for k_, v in asdict(spec).items())
    return CDSRDataset(name=name, n_items_a=spec.n_items_a, n_items_b=spec.n_items_b,
                       offsets=offsets, items=flat, times=times, source=f"synthetic({params})")
