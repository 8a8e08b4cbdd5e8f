"""Triton cosine-alignment reduction: ``mean over valid rows of |cos(x_i, y_i)|``.

Kernels
-------
``_cos_align_fwd_kernel``: one program per block of rows. Each row's dot product and both
squared norms are reduced in registers, the cosine (with the contract's denominator floor
``max(|x| |y|, COS_EPS)``) is taken, its absolute value when asked, masked, and the block's
sum written as one partial. The per-row cosines never reach global memory; the partials
(one per program) are summed in torch, so the reduction order is fixed (deterministic, no
atomics).

``_cos_align_bwd_kernel``: one program per block of rows. Recomputes the row's dot product
and norms (nothing but the inputs is saved) and writes ``dx``, ``dy`` for the upstream
gradient ``g / n_valid * mask * sign(cos)``.

The row-cosine maths lives in two ``@triton.jit`` helpers (``_row_cos``, ``_row_cos_grad``)
that the GCA kernels (``triton_gca.py``) reuse for their per-row cosine by-product.

Numerics and limits: loads are upcast once to the accumulation dtype (float32 for
float16/bfloat16/float32, float64 for float64) and results cast back once; the return has the
input dtype. Any ``d >= 1`` (the row block is the next power of two of d, masked), any
number of rows (64-bit row offsets). ``COS_EPS`` is passed through a one-element tensor of the
accumulation dtype, not as a Python float, because Triton would round a scalar argument to
float32 and break float64 agreement.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from gca_kernels.reference import COS_EPS


# ----------------------------------------------------------------------------- helpers


@triton.jit
def _row_cos(a, b, cos_eps):
    """Per-row cosine of two (R, D) blocks (zero outside the valid columns)."""
    dot = tl.sum(a * b, axis=1)
    den = tl.sqrt(tl.sum(a * a, axis=1)) * tl.sqrt(tl.sum(b * b, axis=1))
    return dot / tl.maximum(den, cos_eps)


@triton.jit
def _row_cos_grad(a, b, dc, cos_eps):
    """Gradients of ``cos(a_i, b_i)`` scaled by ``dc`` (R,): returns (da, db), each (R, D).

    Where ``|a| |b| >= eps``: d cos / d a = b / (|a||b|) - cos * a / |a|^2 (and symmetric);
    below the floor the denominator is the constant eps, so d cos / d a = b / eps.
    """
    dot = tl.sum(a * b, axis=1)
    na2 = tl.sum(a * a, axis=1)
    nb2 = tl.sum(b * b, axis=1)
    den = tl.sqrt(na2) * tl.sqrt(nb2)
    live = den >= cos_eps
    inv = 1.0 / tl.maximum(den, cos_eps)
    c = dot * inv
    # the guarded divisions keep rows with a zero vector finite (their coefficient is 0)
    ka = tl.where(live, c / tl.where(live, na2, 1.0), 0.0)
    kb = tl.where(live, c / tl.where(live, nb2, 1.0), 0.0)
    da = dc[:, None] * (b * inv[:, None] - ka[:, None] * a)
    db = dc[:, None] * (a * inv[:, None] - kb[:, None] * b)
    return da, db


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _cos_align_fwd_kernel(
    X,  # (R, D) input dtype, rows contiguous (stride D)
    Y,  # (R, D) input dtype
    MASK,  # (R,) uint8, 1 = valid row (read only when HAS_MASK)
    SCAL,  # (1,) acc dtype: [COS_EPS]
    PARTIAL,  # (n_programs,) acc dtype: per-program sum of (|)cos(|) over valid rows
    R, D,
    HAS_MASK: tl.constexpr, ABSOLUTE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    m2 = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m2, other=0.0).to(ACC)
    y = tl.load(Y + offs, mask=m2, other=0.0).to(ACC)
    c = _row_cos(x, y, tl.load(SCAL))
    if ABSOLUTE:
        c = tl.abs(c)
    valid = rmask
    if HAS_MASK:
        valid = valid & (tl.load(MASK + rows, mask=rmask, other=0) != 0)
    tl.store(PARTIAL + pid, tl.sum(tl.where(valid, c, 0.0), axis=0))


@triton.jit
def _cos_align_bwd_kernel(
    X,  # (R, D) input dtype
    Y,  # (R, D) input dtype
    MASK,  # (R,) uint8, 1 = valid row (read only when HAS_MASK)
    SCAL,  # (2,) acc dtype: [COS_EPS, upstream grad / n_valid]
    DX,  # (R, D) input dtype, output
    DY,  # (R, D) input dtype, output
    R, D,
    HAS_MASK: tl.constexpr, ABSOLUTE: tl.constexpr, ACC: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid.to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    rmask = rows < R
    m2 = rmask[:, None] & (cols[None, :] < D)
    offs = rows[:, None] * D + cols[None, :]
    x = tl.load(X + offs, mask=m2, other=0.0).to(ACC)
    y = tl.load(Y + offs, mask=m2, other=0.0).to(ACC)
    cos_eps = tl.load(SCAL)
    w = tl.load(SCAL + 1)
    dc = tl.where(rmask, w, 0.0)
    if HAS_MASK:
        dc = tl.where(tl.load(MASK + rows, mask=rmask, other=0) != 0, dc, 0.0)
    if ABSOLUTE:
        # d|c|/dc = sign(c), 0 at c == 0 (torch's convention for abs)
        c = _row_cos(x, y, cos_eps)
        dc = tl.where(c > 0, dc, tl.where(c < 0, -dc, 0.0))
    dx, dy = _row_cos_grad(x, y, dc, cos_eps)
    tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=m2)
    tl.store(DY + offs, dy.to(DY.dtype.element_ty), mask=m2)


# ----------------------------------------------------------------------------- launchers


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def tl_acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


_CONSTANTS: Dict[tuple, Tensor] = {}


def device_constants(values: Tuple[float, ...], dtype: torch.dtype, device) -> Tensor:
    """A small tensor of constants on ``device``, made once and reused: creating it per call
    would copy from the host on every launch (a synchronisation, and no CUDA-graph capture)."""
    key = (values, dtype, str(device))
    t = _CONSTANTS.get(key)
    if t is None:
        if len(_CONSTANTS) > 256:  # many ln_eps / head sizes: start over rather than grow
            _CONSTANTS.clear()
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t


def _row_blocks(d: int) -> Tuple[int, int, int]:
    block_d = triton.next_power_of_2(max(d, 1))
    # keep a program's tile near 4K elements so wide rows do not spill registers
    block_r = max(1, min(64, 4096 // block_d))
    num_warps = 4 if block_d <= 512 else 8
    return block_r, block_d, num_warps


def _flat(x: Tensor, y: Tensor, mask: Optional[Tensor]):
    d = x.shape[-1]
    x2 = x.reshape(-1, d).contiguous()
    y2 = y.reshape(-1, d).contiguous()
    m = None if mask is None else mask.reshape(-1).contiguous().view(torch.uint8)
    return x2, y2, m


def _n_valid(rows: int, mask: Optional[Tensor], dtype: torch.dtype, device) -> Tensor:
    """Number of valid rows, at least 1 (no valid row gives a mean of 0, not NaN)."""
    if mask is None:
        return torch.full((), float(max(rows, 1)), dtype=dtype, device=device)
    return mask.sum().to(dtype).clamp_min(1.0)


def cosine_alignment_forward(x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool) -> Tensor:
    """Mean over valid rows of |cos(x_i, y_i)| (or cos); 0-dim tensor of x's dtype."""
    x2, y2, m = _flat(x, y, mask)
    rows, d = x2.shape
    acc = acc_dtype(x.dtype)
    if rows == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    block_r, block_d, num_warps = _row_blocks(d)
    grid = triton.cdiv(rows, block_r)
    partial = torch.empty(grid, dtype=acc, device=x.device)
    scal = device_constants((COS_EPS,), acc, x.device)
    _cos_align_fwd_kernel[(grid,)](
        x2, y2, x2 if m is None else m, scal, partial, rows, d,
        HAS_MASK=m is not None, ABSOLUTE=bool(absolute), ACC=tl_acc(x.dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return (partial.sum() / _n_valid(rows, mask, acc, x.device)).to(x.dtype)


def cosine_alignment_backward(
    grad: Tensor, x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool
) -> Tuple[Tensor, Tensor]:
    x2, y2, m = _flat(x, y, mask)
    rows, d = x2.shape
    dx = torch.empty_like(x2)
    dy = torch.empty_like(y2)
    if rows == 0:
        return dx.view(x.shape), dy.view(y.shape)
    acc = acc_dtype(x.dtype)
    w = grad.to(acc).reshape(()) / _n_valid(rows, mask, acc, x.device)
    scal = torch.cat([device_constants((COS_EPS,), acc, x.device), w.reshape(1)])
    block_r, block_d, num_warps = _row_blocks(d)
    # the backward holds four row tiles (x, y, dx, dy), not two: with 4 warps, 64 x 64 and
    # 32 x 128 tiles spilled (sm_90 compile report); 8 warps hold them in registers
    num_warps = max(num_warps, 8)
    _cos_align_bwd_kernel[(triton.cdiv(rows, block_r),)](
        x2, y2, x2 if m is None else m, scal, dx, dy, rows, d,
        HAS_MASK=m is not None, ABSOLUTE=bool(absolute), ACC=tl_acc(x.dtype),
        BLOCK_R=block_r, BLOCK_D=block_d, num_warps=num_warps)
    return dx.view(x.shape), dy.view(y.shape)


# ----------------------------------------------------------------------------- custom ops


@torch.library.custom_op("gca_kernels::triton_cos_fwd", mutates_args=())
def triton_cos_fwd(x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool) -> Tensor:
    return cosine_alignment_forward(x, y, mask, absolute)


@triton_cos_fwd.register_fake
def _(x, y, mask, absolute):
    return x.new_empty(())


@torch.library.custom_op("gca_kernels::triton_cos_bwd", mutates_args=())
def triton_cos_bwd(
    grad: Tensor, x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool
) -> Tuple[Tensor, Tensor]:
    return cosine_alignment_backward(grad, x, y, mask, absolute)


@triton_cos_bwd.register_fake
def _(grad, x, y, mask, absolute):
    return torch.empty_like(x), torch.empty_like(y)


def _cos_setup_context(ctx, inputs, output):
    x, y, mask, absolute = inputs
    ctx.save_for_backward(x, y, mask)
    ctx.absolute = absolute


def _cos_backward(ctx, grad):
    x, y, mask = ctx.saved_tensors
    dx, dy = triton_cos_bwd(grad, x, y, mask, ctx.absolute)
    return dx, dy, None, None


triton_cos_fwd.register_autograd(_cos_backward, setup_context=_cos_setup_context)


def cosine_alignment_triton(x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool) -> Tensor:
    """The backend's ``cosine_fn``: autograd-capable, traceable by torch.compile."""
    return triton_cos_fwd(x, y, mask, bool(absolute))
