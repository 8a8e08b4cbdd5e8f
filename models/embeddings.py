"""LLM4CDSR's frozen item embeddings: a user's own `.npy` matrices, or a substitute built from
the training interactions alone.

The original LLM4CDSR embeds item titles and descriptions with a paid text-embedding API
(cannot be fetched here), reduces them by PCA to 1024 dims ("global" table, all items) and to
128 dims per domain. This module reproduces the *shapes and roles* of those tables:

- `load_item_matrix`: a user-supplied `.npy` whose rows are item ids (with or without the
  padding row 0). Global table: rows = ids 1..nA+nB; domain A: ids 1..nA; domain B: ids
  nA+1..nA+nB, in order.
- `cooccurrence_embeddings` (SUBSTITUTE, no text involved): the item co-occurrence matrix of
  the users' training prefixes (each user's timeline minus its last two items, which are the
  validation and test targets), log-damped, factorised by a truncated randomised SVD into the
  global table (item = U sqrt(S)); each domain's table is the PCA of its items' global rows.
  Items never seen in training get zero rows. Deterministic per seed; cached on disk under a
  hash of the interactions and sizes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

log = logging.getLogger("models.embeddings")

CACHE_VERSION = "cooc-svd-v1"


def default_cache_dir() -> Path:
    return Path(os.environ.get("CDSR_CACHE_DIR", Path.home() / ".cache" / "cdsr")) / "item_embeddings"


def load_item_matrix(path: str, n_items: int, name: str, dim: Optional[int] = None) -> np.ndarray:
    """(n_items + 1, D) float32 with a zero padding row 0, from a `.npy` of n_items rows (ids in
    order) or n_items + 1 rows (row 0 = padding, ignored)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{name}: no such file {p}" + (" (it is a folder)" if p.is_dir() else ""))
    with open(p, "rb") as f:
        magic = f.read(6)
    if magic != b"\x93NUMPY":
        raise ValueError(f"{name}: {p} is not a .npy file (write it with numpy.save)")
    try:
        m = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        reason = " ".join(str(e).split())[:100]
        raise ValueError(f"{name}: {p} is not a numeric .npy matrix (numpy.load: {reason})") from None
    if m.dtype.kind not in "biuf":
        raise ValueError(f"{name}: {p} must hold a numeric matrix, got dtype {m.dtype}")
    if m.ndim != 2:
        raise ValueError(f"{name}: {p} must hold a 2-D matrix (items x dims), got shape {m.shape}")
    if m.shape[0] == n_items:
        m = np.concatenate([np.zeros((1, m.shape[1]), m.dtype), m])
    elif m.shape[0] != n_items + 1:
        raise ValueError(f"{name}: {p} has {m.shape[0]} rows, expected {n_items} (one per item id) "
                         f"or {n_items + 1} (with the padding row 0)")
    if dim is not None and m.shape[1] != dim:
        raise ValueError(f"{name}: {p} has {m.shape[1]} columns, the model expects {dim}")
    if not np.isfinite(m).all():
        raise ValueError(f"{name}: {p} holds NaN or inf")
    out = m.astype(np.float32)
    out[0] = 0.0
    return out


def training_prefixes(offsets: np.ndarray, items: np.ndarray, holdout: int = 2) -> Tuple[np.ndarray, np.ndarray]:
    """(user index, item id) of every training interaction: each timeline minus its last
    `holdout` items (leave-one-out's validation and test targets)."""
    offsets = np.asarray(offsets, np.int64)
    lengths = np.diff(offsets)
    keep = np.maximum(lengths - holdout, 0)
    users = np.repeat(np.arange(len(lengths)), keep)
    starts = np.repeat(offsets[:-1], keep)
    within = np.arange(keep.sum()) - np.repeat(np.cumsum(keep) - keep, keep)
    return users, np.asarray(items, np.int64)[starts + within]


def _pca(x: np.ndarray, dim: int, seed: int) -> np.ndarray:
    """Rows of x projected on their top `dim` principal directions (zero rows stay zero)."""
    used = np.abs(x).sum(1) > 0
    out = np.zeros((x.shape[0], dim), np.float32)
    if used.sum() < 2:
        return out
    xs = torch.from_numpy(x[used].astype(np.float32))
    xs = xs - xs.mean(0, keepdim=True)
    k = min(dim, xs.shape[0], xs.shape[1])
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(xs, q=min(k + 8, min(xs.shape)), niter=4)
    proj = (u[:, :k] * s[:k]).numpy()
    proj /= max(float(proj.std()), 1e-12)
    out[used, :k] = proj
    return out


def cooccurrence_embeddings(offsets: np.ndarray, items: np.ndarray, n_items_a: int, n_items_b: int,
                            global_dim: int = 1024, domain_dim: int = 128, seed: int = 0,
                            cache_dir: Optional[str] = None) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Substitute frozen tables from training interactions: (global (n+1, global_dim),
    domain A (nA+1, domain_dim), domain B (nB+1, domain_dim)), row 0 = padding (zero)."""
    users, its = training_prefixes(offsets, items)
    n = n_items_a + n_items_b
    h = hashlib.sha1()
    for part in (CACHE_VERSION, n_items_a, n_items_b, global_dim, domain_dim, seed):
        h.update(str(part).encode())
    h.update(np.ascontiguousarray(users).tobytes())
    h.update(np.ascontiguousarray(its).tobytes())
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    path = cache / f"{h.hexdigest()[:20]}.npz"
    if path.is_file():
        with np.load(path) as z:
            return z["glob"], z["a"], z["b"]

    # User x item incidence (binary), then item x item co-occurrence with a log damping so
    # popular items do not own every direction.
    n_users = int(users.max()) + 1 if len(users) else 1
    idx = torch.stack([torch.from_numpy(users), torch.from_numpy(its - 1)])
    # (Repeated interactions count once: the incidence is binary.)
    x = torch.sparse_coo_tensor(idx, torch.ones(len(users), dtype=torch.float32), (n_users, n),
                                check_invariants=True).coalesce()
    x = torch.sparse_coo_tensor(x.indices(), torch.ones_like(x.values()), x.shape, check_invariants=True).coalesce()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's "sparse CSR is beta" notice
        c = torch.sparse.mm(x.t(), x).coalesce()
    ci, cv = c.indices(), c.values()
    off = ci[0] != ci[1]
    c = torch.sparse_coo_tensor(ci[:, off], torch.log1p(cv[off]), (n, n), check_invariants=True).coalesce()
    k = min(global_dim, n - 1)
    torch.manual_seed(seed)
    u, s, _ = torch.svd_lowrank(c, q=min(k + 8, n), niter=2)
    vec = (u[:, :k] * s[:k].clamp(min=0).sqrt()).numpy()
    vec /= max(float(vec.std()), 1e-12)
    glob = np.zeros((n + 1, global_dim), np.float32)
    glob[1:, :k] = vec
    emb_a = np.concatenate([np.zeros((1, domain_dim), np.float32), _pca(glob[1:n_items_a + 1], domain_dim, seed)])
    emb_b = np.concatenate([np.zeros((1, domain_dim), np.float32), _pca(glob[n_items_a + 1:], domain_dim, seed)])
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + ".tmp.npz")
        np.savez(tmp, glob=glob, a=emb_a, b=emb_b)
        os.replace(tmp, path)
    except OSError as e:  # a read-only cache must not stop training
        log.warning("could not cache item embeddings at %s: %s", path, e)
    return glob, emb_a, emb_b
