"""Triton backend of the GCA operator (forward and backward) and its registration.

The plan follows the roofline (``python -m benchmarks.gpu_model``): at the recommendation
shapes every (rows, d) product is memory-bound, so what counts is how many times a (rows, d)
tensor crosses HBM. Triton runs the attention (flash, never O(La * Lb) memory), the gate's
hidden layer with its relu (and its backward with the relu mask and db1), and one row pass each
way (gate activation, Hadamard residual, LayerNorm, cosine). The other products are cuBLAS
calls through torch in the input dtype (tensor cores for half): q, k | v as one product that
reads x_b once, the output projection, the gate's output layer, and backward's products, which
accumulate into their outputs in place (``addmm_``). Small launches are merged (the weight
layouts in one, the bias reductions in one). Saved for backward: the inputs and weights, q,
k | v, o, the logsumexp, the LayerNorm mean/rstd, x', h, g_pre and the packed weights
(``Saved``): O(B * (La + Lb) * (d + gate width)) memory, never O(La * Lb).

Forward
-------
``_pack_weights_kernel``, one launch: the weight layouts the products use, in one flat buffer
kept for backward: ``[Wk ; Wv]``, ``[bk | bv]``, ``[Wo | bo | 0 x 7]`` and ``[W1a ; Wq]``.
``q = x_a Wq^T + bq``, ``[k | v] = x_b [Wk ; Wv]^T + [bk | bv]`` (torch).

``_attn_fwd_kernel``, grid (B * H, La blocks): flash attention over the visible keys. The
key-padding mask (B, Lb) and the attention mask (Bm, La, Lb), Bm in {1, B} (broadcast by a
zero batch stride), are applied in registers; an online softmax accumulates ``p v``. Writes
``o`` (B, La, d + 8) in the heads-concatenated layout followed by ``[has_key, 0 x 7]``, and the
log-sum-exp per (B, H, La) row. A query row that sees no key gets ``o = 0``, ``has_key = 0`` and
``lse = +inf`` (which makes backward's ``exp(s - lse)`` exactly 0 there, with no NaN).

``x' = o_ext [Wo | bo | 0]^T`` (torch): ``o Wo^T + has_key * bo``, so x' = 0 on keyless rows
without a masking pass, and ``[dWo^T ; dbo]`` comes out of one product in backward.

``_gate_hidden_kernel``: ``h = relu(x_a W1a^T + x' W1b^T + b1)``, W1 read as its two column
halves (``[x_a ; x']`` never exists), h written once. ``g_pre = h W2^T + b2`` (torch).

``_gate_out_fwd_kernel``, grid (row blocks of B * La): ``g = act(g_pre)``, the Hadamard
residual ``z = x_a + g * x'``, the LayerNorm (mean/rstd kept) and the per-row ``cos(x_a, x')``.

Backward
--------
``_gate_out_bwd_kernel``, row blocks: the LayerNorm backward, the gate activation's derivative
(g recomputed from g_pre) and the cosine's backward, writing ``dg_pre``, ``dz * g`` + the
cosine's part of ``dx'``, ``dz`` + its part of ``dx_a``, and per-program partial sums for
db2, dln_w and dln_b. ``_gate_hidden_kernel`` again: ``dh_pre = (dg_pre W2) * (h > 0)`` with
db1's partial sums, written into the left columns of one (rows, gate width + d) buffer whose
right columns will hold dq. torch: dW2, dW1 (its two halves written in place), ``dx' += dh_pre
W1b``, ``[dWo^T ; dbo ; 0] = o_ext^T dx'`` (a keyless row has o = 0 and has_key = 0: it adds
nothing; dbo is a contiguous row, dWo comes back transposed and autograd copies it into the
parameter's layout), ``do = dx' Wo``.

``_attn_bwd_dq_kernel``, grid (B * H, La blocks): recomputes ``p = exp(q k^T / sqrt(dh) - lse)``
and ``dp = do v^T`` over the visible keys twice: a first pass sums ``delta = sum_j p dp`` (stored
for the next kernel; equal to flash attention's ``rowsum(do * o)`` but exact where a row has a
single visible key, so ``ds`` is exactly 0 there as in eager autograd), the second accumulates
``dq`` (into the shared buffer, next to dh_pre) and dbq's partial sums.
``_attn_bwd_dkdv_kernel``, grid (B * H, Lb blocks): recomputes ``p`` the same way for its key
block over all query blocks and accumulates ``dk`` and ``dv`` (and dbk, dbv partial sums) into
one (B, Lb, 2d) buffer. torch: ``dx_a += [dh_pre | dq] [W1a ; Wq]`` (one product, one pass
over dx_a), ``dx_b = [dk | dv] [Wk ; Wv]``, dWq and ``[dWk ; dWv]``.
``_column_sums_kernel``, one launch: every bias and LayerNorm-parameter gradient from the
partial sums, which all live in one workspace.
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
reference. Every (rows, d) intermediate is stored in the input dtype, as eager autograd's are;
statistics and partial sums stay in the accumulation dtype. Scalars (LayerNorm eps, COS_EPS,
1/sqrt(dh)) travel in a cached device tensor of the accumulation dtype: a Python float argument
would be rounded to float32 by Triton, and a tensor made per call would copy from the host.
Any La, Lb >= 1, any d with n_heads | d (blocks are the next power of two >= 16 of d, dh and
the gate width, masked), any gate width. Offsets of batch and row strides are 64-bit; B * H goes
on the grid's first axis (2^31 - 1 programs) and sequence blocks on the second (65535 blocks).
Block sizes are fixed per dot kind, chosen from the sm_90 and sm_80 compile reports (no
spills, shared memory within limits, tensor-core instructions in every half kernel with dots,
d 64 to 1024, dh 16 to 128: ``python -m benchmarks.gpu_compile --check``, a CI gate); a head
size above 128 launches but is outside that report. None of it has been timed on a GPU.
"""

