"""negative_logits / position_nll against plain autograd over the full (N, K, d) gather."""

import pytest
import torch

from models.negative_logits import negative_logits, position_nll


def _gathered(h, table, ids):
    return torch.einsum("nd,nkd->nk", h, table[ids])


def _inputs(n, k, d, n_items, seed=0, dtype=torch.float64, distinct=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g, dtype=dtype, requires_grad=True)
    table = torch.randn(n_items, d, generator=g, dtype=dtype, requires_grad=True)
    # few items, many rows: rows and chunks share ids, so the table's gradient accumulates;
    # `distinct`: no id twice within a row (in random order), as the sparse path needs
    if distinct:
        ids = torch.rand(n, n_items, generator=g).argsort(dim=1)[:, :k]
    else:
        ids = torch.randint(0, n_items, (n, k), generator=g)
    return h, table, ids


CASES = [
    ("gather", 1, (37, 13, 11, 23)), ("gather", 3, (37, 13, 11, 23)), ("gather", 100, (37, 13, 11, 23)),
    ("gather", 2, (5, 1, 3, 2)), ("gather", 7, (64, 40, 16, 9)),
    ("sparse", 0, (37, 13, 11, 23)), ("sparse", 0, (5, 1, 3, 2)), ("sparse", 0, (64, 40, 16, 41)),
    ("sparse", 0, (0, 4, 3, 5)), ("auto", 0, (33, 9, 5, 9)),
]


@pytest.mark.parametrize("method,chunk_rows,shape", CASES)
def test_matches_the_full_gather_forward_and_every_gradient(method, chunk_rows, shape):
    n, k, d, n_items = shape
    h, table, ids = _inputs(n, k, d, n_items, distinct=method != "gather")
    out = negative_logits(h, table, ids, method=method, chunk_bytes=max(1, chunk_rows * k * d * 8))
    ref = _gathered(h, table, ids)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    dh, dt = torch.autograd.grad(out, (h, table), g)
    rdh, rdt = torch.autograd.grad(ref, (h, table), g)
    torch.testing.assert_close(dh, rdh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dt, rdt, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", ["gather", "sparse"])
def test_gradcheck_float64(method):
    h, table, ids = _inputs(7, 5, 4, 6, seed=1, distinct=True)
    chunk = 2 * 5 * 4 * 8  # gather: two rows per chunk, 7 rows end in a partial one
    assert torch.autograd.gradcheck(lambda a, b: negative_logits(a, b, ids, method=method, chunk_bytes=chunk),
                                    (h, table))


@pytest.mark.parametrize("method", ["gather", "sparse"])
def test_float32_agrees_with_the_float64_reference(method):
    h, table, ids = _inputs(50, 64, 32, 100, seed=2, dtype=torch.float32, distinct=True)
    out = negative_logits(h, table, ids, method=method)
    hd, td = (x.detach().double().requires_grad_() for x in (h, table))
    ref = _gathered(hd, td, ids)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (h, table), g)
    want = torch.autograd.grad(ref, (hd, td), g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_auto_takes_the_gather_path_when_a_row_repeats_an_id():
    h, table, ids = _inputs(6, 4, 3, 8, seed=5, distinct=True)
    ids[2, 3] = ids[2, 0]
    torch.testing.assert_close(negative_logits(h, table, ids), _gathered(h, table, ids), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="method=sparse"):
        negative_logits(h, table, ids, method="sparse")


@pytest.mark.parametrize("method", ["gather", "sparse"])
def test_padding_row_gets_no_gradient_and_only_needed_gradients_are_built(method):
    h, table, ids = _inputs(9, 4, 3, 5, seed=3, distinct=True)
    assert (ids == 0).any()
    dt, = torch.autograd.grad(negative_logits(h, table, ids, padding_idx=0, method=method).sum(), table)
    assert torch.equal(dt[0], torch.zeros(3, dtype=dt.dtype)) and dt[1:].abs().sum() > 0
    out = negative_logits(h.detach(), table, ids, method=method)
    dt2, = torch.autograd.grad(out.sum(), table)
    torch.testing.assert_close(dt2, torch.autograd.grad(_gathered(h.detach(), table, ids).sum(), table)[0])


@pytest.mark.parametrize("bad,match", [
    (dict(h=torch.zeros(3, 4), table=torch.zeros(5, 3)), "same d"),
    (dict(ids=torch.zeros(2, 2, dtype=torch.int64)), "N = h.shape"),
    (dict(ids=torch.zeros(3, 2, dtype=torch.int32)), "int64"),
    (dict(table=torch.zeros(5, 4, dtype=torch.float64)), "one floating dtype"),
    (dict(chunk_bytes=0), "chunk_bytes"),
    (dict(method="dense"), "method must be one of auto, sparse, gather"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(h=torch.zeros(3, 4), table=torch.zeros(5, 4), ids=torch.zeros(3, 2, dtype=torch.int64))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        negative_logits(**args)


def _nll_reference(h, table, target, neg, temperature):
    """Every position (padding included) scored with full gathers, then padding zeroed."""
    pos = (h * table[target]).sum(-1, keepdim=True)
    negs = torch.einsum("bld,blkd->blk", h, table[neg])
    nll = -torch.log_softmax(torch.cat([pos, negs], dim=-1) / temperature, dim=-1)[..., 0]
    return nll * (target > 0).to(nll.dtype)


@pytest.mark.parametrize("method", ["gather", "sparse"])
def test_position_nll_matches_the_reference_and_padding_contributes_nothing(method):
    g = torch.Generator().manual_seed(4)
    b, length, d, k, n_items = 4, 6, 5, 7, 30
    h = torch.randn(b, length, d, generator=g, dtype=torch.float64, requires_grad=True)
    table = torch.randn(n_items, d, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(1, 20, (b, length), generator=g)
    target[0, :3] = 0
    target[2, 1] = 0  # a gap inside the sequence
    target[3] = 0  # a row without any target
    neg = 1 + torch.rand(b, length, 19, generator=g).argsort(dim=-1)[..., :k]  # distinct per position
    # padded positions draw from items 20.. that appear nowhere else
    neg[target == 0] = 20 + torch.rand(int((target == 0).sum()), n_items - 20, generator=g).argsort(dim=-1)[:, :k]
    w = torch.randn(b, length, generator=g, dtype=torch.float64)
    nll = position_nll(h, table, target, neg, 0.75, method=method, chunk_bytes=3 * k * d * 8)
    ref = _nll_reference(h, table, target, neg, 0.75)
    torch.testing.assert_close(nll, ref, rtol=1e-12, atol=1e-12)
    assert torch.equal(nll[target == 0], torch.zeros(int((target == 0).sum()), dtype=nll.dtype))
    dh, dt = torch.autograd.grad((nll * w).sum(), (h, table))
    rdh, rdt = torch.autograd.grad((ref * w).sum(), (h, table))
    torch.testing.assert_close(dh, rdh, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dt, rdt, rtol=1e-12, atol=1e-12)
    assert torch.equal(dh[target == 0], torch.zeros_like(dh[target == 0]))
    assert torch.equal(dt[20:], torch.zeros_like(dt[20:]))
