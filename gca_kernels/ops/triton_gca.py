"""Triton backend of the GCA operator (forward and backward) and its registration.

The dense projections q/k/v = x W^T + b and the weight-gradient GEMMs of backward are left to
torch matmul; everything between them runs in five Triton kernels (two forward, three backward).
Saved for backward: the inputs and weights, q/k/v (the projections' outputs), o, the
logsumexp and the LayerNorm mean/rstd per row: O((B * (La + Lb)) * d) memory, never
O(La * Lb), and neither h (B * La x gate width) nor ``[x_a ; x']``.

Forward (2 kernels)
-------------------
``_attn_fwd_kernel``, grid (B * H, La blocks): flash attention over the visible keys. The
key-padding mask (B, Lb) and the attention mask (Bm, La, Lb), Bm in {1, B} (broadcast by a
zero batch stride), are applied in registers; an online softmax accumulates ``p v`` so the
(La x Lb) score/probability matrix never reaches global memory. Writes ``o`` (B, La, d) in the
heads-concatenated layout and the log-sum-exp per (B, H, La) row. A query row that sees no
key gets ``o = 0`` and ``lse = +inf`` (which also makes backward's ``exp(s - lse)`` exactly 0
there, with no NaN).

``_epilogue_fwd_kernel``, grid (row blocks of B * La): everything row-wise after attention in
one pass over each block of rows: the output projection ``x' = (o Wo^T + bo) * has_key``
(``has_key`` read from head 0's ``lse``: the masks do not depend on the head), the gate
``h = relu(x_a W1a^T + x' W1b^T + b1)`` computed in chunks of the hidden width without ever
forming ``[x_a ; x']`` (W1 is read as its two d-column halves) and consumed at once by
``g_pre += h W2^T`` (so h never reaches memory either), ``g = act(g_pre + b2)``, the Hadamard
residual ``z = x_a + g * x'``, the LayerNorm (mean/rstd written for backward), and the per-row
``cos(x_a, x')``.

Backward (3 kernels + torch GEMMs)
----------------------------------
``_epilogue_bwd_kernel``, row blocks: recomputes ``x'``, ``h`` and ``g`` from ``x_a``, ``o``
and the weights (only ``o``, ``lse``, mean and rstd were saved), then runs LayerNorm
backward (dln_w/dln_b as per-program partial sums reduced in torch), the gate backward
(sigmoid/tanh and ReLU derivatives), the cosine backward and the output-projection backward
``do = (dx' * has_key) Wo``. It writes the row tensors the weight-gradient GEMMs need
(``dg_pre``, ``dh_pre``, ``h``, ``x'``, ``dx' * has_key``) and the row-local part of ``dx_a``.

``_attn_bwd_dq_kernel``, grid (B * H, La blocks): recomputes ``p = exp(q k^T / sqrt(dh) - lse)``
and ``dp = do v^T`` over the visible keys twice: a first pass sums ``delta = sum_j p dp`` (stored
for the next kernel; equal to flash attention's ``rowsum(do * o)`` but exact where a row has a
single visible key, so ``ds`` is exactly 0 there as in eager autograd), the second accumulates
``dq``.
``_attn_bwd_dkdv_kernel``, grid (B * H, Lb blocks): recomputes ``p`` the same way for its key
block over all query blocks and accumulates ``dk`` and ``dv``.
No kernel uses atomics: every output element is written by exactly one program and every
reduction has a fixed order, so results are bit-identical run to run.

Numerics and limits
-------------------
float32 and float64 everywhere (CPU only under ``TRITON_INTERPRET=1``); float16/bfloat16 on
CUDA GPUs. Loads are upcast once to the accumulation dtype (float32, or float64 for float64
inputs, passed to the kernels as ``ACC``) and results are cast back once. Dots (``_dot``):
float16/bfloat16 inputs multiply operands in their own dtype on tensor cores with float32
accumulation (p and ds tiles rounded to it, as FlashAttention does); float32/float64 inputs
run exact (``input_precision="ieee"``, no TF32), which the tests compare against the float64
reference. Row-wise intermediates handed from backward's kernels to torch are kept in the
accumulation dtype. Scalars (LayerNorm eps, COS_EPS, 1/sqrt(dh)) travel in a small tensor of
the accumulation dtype: a Python float argument would be rounded to float32 by Triton. Any
La, Lb >= 1, any d with n_heads | d (blocks are the next power of two >= 16 of d, dh and the
gate width, masked), any number of heads, any gate width. Offsets of batch and row strides are
64-bit; B * H goes on the grid's first axis (2^31 - 1 programs) and sequence blocks on the
second (65535 blocks). Limits, from the sm_90 compile report (``python -m
benchmarks.gpu_compile``): the row-wise epilogues hold a (rows x d) tile per row block and
fuse the output projection and the gate's products, so they spill from d = 256 in backward and
need more shared memory than sm_90 has at d = 1024. GPU block sizes are fixed (no
autotuning) and have never been timed on a GPU.
"""

from __future__ import annotations