from __future__ import annotations

import math
import os
from typing import List, NamedTuple, Optional, Tuple

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

# Every Triton kernel the GCA launchers use (the compile gate and the GPU model patch these).
KERNELS = ("_pack_weights_kernel", "_attn_fwd_kernel", "_gate_hidden_kernel",
           "_gate_out_fwd_kernel", "_gate_out_bwd_kernel", "_attn_bwd_dq_kernel",
           "_attn_bwd_dkdv_kernel", "_column_sums_kernel")


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
    K,  # (B, Lb, .) input dtype, row stride SKV (k and v share one (B, Lb, 2D) buffer)
    V,  # (B, Lb, .) input dtype, row stride SKV
    KPM,  # (B, Lb) uint8, 1 = padding key (read only when HAS_KPM)
    AM,  # (Bm, La, Lb) uint8, 1 = blocked; batch stride stride_amb (0 when Bm == 1)
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(DH)]
    O,  # (B, La, SO) input dtype, output: o in columns [0, D), then [has_key, 0, ..., 0]
    LSE,  # (B, H, La) acc dtype, output; +inf on rows with no visible key
    La, Lb, D, DH, H, stride_amb, SKV, SO,
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
    kv_base = b * Lb * SKV + h * DH

    m_i = tl.full([BLOCK_M], float("-inf"), ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_DH], ACC)
    for n0 in range(0, Lb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lb)[:, None] & cmask[None, :]
        kv_offs = kv_base + offs_n[:, None] * SKV + offs_c[None, :]
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
    o_rows = O + b * La * SO + offs_m[:, None] * SO
    tl.store(o_rows + h * DH + offs_c[None, :], o.to(O.dtype.element_ty),
             mask=mmask[:, None] & cmask[None, :])
    if h == 0:
        # the tail [has_key, 0, ..., 0] turns the output projection's bias into has_key * bo
        offs_t = tl.arange(0, 8)
        tail = tl.where(offs_t[None, :] == 0, has.to(ACC)[:, None], 0.0)
        tl.store(o_rows + D + offs_t[None, :], tail.to(O.dtype.element_ty), mask=mmask[:, None])
    tl.store(LSE + pid_bh.to(tl.int64) * La + offs_m, lse, mask=mmask)


@triton.jit
def _attn_bwd_dq_kernel(
    Q,  # (B, La, D) input dtype
    K,  # (B, Lb, D) input dtype
    V,  # (B, Lb, D) input dtype
    DO,  # (B, La, D) input dtype, gradient of o
    LSE,  # (B, H, La) acc dtype
    KPM,  # (B, Lb) uint8
    AM,  # (Bm, La, Lb) uint8
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(DH)]
    DELTA,  # (B, H, La) acc dtype, output: sum_j p_ij dp_ij per head
    DQ,  # (B, La, .) input dtype, output, row stride SDQ (a column block of a wider buffer)
    DBQ_PART,  # (B * query blocks, D) acc dtype, output: per-program column sums of dq
    La, Lb, D, DH, H, stride_amb, SKV, SDQ,
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
    kv_base = b * Lb * SKV + h * DH

    # delta = sum_j p_ij dp_ij, equal to rowsum(do * o) in exact arithmetic; summed from the
    # same p and dp that ds uses, a row with one visible key (p = 1) gets ds = 0 exactly,
    # as eager autograd does, instead of the rounding gap between two dot products.
    delta = tl.zeros([BLOCK_M], ACC)
    for n0 in range(0, Lb, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        kv_mask = (offs_n < Lb)[:, None] & (offs_c < DH)[None, :]
        kv_offs = kv_base + offs_n[:, None] * SKV + offs_c[None, :]
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
        kv_offs = kv_base + offs_n[:, None] * SKV + offs_c[None, :]
        k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        v = tl.load(V + kv_offs, mask=kv_mask, other=0.0).to(ACC)
        s = _dot(q, tl.trans(k), None, OPD, HALF)
        vis = _visible(offs_m, offs_n, b, La, Lb, KPM, AM, stride_amb, HAS_KPM, HAS_AM)
        # lse = +inf on rows with no visible key: exp(-inf) = 0 there
        p = tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        dp = _dot(do, tl.trans(v), None, OPD, HALF)
        ds = p * (dp - delta[:, None])
        dq = _dot(ds, k, dq, OPD, HALF)
    dq = dq * scale
    # q's offsets moved to DQ's row stride
    dq_offs = q_offs + (b * La + offs_m[:, None]) * (SDQ - D)
    tl.store(DQ + dq_offs, dq.to(DQ.dtype.element_ty), mask=qmask)
    part = (b * tl.num_programs(1) + pid_m) * D + h * DH + offs_c
    tl.store(DBQ_PART + part, tl.sum(dq, axis=0), mask=offs_c < DH)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q,  # (B, La, D) input dtype
    K,  # (B, Lb, D) input dtype
    V,  # (B, Lb, D) input dtype
    DO,  # (B, La, D) input dtype
    LSE,  # (B, H, La) acc dtype
    DELTA,  # (B, H, La) acc dtype, from _attn_bwd_dq_kernel
    KPM,  # (B, Lb) uint8
    AM,  # (Bm, La, Lb) uint8
    SCAL,  # (3,) acc dtype
    DK,  # (B, Lb, .) input dtype, output, row stride SKV (dk and dv share a (B, Lb, 2D) buffer)
    DV,  # (B, Lb, .) input dtype, output, row stride SKV
    DBKV_PART,  # (B * key blocks, 2D) acc dtype, output: per-program column sums of dk | dv
    La, Lb, D, DH, H, stride_amb, SKV,
    HAS_KPM: tl.constexpr, HAS_AM: tl.constexpr, ACC: tl.constexpr,
    OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DH: tl.constexpr,
    WANT_DK: tl.constexpr, WANT_DV: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, BLOCK_DH)
    cmask = offs_c < DH
    kv_mask = (offs_n < Lb)[:, None] & cmask[None, :]
    kv_offs = b * Lb * SKV + h * DH + offs_n[:, None] * SKV + offs_c[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0).to(ACC)
    v = k  # read only for dk
    if WANT_DK:
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
        if WANT_DV:
            dv = _dot(tl.trans(p), do, dv, OPD, HALF)
        if WANT_DK:
            dp = _dot(do, tl.trans(v), None, OPD, HALF)
            ds = p * (dp - delta[:, None])
            # q already carries the 1/sqrt(dh) factor of ds/dk
            dk = _dot(tl.trans(ds), q, dk, OPD, HALF)
    part = (b * tl.num_programs(1) + pid_n) * 2 * D + h * DH + offs_c
    if WANT_DK:
        tl.store(DK + kv_offs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(DBKV_PART + part, tl.sum(dk, axis=0), mask=cmask)
    if WANT_DV:
        tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)
        tl.store(DBKV_PART + part + D, tl.sum(dv, axis=0), mask=cmask)


