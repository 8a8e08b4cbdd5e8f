"""Eager PyTorch reference of the two operators: the definition every backend must match.

Written for clarity, not speed: it materialises the (B, H, La, Lb) score matrix and the
concatenation ``[x_a ; x']``, exactly the intermediates the fused backends avoid. Run in
float64 it is the test oracle; run in the input dtype it is the ``eager`` backend.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Denominator floor of the per-row cosine: cos = <a, b> / max(|a| |b|, COS_EPS).
COS_EPS = 1e-8


def _visible_keys(
    batch: int,
    la: int,
    lb: int,
    key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor],
    device: torch.device,
) -> Tensor:
    """(B, La, Lb) bool, True where query i may attend to key j."""
    visible = torch.ones(batch, la, lb, dtype=torch.bool, device=device)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, :]
    if attn_mask is not None:
        am = attn_mask if attn_mask.dim() == 3 else attn_mask[None]
        visible = visible & ~am
    return visible


def rowwise_cosine(a: Tensor, b: Tensor, eps: float = COS_EPS) -> Tensor:
    """cos(a_i, b_i) over the last dimension with the contract's denominator floor.

    Half-precision inputs are reduced in float32, as the fused kernels do: in float16 the
    floor 1e-8 would round to 0 and a zero row would give 0 / 0.
    """
    if a.dtype in (torch.float16, torch.bfloat16):
        return rowwise_cosine(a.float(), b.float(), eps).to(a.dtype)
    dot = (a * b).sum(-1)
    den = a.norm(dim=-1) * b.norm(dim=-1)
    return dot / den.clamp_min(eps)


def gated_cross_attention_ref(
    x_a: Tensor,
    x_b: Tensor,
    wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor,
    wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor] = None,
    ln_b: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    attn_mask: Optional[Tensor] = None,
    n_heads: int = 1,
    activation: str = "sigmoid",
    ln_eps: float = 1e-5,
) -> Tuple[Tensor, Tensor]:
    """Returns ``(y, cos)``: y (B, La, d) and the per-row cos(x_a, x') (B, La).

    LayerNorm is applied when ``ln_w`` is given (``ln_b`` must then be given too).
    """
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    dh = d // n_heads

    q = F.linear(x_a, wq, bq).view(bsz, la, n_heads, dh).transpose(1, 2)
    k = F.linear(x_b, wk, bk).view(bsz, lb, n_heads, dh).transpose(1, 2)
    v = F.linear(x_b, wv, bv).view(bsz, lb, n_heads, dh).transpose(1, 2)

    visible = _visible_keys(bsz, la, lb, key_padding_mask, attn_mask, x_a.device)
    s = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh)
    s = s.masked_fill(~visible[:, None], float("-inf"))
    # Rows with no visible key: softmax of all -inf is NaN; give them p = 0 instead.
    has_key = visible.any(-1)  # (B, La)
    s = s.masked_fill(~has_key[:, None, :, None], 0.0)
    p = torch.softmax(s, dim=-1) * has_key[:, None, :, None]
    o = torch.matmul(p, v).transpose(1, 2).reshape(bsz, la, d)
    # x' = 0 exactly on rows that saw nothing (the output bias is not added there).
    x_prime = F.linear(o, wo, bo) * has_key[..., None].to(o.dtype)

    h = F.relu(F.linear(torch.cat([x_a, x_prime], dim=-1), w1, b1))
    g_pre = F.linear(h, w2, b2)
    if activation == "sigmoid":
        g = torch.sigmoid(g_pre)
    elif activation == "tanh":
        g = torch.tanh(g_pre)
    else:
        raise ValueError(f"activation must be 'sigmoid' or 'tanh', got {activation!r}")
    z = x_a + g * x_prime
    y = F.layer_norm(z, (d,), ln_w, ln_b, ln_eps) if ln_w is not None else z
    # cos is 0 on rows without a key (x' = 0); masking it there as well keeps the gradient of
    # the cosine at x' = 0 (x_a / COS_EPS, which overflows float16) out of the backward
    cos = rowwise_cosine(x_a, x_prime) * has_key.to(x_prime.dtype)
    return y, cos


def cosine_alignment_ref(
    x: Tensor, y: Tensor, mask: Optional[Tensor] = None, absolute: bool = True
) -> Tensor:
    """Mean over valid rows of |cos(x_i, y_i)| (or cos when ``absolute=False``).

    ``mask`` (x.shape[:-1]) bool, True = valid row; no valid row gives 0, not NaN.
    """
    cos = rowwise_cosine(x, y)
    if absolute:
        cos = cos.abs()
    if mask is None:
        return cos.mean() if cos.numel() > 0 else cos.sum()
    m = mask.to(cos.dtype)
    return (cos * m).sum() / m.sum().clamp_min(1.0)