import math
import os
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from gca_kernels.backends import GCAParams, register_backend
from gca_kernels.ops import output_grads
from gca_kernels.ops.triton_cosine import (
    _row_cos,
    _row_cos_grad,
    acc_dtype,
    cosine_alignment_triton,
    device_constants,
    tl_acc,
)
from gca_kernels.reference import COS_EPS

_INF = float("inf")


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _gate_act(x, ACT_TANH: tl.constexpr):
    # tanh through the sigmoid: the interpreter has no tl.tanh / libdevice
    if ACT_TANH:
        return 2.0 * _sigmoid(2.0 * x) - 1.0
    else:
        return _sigmoid(x)


@triton.jit
def _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb,
             HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr):
    """(BM, BN) bool: query offs_m may attend to key offs_n of batch row b."""
    mmask = offs_m < La
    nmask = offs_n < Lb
    vis = mmask[:, None] & nmask[None, :]
    if HAS_KPM:
        pad = tl.load(KPM + b * Lb + offs_n, mask=nmask, other=1)
        vis = vis & (pad == 0)[None, :]
    if HAS_AM:
        blocked = tl.load(AM + b * stride_amb + offs_m[:, None] * Lb + offs_n[None, :],
                          mask=mmask[:, None] & nmask[None, :], other=1)
        vis = vis & (blocked == 0)
    return vis


@triton.jit
def _dot(a, b, acc, OPD: tl.constexpr, HALF: tl.constexpr):
    """a @ b (+ acc), accumulated in float32 (float64 for float64 inputs). Half-precision
    inputs feed tensor cores with both operands in their own dtype (a p or ds tile is rounded
    to it, as FlashAttention does); float32/float64 inputs stay exact (ieee, FMA units)."""
    if HALF:
        return tl.dot(a.to(OPD), b.to(OPD), acc, out_dtype=tl.float32)
    else:
        return tl.dot(a, b, acc, input_precision="ieee")


# ----------------------------------------------------------------------------- attention


