"""models.layers.dropout (the CPU mask from 16 random bits per element) and the attention
path that uses it: the keep rate, the scaling, the gradient, seeding, and SelfAttention's
manual attention against SDPA."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.layers import Dropout, SelfAttention, causal_valid_mask, dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_keep_rate_and_scale(p, dtype):
    torch.manual_seed(0)
    n = 400_000
    x = torch.full((n,), 3.0, dtype=dtype)
    y = dropout(x, p)
    assert y.dtype == dtype and y.shape == x.shape
    dropped = (y == 0).double().mean().item()
    # Binomial: 6 standard deviations, plus the 1/65536 rounding of p.
    assert abs(dropped - p) < 6 * math.sqrt(p * (1 - p) / n) + 1 / 65536
    kept = y[y != 0].double()
    # x times 1/(1-p), both in x's dtype (as torch's own dropout scales).
    want = (torch.tensor(3.0, dtype=dtype) * torch.tensor(1 / (1 - p), dtype=dtype)).double()
    assert torch.all(kept == want)


def test_mask_bits_are_independent():
    """The four 16-bit draws of one 64-bit word must not agree more than chance: neighbours
    (same word) and elements four apart (next word) are uncorrelated."""
    torch.manual_seed(1)
    y = dropout(torch.ones(1 << 20), 0.5)
    kept = (y != 0).double()
    for lag in (1, 2, 3, 4):
        a, b = kept[:-lag] - kept.mean(), kept[lag:] - kept.mean()
        corr = (a * b).mean() / kept.var()
        assert abs(corr.item()) < 6 / math.sqrt(kept.numel())


def test_gradient_is_the_mask():
    torch.manual_seed(2)
    x = torch.randn(64, 33, dtype=torch.float64, requires_grad=True)
    y = dropout(x, 0.3)
    g = torch.randn_like(y)
    y.backward(g)
    scale = torch.where(y != 0, 1 / 0.7, 0.0).double()
    torch.testing.assert_close(y, x.detach() * scale)
    torch.testing.assert_close(x.grad, g * scale)


def test_seeded_like_torch_and_off_when_not_training():
    x = torch.randn(10, 20)
    torch.manual_seed(3)
    a = dropout(x, 0.5)
    torch.manual_seed(3)
    b = dropout(x, 0.5)
    assert torch.equal(a, b)
    assert not torch.equal(a, dropout(x, 0.5))
    assert dropout(x, 0.5, training=False) is x
    assert dropout(x, 0.0) is x
    assert torch.equal(dropout(x, 1.0), torch.zeros_like(x))


def test_module_checks_like_nn_dropout():
    with pytest.raises(ValueError, match="dropout probability has to be between 0 and 1, but got 2"):
        Dropout(2.0)
    with pytest.raises(ValueError, match="inplace"):
        Dropout(0.1, inplace=True)
    m = Dropout(0.4)
    x = torch.ones(1000)
    assert torch.equal(m.eval()(x), x)
    assert (m.train()(x) == 0).any()
    assert isinstance(m, torch.nn.Dropout)


@pytest.mark.parametrize("heads", [1, 2])
def test_self_attention_manual_path_matches_sdpa(heads):
    """With attention dropout on the CPU, SelfAttention computes softmax(QK^T/sqrt(dh) + mask)
    by hand: at a p that keeps every element (p < 2^-17 rounds to 0; the scale stays
    1/(1-p)), output and gradients equal SDPA's, padding and causality included."""
    torch.manual_seed(4)
    att = SelfAttention(16, heads, dropout=0.0).double().train()
    x = torch.randn(3, 9, 16, dtype=torch.float64)
    valid = torch.rand(3, 9) > 0.3
    valid[:, -1] = True
    allowed = causal_valid_mask(valid)
    p = 1e-9

    def run(attn_dropout):
        att.attn_dropout = attn_dropout
        xi = x.clone().requires_grad_()
        out = att(xi, allowed)
        out.backward(torch.ones_like(out))
        grads = [xi.grad] + [w.grad.clone() for w in att.parameters()]
        att.zero_grad()
        return out.detach(), grads

    manual, g_manual = run(p)
    fused, g_fused = run(0.0)
    # The manual path scales its weights by 1/(1-p); undo it on the value path only:
    # out = (A/(1-p)) V Wo^T + bo, so compare with the scale folded in on SDPA's side.
    att.attn_dropout = 0.0
    with torch.no_grad():
        qkv = att.qkv(x)
        q, k, v = qkv.view(3, 9, 3, heads, 16 // heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed) / (1 - p)
        want = att.out(o.transpose(1, 2).reshape(3, 9, 16))
    torch.testing.assert_close(manual, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(manual, fused, rtol=1e-8, atol=1e-8)
    for a, b in zip(g_manual, g_fused):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_self_attention_dropout_drops_attention_weights():
    """At p = 0.5 the output differs between draws and its mean over draws approaches the
    no-dropout output (dropout is unbiased)."""
    torch.manual_seed(5)
    att = SelfAttention(8, 2, dropout=0.5).double().train()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    allowed = causal_valid_mask(torch.ones(2, 6, dtype=torch.bool))
    with torch.no_grad():
        draws = torch.stack([att(x, allowed) for _ in range(4000)])
        att.eval()
        exact = att(x, allowed)
    assert not torch.equal(draws[0], draws[1])
    torch.testing.assert_close(draws.mean(0), exact, rtol=0, atol=0.03)


def test_traces_under_torch_compile_fullgraph():
    """A user compiling a model in training mode: the mask draw traces in one graph
    (aot_eager: dynamo + AOT autograd without inductor's codegen)."""
    torch.manual_seed(6)
    x = torch.randn(256, 64, requires_grad=True)
    y = torch.compile(lambda t: dropout(t, 0.3), fullgraph=True, backend="aot_eager")(x)
    assert abs((y == 0).double().mean().item() - 0.3) < 0.02
    y.sum().backward()
    assert torch.equal(x.grad != 0, y != 0)
    att = SelfAttention(16, 2, dropout=0.2).train()
    allowed = causal_valid_mask(torch.ones(3, 7, dtype=torch.bool))
    out = torch.compile(att, fullgraph=True, backend="aot_eager")(torch.randn(3, 7, 16), allowed)
    assert out.shape == (3, 7, 16) and torch.isfinite(out).all()
