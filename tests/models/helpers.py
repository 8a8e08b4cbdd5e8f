"""Tiny batches in the pipeline's layout for the backbone tests (built with the pipeline's own
`history_features`, so the tests exercise the real batch contract)."""

from __future__ import annotations

from typing import Dict

import numpy as np
import torch

from cdsr.batching import history_features, to_torch

N_A, N_B = 7, 9


def random_timelines(n_users: int, width: int, rng: np.random.Generator, min_len: int = 3) -> np.ndarray:
    """(n_users, width) left-padded merged timelines, mixed domains, random lengths."""
    out = np.zeros((n_users, width), np.int64)
    for u in range(n_users):
        n = int(rng.integers(min_len, width + 1))
        dom = rng.random(n) < 0.5
        items = np.where(dom, rng.integers(1, N_A + 1, n), rng.integers(N_A + 1, N_A + N_B + 1, n))
        out[u, width - n:] = items
    return out


def train_batch(timelines: np.ndarray, n_neg: Dict[str, int], rng: np.random.Generator) -> Dict[str, torch.Tensor]:
    """Training batch: inputs = all but the last column, targets shifted by one."""
    b, width = timelines.shape
    length = width - 1
    batch = history_features(timelines[:, :-1], N_A, following=timelines[:, -1])
    batch["user"] = np.arange(1, b + 1)
    batch["neg_a"] = rng.integers(1, N_A + 1, size=(b, length, n_neg["A"]))
    batch["neg_b"] = rng.integers(N_A + 1, N_A + N_B + 1, size=(b, length, n_neg["B"]))
    return to_torch(batch)


def eval_batch(history: np.ndarray, eval_domain: np.ndarray, n_cand: int, rng: np.random.Generator
               ) -> Dict[str, torch.Tensor]:
    b = history.shape[0]
    batch = history_features(history, N_A)
    batch["user"] = np.arange(1, b + 1)
    batch["eval_domain"] = eval_domain.astype(np.int64)
    lo = np.where(eval_domain == 1, N_A + 1, 1)
    hi = np.where(eval_domain == 1, N_A + N_B + 1, N_A + 1)
    batch["candidates"] = rng.integers(lo[:, None], hi[:, None], size=(b, n_cand))
    return to_torch(batch)


def same_domain_resample(items: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Every non-padding item replaced by a random item of the same domain."""
    a = (items > 0) & (items <= N_A)
    bmask = items > N_A
    out = items.copy()
    out[a] = rng.integers(1, N_A + 1, int(a.sum()))
    out[bmask] = rng.integers(N_A + 1, N_A + N_B + 1, int(bmask.sum()))
    return out