@triton.jit
def _attn_fwd_kernel(
    Q,  # (B, La, D) input dtype, head h in columns [h*DH, (h+1)*DH)
    K,  # (B, Lb, D) input dtype
    V,  # (B, Lb, D) input dtype
    KPM,  # (B, Lb) uint8, 1 = padding key (read only when HAS_KPM)
    AM,  # (Bm, La, Lb) uint8, 1 = blocked; batch stride stride_amb (0 when Bm == 1)
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(DH)]
    O,  # (B, La, D) input dtype, output
    LSE,  # (B, H, La) acc dtype, output; +inf on rows with no visible key
    La, Lb, D, DH, H, stride_amb,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_DH)
    mmask = offs_m < La
    cmask = offs_c < DH
    q_ptrs = Q + b * La * D + h * DH + offs_m[:, None] * D + offs_c[None, :]
    # the softmax scale is folded into q once (backward recomputes s the same way)
    q = tl.load(q_ptrs, mask=mmask[:, None] & cmask[None, :], other=0.0).to(ACC) * tl.load(SCAL + 2)
    kv_base = b * Lb * D + h * DH

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DH], ACC)
    for n0 in range(0, Lb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lb)[:, None] & cmask[None, :]
        kv_offs = kv_base + offs_n[:, None] * D + offs_c[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        s = _dot(q, tl.trans(k), None, OPD, HALF)
        vis = _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb, HAS_KPM, HAS_AM)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # a row with nothing visible so far keeps m = -inf: shift by 0 instead (no inf - inf)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        acc = _dot(p, v, acc * alpha[:, None], OPD, HALF)
        m_i = m_new

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(O + b * La * D + h * DH + offs_m[:, None] * D + offs_c[None, :],
             o.to(O.dtype.element_ty), mask=mmask[:, None] & cmask[None, :])
    tl.store(LSE + pid_bh.to(tl.int64) * La + offs_m, lse, mask=mmask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, La, D) input dtype
    K,  # (B, Lb, D) input dtype
    V,  # (B, Lb, D) input dtype
    DO,  # (B, La, D) acc dtype, gradient of o
    LSE,  # (B, H, La) acc dtype
    KPM,  # (B, Lb) uint8
    AM,  # (Bm, La, Lb) uint8
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(DH)]
    DELTA,  # (B, H, La) acc dtype, output: sum_j p_ij dp_ij per head
    DQ,  # (B, La, D) acc dtype, output
    La, Lb, D, DH, H, stride_amb,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = tl.arange(0, BLOCK_DH)
    mmask = offs_m < La
    qmask = mmask[:, None] & (offs_c < DH)[None, :]
    q_offs = b * La * D + h * DH + offs_m[:, None] * D + offs_c[None, :]
    scale = tl.load(SCAL + 2)
    q = tl.load(Q + q_offs, mask=qmask, other=0.0).to(ACC) * scale
    do = tl.load(DO + q_offs, mask=qmask, other=0.0).to(ACC)
    row = pid_bh.to(tl.int64) * La + offs_m
    lse = tl.load(LSE + row, mask=mmask, other=float("inf"))
    kv_base = b * Lb * D + h * DH

    # delta = sum_j p_ij dp_ij, equal to rowsum(do * o) in exact arithmetic; summed from the
    # same p and dp that ds uses, a row with one visible key (p = 1) gets ds = 0 exactly,
    # as eager autograd does, instead of the rounding gap between two dot products.
    delta = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, Lb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lb)[:, None] & (offs_c < DH)[None, :]
        kv_offs = kv_base + offs_n[:, None] * D + offs_c[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        s = _dot(q, tl.trans(k), None, OPD, HALF)
        vis = _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb, HAS_KPM, HAS_AM)
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, OPD, HALF)
        delta += tl.sum(p * dp, axis=1)
    tl.store(DELTA + row, delta, mask=mmask)

    dq = tl.zeros([BLOCK_M, BLOCK_DH], ACC)
    for n0 in range(0, Lb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lb)[:, None] & (offs_c < DH)[None, :]
        kv_offs = kv_base + offs_n[:, None] * D + offs_c[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        s = _dot(q, tl.trans(k), None, OPD, HALF)
        vis = _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb, HAS_KPM, HAS_AM)
        # lse = +inf on rows with no visible key: exp(-inf) = 0 there
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, OPD, HALF)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds, k, dq, OPD, HALF)
    tl.store(DQ + q_offs, dq * scale, mask=qmask)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, La, D) input dtype
    K,  # (B, Lb, D) input dtype
    V,  # (B, Lb, D) input dtype
    DO,  # (B, La, D) acc dtype
    LSE,  # (B, H, La) acc dtype
    DELTA,  # (B, H, La) acc dtype, from _attn_bwd_dq_kernel
    KPM,  # (B, Lb) uint8
    AM,  # (Bm, La, Lb) uint8
    SCAL,  # (3,) acc dtype
    DK,  # (B, Lb, D) acc dtype, output
    DV,  # (B, Lb, D) acc dtype, output
    La, Lb, D, DH, H, stride_amb,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_DH)
    cmask = offs_c < DH
    kv_mask = (offs_n < Lb)[:, None] & cmask[None, :]
    kv_offs = b * Lb * D + h * DH + offs_n[:, None] * D + offs_c[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(ACC)
    scale = tl.load(SCAL + 2)
    q_base = b * La * D + h * DH
    row_base = pid_bh.to(tl.int64) * La

    dk = tl.zeros([BLOCK_N, BLOCK_DH], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_DH], ACC)
    for m0 in range(0, La, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mmask = offs_m < La
        qmask = mmask[:, None] & cmask[None, :]
        q_offs = q_base + offs_m[:, None] * D + offs_c[None, :]
        q = tl.load(Q + q_offs, mask=qmask, other=0.0).to(ACC) * scale
        do = tl.load(DO + q_offs, mask=qmask, other=0.0).to(ACC)
        lse = tl.load(LSE + row_base + offs_m, mask=mmask, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=mmask, other=0.0)
        s = _dot(q, tl.trans(k), None, OPD, HALF)
        vis = _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb, HAS_KPM, HAS_AM)
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dv = _dot(tl.trans(p), do, dv, OPD, HALF)
        dp = _dot(do, tl.trans(v), None, OPD, HALF)
        ds = p * (dp - delta[:, None])
        # q already carries the 1/sqrt(dh) factor of ds/dk
        dk = _dot(tl.trans(ds), q, dk, OPD, HALF)
    tl.store(DK + kv_offs, dk, mask=kv_mask)
    tl.store(DV + kv_offs, dv, mask=kv_mask)


# ----------------------------------------------------------------------------- row-wise epilogue


