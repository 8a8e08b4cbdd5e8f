"""Building blocks shared by the backbones.

Self-attention goes through `torch.nn.functional.scaled_dot_product_attention` (fused on CPU
and GPU), except when it trains with attention dropout on the CPU (below). Every sequence is
left-padded or gapped (padding anywhere); masks are built from a `valid` (B, L) bool tensor,
True = an item.

Dropout on the CPU: torch's CPU dropout draws its mask with `bernoulli_`, which costs about
21 ns per element on one thread of this project's machine (2-vCPU AVX-512 x86-64, torch
2.13.0+cpu): 72 ms forward + backward for a (128, 200, 128) float32 tensor. `dropout` draws 16 random bits per element instead (one 64-bit draw
per four elements) and keeps an element when its bits clear a threshold: 23 ms for the same
tensor. The keep probability is 1 - p rounded to a multiple of 1/65536 (|error| <= 7.7e-6);
elements are kept independently, and the kept ones are scaled by 1 / (1 - p) as torch does.
Other devices (CUDA's dropout is fused) and integer tensors use `F.dropout`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def time_positions(time: Tensor, length: int) -> Tensor:
    """Position ids of compacted items from their merged columns: length - time (1 = the
    window's latest column), 0 on padding (time -1). Unlike counting back over a domain's
    items, it does not depend on how many items of the domain come later in a training
    window (that count would leak the later targets' domains into earlier positions)."""
    return torch.where(time >= 0, length - time, torch.zeros_like(time))


def _keep_scale(x: Tensor, p: float) -> Tensor:
    """Tensor like x: 1 / (1 - p) where an element is kept (probability 1 - p, to 1/65536),
    0 elsewhere, drawn from torch's default generator for x's device (so torch.manual_seed
    fixes it). The comparison writes x's dtype directly (a bool mask cast afterwards costs a
    third more)."""
    n = x.numel()
    words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=x.device)
    bits = words.view(torch.int16)[:n].view(x.shape)
    keep = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    torch.ge(bits, -32768 + round(p * 65536), out=keep)
    return keep.mul_(1.0 / (1.0 - p))


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """F.dropout(x, p, training), with the CPU mask drawn by `_keep_scale` (see the module
    docstring for why and what differs)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or not x.is_floating_point() or not 0.0 < p < 1.0:
        return F.dropout(x, p, training)
    return x * _keep_scale(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (same arguments and checks) through `dropout`; `inplace` is not supported."""

    def __init__(self, p: float = 0.5, inplace: bool = False):
        if inplace:
            raise ValueError("Dropout: inplace=True is not supported")
        super().__init__(p, inplace)

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def causal_valid_mask(valid: Tensor) -> Tensor:
    """(B, 1, L, L) bool, True = may attend: keys at or before the query that are items.
    The diagonal stays open on padding rows so they never see zero keys (no NaN); those rows
    are zeroed by the callers."""
    length = valid.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
    eye = torch.eye(length, dtype=torch.bool, device=valid.device)
    return ((causal & valid[:, None, :]) | eye)[:, None]


def on_rows(fn, x: Tensor, rows: Tensor) -> Tensor:
    """fn applied to the rows of x (B, L, d_in) where `rows` (B, L) is True, zero elsewhere:
    (B, L, d_out). Why: most columns of the streams are padding (abe's merged histories fill
    half of L = 50; the domain streams a quarter), and the dense maps dominate the cost."""
    flat = x.reshape(-1, x.shape[-1])
    idx = rows.reshape(-1).nonzero().squeeze(1)
    y = fn(flat.index_select(0, idx))
    # In place: the out-of-place index_copy would first clone the zeros.
    out = y.new_zeros(flat.shape[0], y.shape[-1]).index_copy_(0, idx, y)
    return out.view(*x.shape[:-1], y.shape[-1])


class SelfAttention(nn.Module):
    """Multi-head causal self-attention, projections as in nn.MultiheadAttention (biases)."""

    def __init__(self, d: int, n_heads: int, dropout: float = 0.0, out_dropout: float = 0.0):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide the hidden size ({d})")
        self.h = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.attn_dropout = dropout
        # Dropout of the output projection, applied here so packed rows pay for it only once.
        self.out_drop = Dropout(out_dropout)

    def forward(self, x: Tensor, allowed: Tensor, rows: Tensor | None = None) -> Tensor:
        """x (B, L, d); allowed (B, 1, L, L) True = may attend; `rows` (B, L): compute the
        projections on those rows only (the others come out zero)."""
        b, length, d = x.shape
        qkv = self.qkv(x) if rows is None else on_rows(self.qkv, x, rows)
        q, k, v = qkv.view(b, length, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        p = self.attn_dropout if self.training else 0.0
        if p and x.device.type == "cpu":
            # SDPA's CPU dropout draws with bernoulli_ (module docstring): the same maths in
            # three steps with the faster mask. `allowed` always holds the diagonal, so no row
            # is all -inf.
            scores = (q @ k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
            weights = torch.softmax(scores.masked_fill_(~allowed, float("-inf")), dim=-1)
            att = dropout(weights, p) @ v
        else:
            att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=p)
        att = att.transpose(1, 2).reshape(b, length, d)
        if rows is None:
            return self.out_drop(self.out(att))
        return on_rows(lambda r: self.out_drop(self.out(r)), att, rows)


class SwiGLU(nn.Module):
    """Bias-free SwiGLU feed-forward: W3 (silu(W2 x) * W1 x)."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.fc_1 = nn.Linear(d, inner, bias=False)
        self.fc_2 = nn.Linear(d, inner, bias=False)
        self.fc_3 = nn.Linear(inner, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_3(F.silu(self.fc_2(x)) * self.fc_1(x))


class LoRA(nn.Module):
    """Low-rank adapter x -> x A B; B starts at zero so the adapter starts as a no-op."""

    def __init__(self, d: int, rank: int, init_std: float = 0.02):
        super().__init__()
        if not isinstance(rank, int) or rank < 1:
            raise ValueError(f"LoRA rank must be a positive int, got {rank!r}")
        self.mat_a = nn.Parameter(torch.randn(d, rank) * init_std)
        self.mat_b = nn.Parameter(torch.zeros(rank, d))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.mat_a) @ self.mat_b


class PointWiseFF(nn.Module):
    """SASRec's point-wise feed-forward: two linear maps with a ReLU, dropout after each."""

    def __init__(self, d: int, inner: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d, inner)
        self.fc2 = nn.Linear(inner, d)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.relu(self.fc1(x)))))


