"""ranking_metrics against rankings computed by hand and by a plain Python loop."""

import math

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cdsr.metrics import ranking_metrics


def test_positive_on_top():
    m = ranking_metrics(torch.tensor([[5.0, 1.0, 2.0, 3.0]]))
    assert m["hr@1"] == 1.0 and m["ndcg@1"] == 1.0 and m["mrr"] == 1.0 and m["auc"] == 1.0


def test_rank_three_with_a_tie():
    # negatives 3 and 5 beat the positive 2; one negative ties it (counts half in AUC, not in rank)
    m = ranking_metrics(torch.tensor([[2.0, 3.0, 1.0, 2.0, 5.0]]), ks=(1, 2, 3, 5))
    assert m["hr@1"] == 0.0 and m["hr@2"] == 0.0 and m["hr@3"] == 1.0 and m["hr@5"] == 1.0
    assert m["ndcg@2"] == 0.0
    assert m["ndcg@3"] == pytest.approx(1 / math.log2(4))
    assert m["mrr"] == pytest.approx(1 / 3)
    assert m["auc"] == pytest.approx((1 + 0.5) / 4)


def test_all_equal_scores():
    m = ranking_metrics(torch.zeros(3, 100))
    # ties never push the positive down: rank 1 for everybody, AUC exactly one half
    assert m["hr@1"] == 1.0 and m["ndcg@1"] == 1.0 and m["mrr"] == 1.0
    assert m["auc"] == 0.5


def test_k_bounds():
    # exactly 5 negatives higher: rank 6 -> outside top 5, inside top 10
    row = torch.tensor([[0.0] + [1.0] * 5 + [-1.0] * 10])
    m = ranking_metrics(row, ks=(1, 5, 6, 10))
    assert m["hr@5"] == 0.0 and m["ndcg@5"] == 0.0
    assert m["hr@6"] == 1.0 and m["ndcg@6"] == pytest.approx(1 / math.log2(7))
    assert m["hr@10"] == 1.0
    assert m["auc"] == pytest.approx(10 / 15)


def test_average_over_rows_and_keys():
    scores = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 2.0]])  # ranks 1 and 3
    m = ranking_metrics(scores)
    assert set(m) == {f"hr@{k}" for k in (1, 5, 10, 20)} | {f"ndcg@{k}" for k in (1, 5, 10, 20)} | {"mrr", "auc"}
    assert m["hr@1"] == 0.5
    assert m["mrr"] == pytest.approx((1 + 1 / 3) / 2)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(4)) / 2)
    assert m["auc"] == pytest.approx((1 + 0) / 2)
    assert all(isinstance(v, float) for v in m.values())


def test_matches_python_loop_on_random_ties():
    g = torch.Generator().manual_seed(3)
    scores = torch.randint(0, 6, (50, 12), generator=g).float()  # many ties
    ks = (1, 3, 10)
    m = ranking_metrics(scores, ks)
    hr = {k: 0.0 for k in ks}
    ndcg = {k: 0.0 for k in ks}
    mrr = auc = 0.0
    for row in scores.tolist():
        pos, negs = row[0], row[1:]
        rank = 1 + sum(n > pos for n in negs)
        for k in ks:
            if rank <= k:
                hr[k] += 1
                ndcg[k] += 1 / math.log2(rank + 1)
        mrr += 1 / rank
        auc += sum(1.0 if n < pos else 0.5 if n == pos else 0.0 for n in negs) / len(negs)
    n = len(scores)
    for k in ks:
        assert m[f"hr@{k}"] == pytest.approx(hr[k] / n)
        assert m[f"ndcg@{k}"] == pytest.approx(ndcg[k] / n)
    assert m["mrr"] == pytest.approx(mrr / n)
    assert m["auc"] == pytest.approx(auc / n)


def test_bad_input():
    with pytest.raises(ValueError, match="scores"):
        ranking_metrics(torch.zeros(4))
    with pytest.raises(ValueError, match="scores"):
        ranking_metrics(torch.zeros(4, 1))
    with pytest.raises(ValueError, match="ks"):
        ranking_metrics(torch.zeros(4, 3), ks=(0,))


class _TorchCalls(TorchFunctionMode):
    """Records the name of every torch function and tensor method called inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, "__name__", repr(func)))
        return func(*args, **(kwargs or {}))


def _torch_calls(scores):
    with _TorchCalls() as calls:
        ranking_metrics(scores)
    return calls.names


def test_vectorised_over_users_and_negatives():
    """An AFK-sized evaluation (7144 users x 1 + 999 candidates) makes exactly the torch calls
    a 3-user, 4-candidate one makes: no Python loop over users or negatives, and nothing is
    moved into Python lists to loop over there."""
    small = _torch_calls(torch.randn(3, 5))
    afk = _torch_calls(torch.randn(7144, 1000))
    assert afk == small
    assert not {"tolist", "numpy", "unbind", "__iter__"} & set(afk)
