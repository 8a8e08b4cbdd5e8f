"""Sampled-candidate ranking metrics (vectorised over users).

rank = 1 + number of negatives scored strictly higher than the positive (so ties favour the
positive, as in the paper's protocol); HR@k = [rank <= k]; NDCG@k = 1 / log2(rank + 1) when
rank <= k; MRR = 1 / rank; AUC = fraction of negatives scored below the positive, ties half.
"""

from __future__ import annotations

from typing import Dict, Sequence

import torch

DEFAULT_KS = (1, 5, 10, 20)


def metric_names(ks: Sequence[int] = DEFAULT_KS):
    return [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + ["mrr", "auc"]


def per_row_ranks(scores: torch.Tensor):
    """-> (rank (N,) float64, auc (N,) float64) for an (N, 1 + K) score matrix."""
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(f"scores must be (N, 1 + K) with K >= 1 (column 0 = positive), got {tuple(scores.shape)}")
    scores = scores.detach()
    pos = scores[:, :1]
    neg = scores[:, 1:]
    higher = (neg > pos).sum(dim=1).to(torch.float64)
    ties = (neg == pos).sum(dim=1).to(torch.float64)
    n_neg = neg.shape[1]
    rank = 1.0 + higher
    auc = (n_neg - higher - ties + 0.5 * ties) / n_neg
    return rank, auc


def ranking_metrics(scores: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> Dict[str, float]:
    """Metrics averaged over the rows of `scores` (N, 1 + K), column 0 the positive."""
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"ks must be positive integers, got {k}")
    rank, auc = per_row_ranks(scores)
    if rank.numel() == 0:
        return {name: float("nan") for name in metric_names(ks)}
    out: Dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = (rank <= k).to(torch.float64).mean().item()
    for k in ks:
        gain = 1.0 / torch.log2(rank + 1.0)
        out[f"ndcg@{k}"] = torch.where(rank <= k, gain, torch.zeros_like(gain)).mean().item()
    out["mrr"] = (1.0 / rank).mean().item()
    out["auc"] = auc.mean().item()
    return out