class PreNormBlock(nn.Module):
    """SASRec block (pre-norm): x + Attn(LN(x)), then x + FF(LN(x)); causal, padding-aware."""

    def __init__(self, d: int, n_heads: int, inner: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(d, eps=1e-8)
        self.attn = SelfAttention(d, n_heads, dropout)
        self.ln2 = nn.LayerNorm(d, eps=1e-8)
        self.ff = PointWiseFF(d, inner, dropout)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor, allowed: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), allowed))
        x = x + self.ff(self.ln2(x))
        return x * valid.unsqueeze(-1).to(x.dtype)


class PostNormBlock(nn.Module):
    """Post-norm transformer block: LN(x + Attn(x)), then LN(x + FF(x)) with a GELU
    feed-forward; causal, padding-aware; padding rows come out zero."""

    def __init__(self, d: int, n_heads: int, inner: int, dropout: float):
        super().__init__()
        self.attn = SelfAttention(d, n_heads, dropout, out_dropout=dropout)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, inner), nn.GELU(), Dropout(dropout), nn.Linear(inner, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        x = self.ln1(x + self.attn(x, causal_valid_mask(valid)))
        x = self.ln2(x + self.drop(self.ff(x)))
        return x * valid.unsqueeze(-1).to(x.dtype)


def per_user_pool(neg: Tensor, k: int) -> Tensor:
    """(B, L, K') per-position negatives flattened into one pool of k per user (B, k): the
    `per_user` mode. One uniform pool shared by the user's positions keeps the sampled softmax
    unbiased per position and costs one (B, L, d) x (B, d, k) product; `per_position` draws
    are scored position by position instead (`negative_logits.position_nll`)."""
    pool = neg.reshape(neg.shape[0], -1)
    if pool.shape[1] < k:
        raise ValueError(f"need {k} negatives per user, the batch holds {pool.shape[1]} "
                         f"(neg shape {tuple(neg.shape)})")
    return pool[:, :k]


# How the training negatives were drawn (the pipeline's `neg_sampling`, which every model
# receives in its config): `per_user` = a few per position, pooled per user by the models;
# `per_position` = K distinct per position, scored by that position alone.
NEG_SAMPLING = ("per_user", "per_position")


def check_neg_sampling(value: str) -> str:
    if value not in NEG_SAMPLING:
        raise ValueError(f"neg_sampling must be one of {', '.join(NEG_SAMPLING)}, got {value!r}")
    return value


def position_negatives(neg: Tensor, k: int, key: str) -> Tensor:
    """(B, L, K) per-position negatives -> (B, L, k), the first k of every position. Each
    position's K are distinct and in random order (cdsr.batching.draw_distinct), so its first
    k are a uniform k-subset of the same draw."""
    if neg.dim() != 3 or neg.shape[2] < k:
        raise ValueError(f"{key} must be (B, L, K) with K >= n_neg = {k} negatives per position, "
                         f"got {tuple(neg.shape)} (neg_sampling=per_position: set train_negatives >= {k})")
    return neg[..., :k]


def negatives_per_position(k: int, max_len: int) -> int:
    """How many per-position negatives to ask the sampler for so that the flattened pool
    holds k per user."""
    return max(1, -(-k // max_len))