# ----------------------------------------------------------------------------- row passes


@triton.jit
def _gate_out_fwd_kernel(
    XA,  # (R, D) input dtype, R = B * La
    XP,  # (R, D) input dtype: x' = o Wo^T + bo, 0 on rows without a visible key
    GPRE,  # (R, D) input dtype: g_pre = relu(h_pre) W2^T + b2 (backward recomputes g from it)
    SCAL,  # (3,) acc dtype: [ln_eps, cos_eps, 1/sqrt(dh)]
    LNW,  # (D,) (read only when HAS_LN)
    LNB,  # (D,) (read only when HAS_LN)
    Y,  # (R, D) input dtype, output
    COS,  # (R,) input dtype, output: cos(x_a, x')
    MEAN,  # (R,) acc dtype, output: mean of z per row
    RSTD,  # (R,) acc dtype, output: 1/sqrt(var(z) + eps) per row
    R, D,
    ACT_TANH: tl.constexpr, HAS_LN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xa = tl.load(XA + offs, mask=m2, other=0.0).to(ACC)
    xp = tl.load(XP + offs, mask=m2, other=0.0).to(ACC)
    g = _gate_act(tl.load(GPRE + offs, mask=m2, other=0.0).to(ACC), ACT_TANH)
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
def _gate_out_bwd_kernel(
    DY,  # (R, D) any float dtype, upstream gradient of y
    DCOS,  # (R,) any float dtype, upstream gradient of cos
    XA,  # (R, D) input dtype
    XP,  # (R, D) input dtype: x' as the forward stored it
    GPRE,  # (R, D) input dtype: the gate's pre-activation g_pre
    LNW,  # (D,) (read only when HAS_LN)
    MEAN,  # (R,) acc dtype
    RSTD,  # (R,) acc dtype
    SCAL,  # (3,) acc dtype
    DXA,  # (R, D) input dtype, output: dz + the cosine's part of dx_a
    DXP,  # (R, D) input dtype, output: dz * g + the cosine's part of dx'
    DGPRE,  # (R, D) input dtype, output: gradient of g_pre
    PART,  # (n_programs, D or 3D) acc dtype, output: per-program column sums of dg_pre (for
    #        b2), then with HAS_LN of dy * zhat (ln_w) and of dy (ln_b)
    R, D,
    ACT_TANH: tl.constexpr, HAS_LN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    m2 = rmask[:, None] & cmask[None, :]
    offs = rows[:, None] * D + cols[None, :]
    xa = tl.load(XA + offs, mask=m2, other=0.0).to(ACC)
    xp = tl.load(XP + offs, mask=m2, other=0.0).to(ACC)
    g = _gate_act(tl.load(GPRE + offs, mask=m2, other=0.0).to(ACC), ACT_TANH)
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
        part = PART + pid.to(tl.int64) * 3 * D + cols
        tl.store(part + D, tl.sum(dy * zhat, axis=0), mask=cmask)
        tl.store(part + 2 * D, tl.sum(dy, axis=0), mask=cmask)
    else:
        dz = dy

    # z = x_a + g * x'
    if ACT_TANH:
        dgpre = dz * xp * (1.0 - g * g)
    else:
        dgpre = dz * xp * g * (1.0 - g)
    # cos(x_a, x') is differentiable too
    dcos = tl.load(DCOS + rows, mask=rmask, other=0.0).to(ACC)
    dxa_c, dxp_c = _row_cos_grad(xa, xp, dcos, tl.load(SCAL + 1))
    tl.store(DGPRE + offs, dgpre.to(DGPRE.dtype.element_ty), mask=m2)
    tl.store(PART + pid.to(tl.int64) * (3 * D if HAS_LN else D) + cols, tl.sum(dgpre, axis=0),
             mask=cmask)
    tl.store(DXA + offs, (dz + dxa_c).to(DXA.dtype.element_ty), mask=m2)
    tl.store(DXP + offs, (dz * g + dxp_c).to(DXP.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- gate's hidden layer


@triton.jit
def _gate_hidden_kernel(
    A1,  # (M, K) input dtype, rows contiguous
    A2,  # (M, K) input dtype (read only when TWO)
    B1,  # element [k, n] at B1 + n * stride_bn + k * stride_bk
    B2,  # same layout as B1 (read only when TWO)
    BIAS,  # (N,) (read only when HAS_BIAS)
    HMASK,  # (M, N) input dtype: the forward's h; the output is zeroed where h <= 0 (MASKED)
    C,  # (M, N) input dtype, output, row stride stride_cm (a column block of a wider buffer)
    PART,  # (M blocks, N) acc dtype, output: per-program column sums of C (MASKED)
    M, N, K, stride_bn, stride_bk, stride_cm,
    TWO: tl.constexpr, HAS_BIAS: tl.constexpr, RELU: tl.constexpr, MASKED: tl.constexpr,
    ACC: tl.constexpr, OPD: tl.constexpr, HALF: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = A1 B1 (+ A2 B2) (+ bias), then relu (forward: h = relu([x_a ; x'] W1^T + b1) with
    W1 read as its two column halves, so [x_a ; x'] never exists and h is written once), or
    masked by h > 0 with the column sums for db1 (backward: dh_pre = (dg_pre W2) * (h > 0))."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mmask = rm < M
    nmask = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        kmask = kk < K
        a = tl.load(A1 + rm[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
        b = tl.load(B1 + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
                    mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = _dot(a.to(ACC), b.to(ACC), acc, OPD, HALF)
    if TWO:
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + rk
            kmask = kk < K
            a = tl.load(A2 + rm[:, None] * K + kk[None, :], mask=mmask[:, None] & kmask[None, :], other=0.0)
            b = tl.load(B2 + rn[None, :] * stride_bn + kk[:, None] * stride_bk,
                        mask=kmask[:, None] & nmask[None, :], other=0.0)
            acc = _dot(a.to(ACC), b.to(ACC), acc, OPD, HALF)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=nmask, other=0.0).to(ACC)[None, :]
    if RELU:
        acc = tl.maximum(acc, 0.0)
    m2 = mmask[:, None] & nmask[None, :]
    if MASKED:
        h = tl.load(HMASK + rm[:, None] * N + rn[None, :], mask=m2, other=0.0).to(ACC)
        acc = tl.where(h > 0.0, acc, 0.0)
        tl.store(PART + pid_m.to(tl.int64) * N + rn, tl.sum(acc, axis=0), mask=nmask)
    tl.store(C + rm[:, None] * stride_cm + rn[None, :], acc.to(C.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- weights and sums


@triton.jit
def _pack_weights_kernel(
    WQ, WK, WV, WO,  # (D, D) input dtype, contiguous
    W1,  # (N, 2D) input dtype, contiguous
    BK, BV, BO,  # (D,) input dtype
    P,  # flat, input dtype, output: the layouts the products use, one after another:
    #     [Wk ; Wv] (2D, D) | [bk | bv] (2D,) | [Wo | bo | 0 x TAIL-1] (D, D + TAIL) | [W1a ; Wq]
    #     (N + D, D), the last three at OFF_B, OFF_O, OFF_1 (``_packed_offsets``)
    D, N, WIDTH,  # WIDTH = max(2D, D + TAIL), the widest packed row
    OFF_B, OFF_O, OFF_1,
    TAIL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """One launch instead of a concatenation per layout. Virtual rows: [0, 2D) the rows of
    [Wk ; Wv], [2D, 3D) of [Wo | bo | 0], [3D, 4D + N) of [W1a ; Wq], and 4D + N the row
    [bk | bv]. Each output element is loaded from exactly one source (masked loads)."""
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    is_k = r < D
    is_v = (r >= D) & (r < 2 * D)
    is_o = (r >= 2 * D) & (r < 3 * D)
    is_1 = (r >= 3 * D) & (r < 3 * D + N)
    is_q = (r >= 3 * D + N) & (r < 4 * D + N)
    is_b = r == 4 * D + N
    ro = r - 2 * D  # row of Wo
    r1 = r - 3 * D  # row of [W1a ; Wq]
    for c0 in range(0, WIDTH, BLOCK_C):
        c = (c0 + tl.arange(0, BLOCK_C))[None, :]
        in_d = c < D
        val = tl.load(WK + r * D + c, mask=is_k & in_d, other=0.0)
        val = tl.where(is_v, tl.load(WV + (r - D) * D + c, mask=is_v & in_d, other=0.0), val)
        val = tl.where(is_o, tl.load(WO + ro * D + c, mask=is_o & in_d, other=0.0), val)
        at_bo = is_o & (c == D)
        val = tl.where(at_bo, tl.load(BO + ro + c * 0, mask=at_bo, other=0.0), val)
        val = tl.where(is_1, tl.load(W1 + r1 * 2 * D + c, mask=is_1 & in_d, other=0.0), val)
        val = tl.where(is_q, tl.load(WQ + (r1 - N) * D + c, mask=is_q & in_d, other=0.0), val)
        val = tl.where(is_b & in_d, tl.load(BK + c + r * 0, mask=is_b & in_d, other=0.0), val)
        at_bv = is_b & (c >= D) & (c < 2 * D)
        val = tl.where(at_bv, tl.load(BV + (c - D) + r * 0, mask=at_bv, other=0.0), val)
        dst = tl.where(r < 2 * D, r * D + c,
                       tl.where(is_o, OFF_O + ro * (D + TAIL) + c,
                                tl.where(is_b, OFF_B + c, OFF_1 + r1 * D + c)))
        ok = (((r < 2 * D) | is_1 | is_q) & in_d) | (is_o & (c < D + TAIL)) | (is_b & (c < 2 * D))
        tl.store(P + dst, val, mask=ok)


@triton.jit
def _column_sums_kernel(
    WS,  # flat acc dtype: up to four row-major blocks of per-program partial sums
    OUT,  # flat input dtype, output: each block's column sums, block after block
    o0, p0, c0, o1, p1, c1, o2, p2, c2, o3, p3, c3,  # block s: at WS + o_s, P_s rows, C_s columns
    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Program (i, s) reduces column block i of block s: every bias and LayerNorm-parameter
    gradient of the backward in one launch, in a fixed order (deterministic)."""
    s = tl.program_id(1)
    off = tl.where(s == 0, o0, tl.where(s == 1, o1, tl.where(s == 2, o2, o3))).to(tl.int64)
    n_rows = tl.where(s == 0, p0, tl.where(s == 1, p1, tl.where(s == 2, p2, p3)))
    n_cols = tl.where(s == 0, c0, tl.where(s == 1, c1, tl.where(s == 2, c2, c3)))
    out_off = tl.where(s > 0, c0, 0) + tl.where(s > 1, c1, 0) + tl.where(s > 2, c2, 0)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < n_cols
    acc = tl.zeros([BLOCK_C], WS.dtype.element_ty)
    for r0 in range(0, n_rows, BLOCK_P):
        rows = (r0 + tl.arange(0, BLOCK_P)).to(tl.int64)
        m2 = (rows < n_rows)[:, None] & cmask[None, :]
        acc += tl.sum(tl.load(WS + off + rows[:, None] * n_cols + cols[None, :], mask=m2,
                              other=0.0), axis=0)
    tl.store(OUT + out_off + cols, acc.to(OUT.dtype.element_ty), mask=cmask)


# ----------------------------------------------------------------------------- launchers


# Largest sequence block under the interpreter, where big blocks are cheap (numpy) and loop
# steps are not; tests lower it to run the multi-block paths.
_INTERP_MAX_SEQ_BLOCK = 64
# (rows, columns) blocks of the weight packing and the column sums under the interpreter
_INTERP_PACK_BLOCKS = (64, 64)
_INTERP_SUM_BLOCKS = (256, 256)


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _pow2_block(n: int, lo: int = 16) -> int:
    # tl.dot needs every block dimension >= 16
    return max(lo, triton.next_power_of_2(max(n, 1)))


def _attn_blocks(la: int, lb: int, dh: int, half: bool) -> Tuple[int, int, int, int]:
    """(query block, key block, head-dim block, warps) of the attention kernels."""
    block_dh = _pow2_block(dh)
    if _interpreted():
        # the interpreter pays per program and per loop step, not per element
        cap = max(16, _INTERP_MAX_SEQ_BLOCK)
        return min(cap, _pow2_block(la)), min(cap, _pow2_block(lb)), block_dh, 4
    # the largest tiles with no spills in any of the three kernels on sm_90 and sm_80
    # (`python -m benchmarks.gpu_compile --check`, dh 16-128): tensor-core dots 64 x 32 up to
    # dh 32, 32 x 32 above; exact float32 dots run on FMA units and hold more registers,
    # 16 x 16 (and dk, dv in two launches from dh 64)
    if half:
        bm, bn, warps = (64, 32, 4) if block_dh <= 32 else (32, 32, 8)
    else:
        bm, bn, warps = 16, 16, (4 if block_dh <= 32 else 8)
    return min(bm, _pow2_block(la)), min(bn, _pow2_block(lb)), block_dh, warps


def _gemm_blocks(half: bool) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) of the gate's hidden-layer products."""
    if _interpreted():
        return 32, 32, 32, 4, 1
    # no spills on sm_90 or sm_80 (`python -m benchmarks.gpu_compile --check`)
    return (128, 64, 64, 8, 3) if half else (64, 32, 16, 4, 2)


def _gate_hidden(a1: Tensor, b1_: Tensor, a2: Optional[Tensor], b2_: Optional[Tensor],
                 bias: Optional[Tensor], hmask: Optional[Tensor], relu: bool,
                 out: Optional[Tensor] = None, part: Optional[Tensor] = None) -> Tensor:
    """The launcher of ``_gate_hidden_kernel``: b1_/b2_ are (N, K) views (any strides); writes
    C into ``out`` (rows with unit column stride, e.g. a column block of a wider buffer) or a
    new tensor, and with ``hmask`` the per-program column sums into ``part``
    (``_gate_hidden_programs(M, dtype)`` rows)."""
    m, k = a1.shape
    n = b1_.shape[0]
    dtype, dev = a1.dtype, a1.device
    bm, bn, bk, nw, ns = _gemm_blocks(dtype in _HALF)
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    c = torch.empty(m, n, dtype=dtype, device=dev) if out is None else out
    _gate_hidden_kernel[grid](
        a1, a1 if a2 is None else a2, b1_, b1_ if b2_ is None else b2_,
        c if bias is None else bias, c if hmask is None else hmask, c,
        c if part is None else part, m, n, k, b1_.stride(0), b1_.stride(1), c.stride(0),
        TWO=a2 is not None, HAS_BIAS=bias is not None, RELU=relu, MASKED=hmask is not None,
        ACC=tl_acc(dtype), **_dot_operands(dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        num_warps=nw, num_stages=ns)
    return c


def _gate_hidden_programs(m: int, dtype: torch.dtype) -> int:
    return triton.cdiv(m, _gemm_blocks(dtype in _HALF)[0])


def _row_blocks(d: int) -> Tuple[int, int, int]:
    """(rows per program, d's block, warps) of the row passes: about 4K elements a tile."""
    block_d = triton.next_power_of_2(max(d, 1))
    block_r = max(1, min(16, 4096 // block_d))
    if _interpreted():
        return block_r, block_d, 4
    return block_r, block_d, 8 if block_d >= 256 else 4


_HALF = (torch.float16, torch.bfloat16)


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


# Columns after o's d in the saved o buffer: [has_key, 0 x 7] (16-byte rows in every dtype).
_O_TAIL = 8


class Saved(NamedTuple):
    """What the forward keeps for backward, besides the inputs and weights."""

    q: Tensor  # (B, La, d)
    kv: Tensor  # (B, Lb, 2d): k | v
    o: Tensor  # (B, La, d + 8): attention output | has_key, 0 x 7
    lse: Tensor  # (B, H, La) acc dtype; +inf on rows with no visible key
    mean: Tensor  # (B * La,) acc dtype, LayerNorm statistics
    rstd: Tensor  # (B * La,) acc dtype
    xp: Tensor  # (B * La, d): x'
    h: Tensor  # (B * La, gate width): relu(h_pre)
    gpre: Tensor  # (B * La, d): the gate's pre-activation
    packed: Tensor  # flat: the weights' packed layouts (``_unpack``)


def _packed_offsets(d: int, n: int) -> Tuple[int, int, int, int]:
    """Where [bk | bv], [Wo | bo | 0 x 7] and [W1a ; Wq] start in the packed buffer ([Wk ; Wv]
    starts at 0), and its length: the one definition of the layout."""
    o_b = 2 * d * d
    o_o = o_b + 2 * d
    o_1 = o_o + d * (d + _O_TAIL)
    return o_b, o_o, o_1, o_1 + (n + d) * d


def _packed_numel(d: int, n: int) -> int:
    return _packed_offsets(d, n)[3]


def _unpack(packed: Tensor, d: int, n: int) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Views of ``_pack_weights``'s buffer: [Wk ; Wv] (2d, d), [bk | bv] (2d,),
    [Wo | bo | 0 x 7] (d, d + 8) and [W1a ; Wq] (n + d, d)."""
    o_b, o_o, o_1, _ = _packed_offsets(d, n)
    return (packed[:o_b].view(2 * d, d), packed[o_b:o_o], packed[o_o:o_1].view(d, d + _O_TAIL),
            packed[o_1:].view(n + d, d))


def _pack_weights(wq: Tensor, wk: Tensor, wv: Tensor, wo: Tensor, w1: Tensor, bk: Tensor,
                  bv: Tensor, bo: Tensor) -> Tensor:
    """One launch for the layouts the products want: k | v as one product ([Wk ; Wv], [bk | bv]);
    ``x' = o_ext [Wo | bo | 0]^T``, which is ``o Wo^T + has_key * bo`` (x' = 0 on keyless rows
    without a masking pass, and dbo comes out of dWo's product); and backward's
    ``dx_a += [dh_pre | dq] [W1a ; Wq]`` as one product."""
    d, n = wq.shape[0], w1.shape[0]
    o_b, o_o, o_1, numel = _packed_offsets(d, n)
    packed = torch.empty(numel, dtype=wq.dtype, device=wq.device)
    n_rows = 4 * d + n + 1
    block_r, block_c = _INTERP_PACK_BLOCKS if _interpreted() else (8, 128)
    _pack_weights_kernel[(triton.cdiv(n_rows, block_r),)](
        wq.contiguous(), wk.contiguous(), wv.contiguous(), wo.contiguous(), w1.contiguous(),
        bk.contiguous(), bv.contiguous(), bo.contiguous(), packed, d, n,
        max(2 * d, d + _O_TAIL), o_b, o_o, o_1, TAIL=_O_TAIL, BLOCK_R=block_r, BLOCK_C=block_c,
        num_warps=4)
    return packed


def _column_sums(ws: Tensor, blocks: List[Tuple[int, int]], dtype: torch.dtype) -> Tensor:
    """The column sums of up to four row-major (P, C) blocks lying one after another in ``ws``,
    concatenated, in ``dtype``: one launch."""
    assert len(blocks) <= 4
    args, off = [], 0
    for p, c in blocks + [(0, 0)] * (4 - len(blocks)):
        args += [off, p, c]
        off += p * c
    out = torch.empty(sum(c for _, c in blocks), dtype=dtype, device=ws.device)
    block_p, block_c = _INTERP_SUM_BLOCKS if _interpreted() else (64, 32)
    max_c = max(c for _, c in blocks)
    _column_sums_kernel[(triton.cdiv(max_c, block_c), 4)](
        ws, out, *args, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4)
    return out


def gca_forward(
    x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
    bv: Tensor, wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], n_heads: int, activation: str, ln_eps: float,
) -> Tuple[Tensor, Tensor, Saved]:
    """Returns (y, cos, saved)."""
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    dh = d // n_heads
    rows = bsz * la
    acc = acc_dtype(x_a.dtype)
    dev = x_a.device
    xa2 = x_a.contiguous().view(rows, d)
    packed = _pack_weights(wq, wk, wv, wo, w1, bk, bv, bo)
    wkv, bkv, wo_ext, _ = _unpack(packed, d, w1.shape[0])
    # q, and k | v from one product that reads x_b once
    q = torch.addmm(bq, xa2, wq.t()).view(bsz, la, d)
    kv = torch.addmm(bkv, x_b.contiguous().view(bsz * lb, d), wkv.t()).view(bsz, lb, 2 * d)
    scal = _scalars(ln_eps, dh, acc, dev)
    kpm, am, stride_amb = _mask_args(key_padding_mask, attn_mask, q)

    o = torch.empty(bsz, la, d + _O_TAIL, dtype=x_a.dtype, device=dev)
    lse = torch.empty(bsz, n_heads, la, dtype=acc, device=dev)
    bm, bn, bdh, nw = _attn_blocks(la, lb, dh, x_a.dtype in _HALF)
    _attn_fwd_kernel[(bsz * n_heads, triton.cdiv(la, bm))](
        q, kv, kv[..., d:], kpm, am, scal, o, lse, la, lb, d, dh, n_heads, stride_amb, 2 * d,
        d + _O_TAIL, HAS_KPM=key_padding_mask is not None, HAS_AM=attn_mask is not None,
        ACC=tl_acc(x_a.dtype), **_dot_operands(x_a.dtype), BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_DH=bdh, num_warps=nw)

    # output projection and gate: cuBLAS products in the input dtype (tensor cores for half)
    xp = o.view(rows, d + _O_TAIL) @ wo_ext.t()
    h = _gate_hidden(xa2, w1[:, :d], xp, w1[:, d:], b1, None, relu=True)
    gpre = torch.addmm(b2, h, w2.t())

    y = torch.empty(bsz, la, d, dtype=x_a.dtype, device=dev)  # x_a may be strided
    cos = torch.empty(bsz, la, dtype=x_a.dtype, device=dev)
    mean = torch.empty(rows, dtype=acc, device=dev)
    rstd = torch.empty(rows, dtype=acc, device=dev)
    br, bd, nw = _row_blocks(d)
    has_ln = ln_w is not None
    _gate_out_fwd_kernel[(triton.cdiv(rows, br),)](
        xa2, xp, gpre, scal, ln_w.contiguous() if has_ln else scal,
        ln_b.contiguous() if has_ln else scal, y, cos, mean, rstd, rows, d,
        ACT_TANH=activation == "tanh", HAS_LN=has_ln, ACC=tl_acc(x_a.dtype),
        BLOCK_R=br, BLOCK_D=bd, num_warps=nw)
    return y, cos, Saved(q, kv, o, lse, mean, rstd, xp, h, gpre, packed)


def gca_backward(
    dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, wo: Tensor, w1: Tensor, w2: Tensor,
    ln_w: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    saved: Saved, n_heads: int, activation: str, ln_eps: float,
) -> List[Tensor]:
    """Gradients in the layouts that cost no copy: [dx_a, dx_b, dWq, [dWk ; dWv],
    [dWo^T ; dbo ; 0] (d + 8, d), dW1, dW2, the bias and LayerNorm-parameter gradients as one
    flat buffer]; ``split_grads`` makes the per-parameter views. Every (rows, d) intermediate is
    in the input dtype and every product runs in it (cuBLAS; tensor cores for half, with float32
    accumulation, as eager autograd does); bias and LayerNorm-parameter gradients are
    per-program partial sums in the accumulation dtype, reduced in one launch."""
    q, kv, o, lse, mean, rstd, xp, h, gpre, packed = saved
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    n = w1.shape[0]
    dh = d // n_heads
    rows = bsz * la
    dtype, dev = x_a.dtype, x_a.device
    acc = acc_dtype(dtype)
    wkv, _, _, w1q = _unpack(packed, d, n)
    xa2 = x_a.contiguous().view(rows, d)
    xb2 = x_b.contiguous().view(bsz * lb, d)
    dy = dy.contiguous()
    dcos = dcos.contiguous()
    scal = _scalars(ln_eps, dh, acc, dev)
    has_ln = ln_w is not None

    # every per-program partial sum in one workspace: db1 | dbq | dbk, dbv | db2 (, dln_w, dln_b)
    br, bd, nw = _row_blocks(d)
    n_prog = triton.cdiv(rows, br)
    bm, bn, bdh, nw_attn = _attn_blocks(la, lb, dh, dtype in _HALF)
    n_m, n_n = triton.cdiv(la, bm), triton.cdiv(lb, bn)
    blocks = [(_gate_hidden_programs(rows, dtype), n), (bsz * n_m, d), (bsz * n_n, 2 * d),
              (n_prog, 3 * d if has_ln else d)]
    ws = torch.empty(sum(p * c for p, c in blocks), dtype=acc, device=dev)
    part_b1, part_bq, part_bkv, part_row = torch.split(ws, [p * c for p, c in blocks])

    dxa = torch.empty(rows, d, dtype=dtype, device=dev)
    dxp = torch.empty(rows, d, dtype=dtype, device=dev)
    dgpre = torch.empty(rows, d, dtype=dtype, device=dev)
    _gate_out_bwd_kernel[(n_prog,)](
        dy, dcos, xa2, xp, gpre, ln_w.contiguous() if has_ln else scal, mean, rstd, scal,
        dxa, dxp, dgpre, part_row, rows, d,
        ACT_TANH=activation == "tanh", HAS_LN=has_ln, ACC=tl_acc(dtype),
        BLOCK_R=br, BLOCK_D=bd, num_warps=nw)

    # [dh_pre | dq] side by side, so that dx_a += [dh_pre | dq] [W1a ; Wq] is one product
    hq = torch.empty(rows, n + d, dtype=dtype, device=dev)
    dhp, dq2 = hq[:, :n], hq[:, n:]
    # the gate's layers backward (h is stored post-relu)
    dw2 = dgpre.t() @ h
    _gate_hidden(dgpre, w2.t(), None, None, None, h, relu=False, out=dhp, part=part_b1)
    dw1 = torch.empty(n, 2 * d, dtype=dtype, device=dev)
    dw1[:, :d].addmm_(dhp.t(), xa2, beta=0)  # written in place: no concatenation
    dw1[:, d:].addmm_(dhp.t(), xp, beta=0)
    dxp.addmm_(dhp, w1[:, d:])
    # the output projection: x' = o_ext [Wo | bo | 0]^T, so o_ext^T dx' = [dWo^T ; dbo ; 0]; a
    # row that saw no key has o = 0 and has_key = 0, so it adds nothing to dWo or dbo
    dwo_t = o.view(rows, d + _O_TAIL).t() @ dxp
    do = dxp @ wo

    kpm, am, stride_amb = _mask_args(key_padding_mask, attn_mask, q)
    delta = torch.empty(bsz, n_heads, la, dtype=acc, device=dev)
    dkv = torch.empty(bsz, lb, 2 * d, dtype=dtype, device=dev)
    common = dict(HAS_KPM=key_padding_mask is not None, HAS_AM=attn_mask is not None,
                  ACC=tl_acc(dtype), **_dot_operands(dtype), BLOCK_M=bm, BLOCK_N=bn,
                  BLOCK_DH=bdh, num_warps=nw_attn)
    k, v = kv, kv[..., d:]
    _attn_bwd_dq_kernel[(bsz * n_heads, n_m)](
        q, k, v, do, lse, kpm, am, scal, delta, dq2, part_bq, la, lb, d, dh, n_heads,
        stride_amb, 2 * d, n + d, **common)
    # exact (ieee) dots run on FMA units, where dk and dv together spill from dh 64 (sm_90
    # compile report): there they are two launches, each recomputing p
    split = dtype not in _HALF and bdh >= 64
    for want_dk, want_dv in (((True, False), (False, True)) if split else ((True, True),)):
        _attn_bwd_dkdv_kernel[(bsz * n_heads, n_n)](
            q, k, v, do, lse, delta, kpm, am, scal, dkv, dkv[..., d:], part_bkv, la, lb, d,
            dh, n_heads, stride_amb, 2 * d, **common, WANT_DK=want_dk, WANT_DV=want_dv)

    # the input projections: dx_a accumulates in place, k | v go back as one product
    dx_a = dxa.addmm_(hq, w1q)
    dkv2 = dkv.view(bsz * lb, 2 * d)
    return [dx_a.view(bsz, la, d), (dkv2 @ wkv).view(bsz, lb, d), dq2.t() @ xa2,
            dkv2.t() @ xb2, dwo_t, dw1, dw2, _column_sums(ws, blocks, dtype)]


def split_grads(g: List[Tensor], d: int, n: int, has_ln: bool) -> List[Optional[Tensor]]:
    """``gca_backward``'s buffers as the 16 gradients [dx_a, dx_b, dwq, dbq, dwk, dbk, dwv,
    dbv, dwo, dbo, dw1, db1, dw2, db2, dln_w, dln_b] (views; the last two None without
    LayerNorm). Only dwo is not contiguous: autograd copies it into the parameter's layout."""
    dx_a, dx_b, dwq, dwkv, dwo_t, dw1, dw2, bias = g
    db1, dbq, dbk, dbv, db2, rest = torch.split(bias, [n, d, d, d, d, bias.numel() - n - 4 * d])
    dln_w, dln_b = (rest[:d], rest[d:]) if has_ln else (None, None)
    return [dx_a, dx_b, dwq, dbq, dwkv[:d], dbk, dwkv[d:], dbv, dwo_t[:d].t(), dwo_t[d], dw1,
            db1, dw2, db2, dln_w, dln_b]


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gca_kernels::triton_gca_fwd", mutates_args=())
def triton_gca_fwd(
    x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor, wv: Tensor,
    bv: Tensor, wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
    ln_w: Optional[Tensor], ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], n_heads: int, activation: str, ln_eps: float,
) -> List[Tensor]:
    """[y, cos, *Saved]."""
    y, cos, saved = gca_forward(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w,
                                ln_b, key_padding_mask, attn_mask, n_heads, activation, ln_eps)
    return [y, cos, *saved]


@triton_gca_fwd.register_fake
def _(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
      key_padding_mask, attn_mask, n_heads, activation, ln_eps):
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    acc = acc_dtype(x_a.dtype)
    new = x_a.new_empty
    rows = bsz * la
    n = w1.shape[0]
    saved = Saved(new(bsz, la, d), new(bsz, lb, 2 * d), new(bsz, la, d + _O_TAIL),
                  new(bsz, n_heads, la, dtype=acc), new(rows, dtype=acc), new(rows, dtype=acc),
                  new(rows, d), new(rows, n), new(rows, d), new(_packed_numel(d, n)))
    return [new(bsz, la, d), new(bsz, la), *saved]


@torch.library.custom_op("gca_kernels::triton_gca_bwd", mutates_args=())
def triton_gca_bwd(
    dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, wo: Tensor, w1: Tensor, w2: Tensor,
    ln_w: Optional[Tensor], key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
    saved: List[Tensor], n_heads: int, activation: str, ln_eps: float,
) -> List[Tensor]:
    return gca_backward(dy, dcos, x_a, x_b, wo, w1, w2, ln_w, key_padding_mask, attn_mask,
                        Saved(*saved), n_heads, activation, ln_eps)


@triton_gca_bwd.register_fake
def _(dy, dcos, x_a, x_b, wo, w1, w2, ln_w, key_padding_mask, attn_mask, saved, n_heads,
      activation, ln_eps):
    d, n = x_a.shape[-1], w1.shape[0]
    n_bias = n + 3 * d + (3 * d if ln_w is not None else d)
    shapes = [x_a.shape, x_b.shape, (d, d), (2 * d, d), (d + _O_TAIL, d), w1.shape, w2.shape,
              (n_bias,)]
    return [x_a.new_empty(s) for s in shapes]


def _gca_setup_context(ctx, inputs, output):
    (x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
     key_padding_mask, attn_mask, n_heads, activation, ln_eps) = inputs
    saved = output[2:]
    ctx.mark_non_differentiable(*saved)
    ctx.save_for_backward(x_a, x_b, wo, w1, w2, ln_w, key_padding_mask, attn_mask, *saved)
    ctx.n_heads, ctx.activation, ctx.ln_eps = n_heads, activation, ln_eps
    ctx.has_ln = ln_w is not None


def _gca_backward(ctx, grads):
    x_a, x_b, wo, w1, w2, ln_w, kpm, am, *saved = ctx.saved_tensors
    dy, dcos = output_grads(x_a, grads[0], grads[1])
    g = triton_gca_bwd(dy, dcos, x_a, x_b, wo, w1, w2, ln_w, kpm, am, saved, ctx.n_heads,
                       ctx.activation, ctx.ln_eps)
    return (*split_grads(g, x_a.shape[-1], w1.shape[0], ctx.has_ln), None, None, None, None,
            None)


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