@triton.jit
def _out_proj(O, WO, BO, rows, rmask, cols, cmask, has, D,
              ACC: tl.constexpr, OPD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """x' = (o Wo^T + bo) * has_key for a block of rows: (BLOCK_R, BLOCK_D), 0 outside d."""
    xp = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < D
        o_blk = tl.load(O + rows[:, None] * D + kc[None, :],
                        mask=rmask[:, None] & kmask[None, :], other=0.0).to(ACC)
        wo_t = tl.load(WO + cols[None, :] * D + kc[:, None],
                       mask=kmask[:, None] & cmask[None, :], other=0.0).to(ACC)  # Wo^T slice
        xp = _dot(o_blk, wo_t, xp, OPD, HALF)
    bo = tl.load(BO + cols, mask=cmask, other=0.0).to(ACC)
    # no visible key: x' = 0 exactly, the bias is not added
    return tl.where(has[:, None] & cmask[None, :], xp + bo[None, :], 0.0)


@triton.jit
def _gate_hidden_chunk(xa, xp, W1, B1, jc, jmask, cols, cmask, D,
                       ACC: tl.constexpr, OPD: tl.constexpr, HALF: tl.constexpr):
    """h_pre[:, jc] = x_a W1a[jc]^T + x' W1b[jc]^T + b1[jc], reading W1's two halves in place."""
    w_offs = jc[None, :] * (2 * D) + cols[:, None]
    wmask = cmask[:, None] & jmask[None, :]
    w1a_t = tl.load(W1 + w_offs, mask=wmask, other=0.0).to(ACC)  # (BLOCK_D, BLOCK_H)
    w1b_t = tl.load(W1 + D + w_offs, mask=wmask, other=0.0).to(ACC)
    b1 = tl.load(B1 + jc, mask=jmask, other=0.0).to(ACC)
    hpre = _dot(xa, w1a_t, None, OPD, HALF)
    hpre = _dot(xp, w1b_t, hpre, OPD, HALF)
    return hpre + b1[None, :]


@triton.jit
def _gate_pre(xa, xp, W1, B1, W2, B2, cols, cmask, D, HID,
              ACC: tl.constexpr, OPD: tl.constexpr, HALF: tl.constexpr, BLOCK_R: tl.constexpr,
              BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr):
    """g_pre = relu(h_pre) W2^T + b2, hidden width consumed chunk by chunk (h never stored)."""
    gpre = tl.zeros([BLOCK_R, BLOCK_D], ACC)
    for j0 in range(0, HID, BLOCK_H):
        jc = j0 + tl.arange(0, BLOCK_H)
        jmask = jc < HID
        hpre = _gate_hidden_chunk(xa, xp, W1, B1, jc, jmask, cols, cmask, D, ACC, OPD, HALF)
        w2_t = tl.load(W2 + cols[None, :] * HID + jc[:, None],
                       mask=jmask[:, None] & cmask[None, :], other=0.0).to(ACC)  # (BLOCK_H, BLOCK_D)
        gpre = _dot(tl.maximum(hpre, 0.0), w2_t, gpre, OPD, HALF)
    b2 = tl.load(B2 + cols, mask=cmask, other=0.0).to(ACC)
    return gpre + b2[None, :]


@triton.jit
def _epilogue_fwd_kernel(
    XA,  # (R, D) input dtype, R = B * La
    O,  # (R, D) input dtype, attention output (heads concatenated)
    LSE,  # (B, H, La) acc dtype; head 0 tells whether a row saw any key
    WO,  # (D, D)
    BO,  # (D,)
    W1,  # (HID, 2D): columns [0, D) act on x_a, [D, 2D) on x'
    B1,  # (HID,)
    W2,  # (D, HID)
    B2,  # (D,)
    LNW,  # (D,) (read only when HAS_LN)
    LNB,  # (D,) (read only when HAS_LN)
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(dh)]
    Y,  # (R, D) input dtype, output
    COS,  # (R,) input dtype, output
    MEAN,  # (R,) acc dtype, output: mean of z per row
    RSTD,  # (R,) acc dtype, output: 1/sqrt(var(z) + eps) per row
    R, La, H, D, HID,
    ACT_TANH: tl.constexpr, HAS_LN: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xa = tl.load(XA + offs, mask=m2, other=0.0).to(ACC)
    lse0 = tl.load(LSE + (rows // La) * H * La + rows % La, mask=rmask, other=float("inf"))
    has = lse0 < float("inf")

    xp = _out_proj(O, WO, BO, rows, rmask, cols, cmask, has, D, ACC, OPD, HALF,
                   BLOCK_R, BLOCK_D, BLOCK_K)
    g = _gate_act(_gate_pre(xa, xp, W1, B1, W2, B2, cols, cmask, D, HID,
                            ACC, OPD, HALF, BLOCK_R, BLOCK_D, BLOCK_H), ACT_TANH)
    z = xa + g * xp  # 0 outside d: xa and xp are

    mean = tl.sum(z, axis=1) / D
    zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + tl.load(SCAL))
    tl.store(MEAN + rows, mean, mask=rmask)
    tl.store(RSTD + rows, rstd, mask=rmask)
    if HAS_LN:
        w = tl.load(LNW + cols, mask=cmask, other=0.0).to(ACC)
        bb = tl.load(LNB + cols, mask=cmask, other=0.0).to(ACC)
        y = zc * rstd[:, None] * w[None, :] + bb[None, :]
    else:
        y = z
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=m2)
    cos = _row_cos(xa, xp, tl.load(SCAL + 1))
    tl.store(COS + rows, cos.to(COS.dtype.element_ty), mask=rmask)


@triton.jit
def _epilogue_bwd_kernel(
    DY,  # (R, D) any float dtype, upstream gradient of y
    DCOS,  # (R,) any float dtype, upstream gradient of cos
    XA,  # (R, D) input dtype
    O,  # (R, D) input dtype
    LSE,  # (B, H, La) acc dtype
    WO,  # (D, D)
    BO,  # (D,)
    W1,  # (HID, 2D)
    B1,  # (HID,)
    W2,  # (D, HID)
    B2,  # (D,)
    LNW,  # (D,) (read only when HAS_LN)
    MEAN,  # (R,) acc dtype
    RSTD,  # (R,) acc dtype
    SCAL,  # (3,) acc dtype
    DXA,  # (R, D) acc dtype, output: dz + gate and cosine parts of dx_a (not the q part)
    XP,  # (R, D) acc dtype, output: recomputed x'
    DXPM,  # (R, D) acc dtype, output: dx' * has_key (gradient at the output projection)
    DO,  # (R, D) acc dtype, output: (dx' * has_key) Wo
    DGPRE,  # (R, D) acc dtype, output: gradient of g_pre
    HREL,  # (R, HID) acc dtype, output: recomputed relu(h_pre)
    DHPRE,  # (R, HID) acc dtype, output: gradient of h_pre
    DLNW_PART,  # (n_programs, D) acc dtype, output: per-program sum of dy * zhat
    DLNB_PART,  # (n_programs, D) acc dtype, output: per-program sum of dy
    R, La, H, D, HID,
    ACT_TANH: tl.constexpr, HAS_LN: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_H: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xa = tl.load(XA + offs, mask=m2, other=0.0).to(ACC)
    lse0 = tl.load(LSE + (rows // La) * H * La + rows % La, mask=rmask, other=float("inf"))
    has = lse0 < float("inf")

    # recompute the forward row tensors
    xp = _out_proj(O, WO, BO, rows, rmask, cols, cmask, has, D, ACC, OPD, HALF,
                   BLOCK_R, BLOCK_D, BLOCK_K)
    g = _gate_act(_gate_pre(xa, xp, W1, B1, W2, B2, cols, cmask, D, HID,
                            ACC, OPD, HALF, BLOCK_R, BLOCK_D, BLOCK_H), ACT_TANH)
    dy = tl.load(DY + offs, mask=m2, other=0.0).to(ACC)

    if HAS_LN:
        z = xa + g * xp
        mean = tl.load(MEAN + rows, mask=rmask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)
        zhat = tl.where(m2, (z - mean[:, None]) * rstd[:, None], 0.0)
        w = tl.load(LNW + cols, mask=cmask, other=0.0).to(ACC)
        dzhat = dy * w[None, :]
        c1 = tl.sum(dzhat, axis=1) / D
        c2 = tl.sum(dzhat * zhat, axis=1) / D
        dz = tl.where(m2, rstd[:, None] * (dzhat - c1[:, None] - zhat * c2[:, None]), 0.0)
        tl.store(DLNW_PART + pid.to(tl.int64) * D + cols, tl.sum(dy * zhat, axis=0), mask=cmask)
        tl.store(DLNB_PART + pid.to(tl.int64) * D + cols, tl.sum(dy, axis=0), mask=cmask)
    else:
        dz = dy

    # z = x_a + g * x'
    dxp = dz * g
    if ACT_TANH:
        dgpre = dz * xp * (1.0 - g * g)
    else:
        dgpre = dz * xp * g * (1.0 - g)
    tl.store(DGPRE + offs, dgpre, mask=m2)
    dxa = dz

    # gate backward, chunk by chunk over the hidden width (h_pre recomputed per chunk)
    for j0 in range(0, HID, BLOCK_H):
        jc = j0 + tl.arange(0, BLOCK_H)
        jmask = jc < HID
        hpre = _gate_hidden_chunk(xa, xp, W1, B1, jc, jmask, cols, cmask, D, ACC, OPD, HALF)
        hm2 = rmask[:, None] & jmask[None, :]
        h_offs = rows[:, None] * HID + jc[None, :]
        tl.store(HREL + h_offs, tl.maximum(hpre, 0.0), mask=hm2)
        w2 = tl.load(W2 + cols[:, None] * HID + jc[None, :],
                     mask=cmask[:, None] & jmask[None, :], other=0.0).to(ACC)  # (BLOCK_D, BLOCK_H)
        dh = _dot(dgpre, w2, None, OPD, HALF)
        dhpre = tl.where(hpre > 0.0, dh, 0.0)
        tl.store(DHPRE + h_offs, dhpre, mask=hm2)
        w_offs = jc[:, None] * (2 * D) + cols[None, :]
        wmask = jmask[:, None] & cmask[None, :]
        w1a = tl.load(W1 + w_offs, mask=wmask, other=0.0).to(ACC)  # (BLOCK_H, BLOCK_D)
        w1b = tl.load(W1 + D + w_offs, mask=wmask, other=0.0).to(ACC)
        dxa = _dot(dhpre, w1a, dxa, OPD, HALF)
        dxp = _dot(dhpre, w1b, dxp, OPD, HALF)

    # cosine by-product: cos(x_a, x') is differentiable
    dcos = tl.load(DCOS + rows, mask=rmask, other=0.0).to(ACC)
    dxa_c, dxp_c = _row_cos_grad(xa, xp, dcos, tl.load(SCAL + 1))
    dxa = dxa + dxa_c
    # rows that saw no key: x' was forced to 0, so nothing flows into o, Wo or bo
    dxpm = tl.where(has[:, None] & cmask[None, :], dxp + dxp_c, 0.0)
    tl.store(DXA + offs, dxa, mask=m2)
    tl.store(XP + offs, xp, mask=m2)
    tl.store(DXPM + offs, dxpm, mask=m2)
    # do = dx' Wo, written chunk by chunk
    for k0 in range(0, D, BLOCK_K):
        kc = k0 + tl.arange(0, BLOCK_K)
        kmask = kc < D
        wo = tl.load(WO + cols[:, None] * D + kc[None, :],
                     mask=cmask[:, None] & kmask[None, :], other=0.0).to(ACC)  # (BLOCK_D, BLOCK_K)
        do = _dot(dxpm, wo, None, OPD, HALF)
        tl.store(DO + rows[:, None] * D + kc[None, :], do, mask=rmask[:, None] & kmask[None, :])


# ----------------------------------------------------------------------------- launchers


# Largest sequence block and feature chunk under the interpreter, where big blocks are cheap
# (numpy) and loop steps are not; tests lower them to run the multi-block/multi-chunk paths.
_INTERP_MAX_SEQ_BLOCK = 64
_INTERP_MAX_CHUNK = 1 << 30


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _p2(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _attn_blocks(la: int, lb: int, dh: int) -> Tuple[int, int, int, int]:
    block_dh = _p2(dh)
    if _interpreted():
        # the interpreter pays per program and per loop step, not per element
        cap = max(16, _INTERP_MAX_SEQ_BLOCK)
        return min(cap, _p2(la)), min(cap, _p2(lb)), block_dh, 4
    # ieee float32 dots run on FMA units: 32 x 32 tiles with 8 warps kept ptxas (sm_90,
    # dh = 32) at no spills in forward and a few bytes in backward; 64 x 64 spilled heavily
    block = 32 if block_dh <= 64 else 16
    return min(block, _p2(la)), min(block, _p2(lb)), block_dh, 8


def _row_blocks(d: int, hid: int) -> Tuple[int, int, int, int, int]:
    block_d, block_h = _p2(d), _p2(hid)
    if _interpreted():
        cap = max(16, _INTERP_MAX_CHUNK)
        return 16, block_d, min(block_d, cap), min(block_h, cap), 4
    # 16-wide Wo / hidden chunks and 8 warps: no spills in forward at d = 128 (sm_90 ptxas)
    return 16, block_d, 16, 16, 8


def _dot_operands(dtype: torch.dtype) -> dict:
    """The kernels' dot operands: half dtypes on tensor cores, else exact (ieee)."""
    half = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}.get(dtype)
    return {"OPD": half if half is not None else tl_acc(dtype), "HALF": half is not None}


def _mask_args(key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], dummy: Tensor):
    kpm = dummy if key_padding_mask is None else key_padding_mask.contiguous().view(torch.uint8)
    if attn_mask is None:
        return kpm, dummy, 0
    if attn_mask.dim() == 2:  # (La, Lb): the front end sends (1, La, Lb), direct op calls may not
        attn_mask = attn_mask[None]
    am = attn_mask.contiguous().view(torch.uint8)
    # a shared (1, La, Lb) mask is broadcast over the batch by a zero stride
    return kpm, am, (0 if am.shape[0] == 1 else am.shape[1] * am.shape[2])


def _scalars(ln_eps: float, dh: int, acc: torch.dtype, device) -> Tensor:
    return device_constants((float(ln_eps), COS_EPS, 1.0 / math.sqrt(dh)), acc, device)


def gca_forward(
    x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
    bv: Tensor, wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], n_heads: int, activation: str, ln_eps: float,
) -> Tuple[Tensor, ...]:
    """Returns (y, cos, q, k, v, o, lse, mean, rstd); the last seven are saved for backward."""
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    dh = d // n_heads
    hid = w1.shape[0]
    acc = acc_dtype(x_a.dtype)
    x_a = x_a.contiguous()
    x_b = x_b.contiguous()
    q = F.linear(x_a, wq, bq).contiguous()
    k = F.linear(x_b, wk, bk).contiguous()
    v = F.linear(x_b, wv, bv).contiguous()
    scal = _scalars(ln_eps, dh, acc, x_a.device)
    kpm, am, stride_amb = _mask_args(key_padding_mask, attn_mask, q)

    o = torch.empty_like(q)
    lse = torch.empty(bsz, n_heads, la, dtype=acc, device=x_a.device)
    bm, bn, bdh, nw = _attn_blocks(la, lb, dh)
    _attn_fwd_kernel[(bsz * n_heads, triton.cdiv(la, bm))](
        q, k, v, kpm, am, scal, o, lse, la, lb, d, dh, n_heads, stride_amb,
        HAS_KPM=key_padding_mask is not None, HAS_AM=attn_mask is not None, ACC=tl_acc(x_a.dtype),
        **_dot_operands(x_a.dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_DH=bdh, num_warps=nw)

    rows = bsz * la
    y = torch.empty_like(x_a)
    cos = torch.empty(bsz, la, dtype=x_a.dtype, device=x_a.device)
    mean = torch.empty(rows, dtype=acc, device=x_a.device)
    rstd = torch.empty(rows, dtype=acc, device=x_a.device)
    br, bd, bk_, bh, nw = _row_blocks(d, hid)
    has_ln = ln_w is not None
    _epilogue_fwd_kernel[(triton.cdiv(rows, br),)](
        x_a, o, lse, wo.contiguous(), bo.contiguous(), w1.contiguous(), b1.contiguous(),
        w2.contiguous(), b2.contiguous(), ln_w.contiguous() if has_ln else scal,
        ln_b.contiguous() if has_ln else scal, scal, y, cos, mean, rstd,
        rows, la, n_heads, d, hid,
        ACT_TANH=activation == "tanh", HAS_LN=has_ln, ACC=tl_acc(x_a.dtype),
        **_dot_operands(x_a.dtype), BLOCK_R=br, BLOCK_D=bd, BLOCK_K=bk_, BLOCK_H=bh, num_warps=nw)
    return y, cos, q, k, v, o, lse, mean, rstd


def gca_backward(
    dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
    wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mean: Tensor, rstd: Tensor,
    n_heads: int, activation: str, ln_eps: float,
) -> List[Tensor]:
    """Gradients [dx_a, dx_b, dwq, dbq, dwk, dbk, dwv, dbv, dwo, dbo, dw1, db1, dw2, db2,
    dln_w, dln_b] (the last two empty when LayerNorm is off)."""
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    dh = d // n_heads
    hid = w1.shape[0]
    rows = bsz * la
    dtype, dev = x_a.dtype, x_a.device
    acc = acc_dtype(dtype)
    x_a = x_a.contiguous()
    x_b = x_b.contiguous()
    dy = dy.contiguous()
    dcos = dcos.contiguous()
    scal = _scalars(ln_eps, dh, acc, dev)
    has_ln = ln_w is not None

    br, bd, bk_, bh, nw = _row_blocks(d, hid)
    n_prog = triton.cdiv(rows, br)
    dxa_rows = torch.empty(rows, d, dtype=acc, device=dev)
    xp = torch.empty(rows, d, dtype=acc, device=dev)
    dxpm = torch.empty(rows, d, dtype=acc, device=dev)
    do = torch.empty(bsz, la, d, dtype=acc, device=dev)
    dgpre = torch.empty(rows, d, dtype=acc, device=dev)
    hrel = torch.empty(rows, hid, dtype=acc, device=dev)
    dhpre = torch.empty(rows, hid, dtype=acc, device=dev)
    dlnw_part = torch.empty(n_prog if has_ln else 0, d, dtype=acc, device=dev)
    dlnb_part = torch.empty(n_prog if has_ln else 0, d, dtype=acc, device=dev)
    _epilogue_bwd_kernel[(n_prog,)](
        dy, dcos, x_a, o, lse, wo.contiguous(), bo.contiguous(), w1.contiguous(), b1.contiguous(),
        w2.contiguous(), b2.contiguous(), ln_w.contiguous() if has_ln else scal, mean, rstd, scal,
        dxa_rows, xp, dxpm, do, dgpre, hrel, dhpre, dlnw_part, dlnb_part,
        rows, la, n_heads, d, hid,
        ACT_TANH=activation == "tanh", HAS_LN=has_ln, ACC=tl_acc(dtype),
        **_dot_operands(dtype), BLOCK_R=br, BLOCK_D=bd, BLOCK_K=bk_, BLOCK_H=bh, num_warps=nw)

    kpm, am, stride_amb = _mask_args(key_padding_mask, attn_mask, q)
    delta = torch.empty(bsz, n_heads, la, dtype=acc, device=dev)
    dq = torch.empty(bsz, la, d, dtype=acc, device=dev)
    dk = torch.empty(bsz, lb, d, dtype=acc, device=dev)
    dv = torch.empty(bsz, lb, d, dtype=acc, device=dev)
    bm, bn, bdh, nw = _attn_blocks(la, lb, dh)
    common = dict(HAS_KPM=key_padding_mask is not None, HAS_AM=attn_mask is not None,
                  ACC=tl_acc(dtype), **_dot_operands(dtype), BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_DH=bdh, num_warps=nw)
    _attn_bwd_dq_kernel[(bsz * n_heads, triton.cdiv(la, bm))](
        q, k, v, do, lse, kpm, am, scal, delta, dq, la, lb, d, dh, n_heads, stride_amb, **common)
    _attn_bwd_dkdv_kernel[(bsz * n_heads, triton.cdiv(lb, bn))](
        q, k, v, do, lse, delta, kpm, am, scal, dk, dv, la, lb, d, dh, n_heads, stride_amb, **common)

    # weight gradients: plain GEMMs over the row tensors the kernels wrote
    xa2 = x_a.reshape(rows, d).to(acc)
    xb2 = x_b.reshape(bsz * lb, d).to(acc)
    o2 = o.reshape(rows, d).to(acc)
    dq2, dk2, dv2 = dq.view(rows, d), dk.view(bsz * lb, d), dv.view(bsz * lb, d)
    dx_a = dxa_rows + dq2 @ wq.to(acc)
    dx_b = dk2 @ wk.to(acc) + dv2 @ wv.to(acc)
    grads = [
        dx_a.view(bsz, la, d), dx_b.view(bsz, lb, d),
        dq2.T @ xa2, dq2.sum(0), dk2.T @ xb2, dk2.sum(0), dv2.T @ xb2, dv2.sum(0),
        dxpm.T @ o2, dxpm.sum(0),
        torch.cat([dhpre.T @ xa2, dhpre.T @ xp], dim=1), dhpre.sum(0),
        dgpre.T @ hrel, dgpre.sum(0),
    ]
    if has_ln:
        grads += [dlnw_part.sum(0), dlnb_part.sum(0)]
    else:
        grads += [torch.empty(0, dtype=acc, device=dev), torch.empty(0, dtype=acc, device=dev)]
    return [g.to(dtype) for g in grads]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gca_kernels::triton_gca_fwd", mutates_args=())
def triton_gca_fwd(
    x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
    bv: Tensor, wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], n_heads: int, activation: str, ln_eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return gca_forward(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
                       key_padding_mask, attn_mask, n_heads, activation, ln_eps)


@triton_gca_fwd.register_fake
def _(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
      key_padding_mask, attn_mask, n_heads, activation, ln_eps):
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    acc = acc_dtype(x_a.dtype)
    new = x_a.new_empty
    return (new(bsz, la, d), new(bsz, la), new(bsz, la, d), new(bsz, lb, d), new(bsz, lb, d),
            new(bsz, la, d), new(bsz, n_heads, la, dtype=acc), new(bsz * la, dtype=acc),
            new(bsz * la, dtype=acc))


@torch.library.custom_op("gca_kernels::triton_gca_bwd", mutates_args=())
def triton_gca_bwd(
    dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, wq: Tensor, wk: Tensor, wv: Tensor,
    wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mean: Tensor, rstd: Tensor,
    n_heads: int, activation: str, ln_eps: float,
) -> List[Tensor]:
    return gca_backward(dy, dcos, x_a, x_b, wq, wk, wv, wo, bo, w1, b1, w2, b2, ln_w,
                        key_padding_mask, attn_mask, q, k, v, o, lse, mean, rstd,
                        n_heads, activation, ln_eps)


@triton_gca_bwd.register_fake
def _(dy, dcos, x_a, x_b, wq, wk, wv, wo, bo, w1, b1, w2, b2, ln_w, key_padding_mask,
      attn_mask, q, k, v, o, lse, mean, rstd, n_heads, activation, ln_eps):
    d = x_a.shape[-1]
    ln = (d,) if ln_w is not None else (0,)
    shapes = [x_a.shape, x_b.shape, wq.shape, (d,), wk.shape, (d,), wv.shape, (d,), wo.shape,
              (d,), w1.shape, b1.shape, w2.shape, b2.shape, ln, ln]
    return [x_a.new_empty(s) for s in shapes]


def _gca_setup_context(ctx, inputs, output):
    (x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
     key_padding_mask, attn_mask, n_heads, activation, ln_eps) = inputs
    y, cos, q, k, v, o, lse, mean, rstd = output
    ctx.mark_non_differentiable(q, k, v, o, lse, mean, rstd)
    ctx.save_for_backward(x_a, x_b, wq, wk, wv, wo, bo, w1, b1, w2, b2, ln_w,
                          key_padding_mask, attn_mask, q, k, v, o, lse, mean, rstd)
    ctx.n_heads, ctx.activation, ctx.ln_eps = n_heads, activation, ln_eps
    ctx.has_ln = ln_w is not None


def _gca_backward(ctx, dy, dcos, *_unused):
    saved = ctx.saved_tensors
    dy, dcos = output_grads(saved[0], dy, dcos)
    g = triton_gca_bwd(dy, dcos, *saved, ctx.n_heads, ctx.activation, ctx.ln_eps)
    dln_w, dln_b = (g[14], g[15]) if ctx.has_ln else (None, None)
    return (*g[:14], dln_w, dln_b, None, None, None, None, None)


triton_gca_fwd.register_autograd(_gca_backward, setup_context=_gca_setup_context)


# ----------------------------------------------------------------------------- backend


def gca_triton(x_a: Tensor, x_b: Tensor, p: GCAParams, key_padding_mask: Optional[Tensor],
               attn_mask: Optional[Tensor], n_heads: int, activation: str, ln_eps: float):
    """The backend's ``gca_fn``: returns (y, cos); autograd-capable and torch.compile-traceable."""
    out = triton_gca_fwd(x_a, x_b, *p[:12], p.ln_w, p.ln_b, key_padding_mask, attn_mask,
                         int(n_heads), str(activation), float(ln_eps))
    return out[0], out[1]


_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CPU_DTYPES = (torch.float32, torch.float64)


def supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    device = torch.device(device)
    if device.type == "cuda":
        return None if dtype in _GPU_DTYPES else f"dtype {dtype} is not supported (float16/bfloat16/float32/float64)"
    if device.type == "cpu":
        if not _interpreted():
            return "CPU tensors need TRITON_INTERPRET=1 (Triton's interpreter), set before triton is imported"
        if dtype not in _CPU_DTYPES:
            return f"dtype {dtype} is not supported on the CPU interpreter (float32/float64 only)"
        return None
    return f"device type {device.type!r} is not supported (CUDA GPUs, or CPU under TRITON_INTERPRET=1)"


register_backend("triton", gca_fn=gca_triton, cosine_fn=cosine_alignment_triton, supports=supports)
