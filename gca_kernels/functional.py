"""Functional forms of the two operators: argument checks, then dispatch to a backend.

All validation happens here, before any kernel launches, so every backend receives tensors
of consistent shapes, one device and one floating dtype, and masks in a single layout
(``key_padding_mask`` (B, Lb) bool, ``attn_mask`` (Bm, La, Lb) bool with Bm in {1, B}).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple

import torch
from torch import Tensor

from gca_kernels.backends import GCAParams, resolve

ACTIVATIONS = ("sigmoid", "tanh")
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _shape(t: Optional[Tensor]) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _check_float(name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating tensor (float16/bfloat16/float32/float64), got {t.dtype}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x_a has dtype {dtype}; cast them to one dtype")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but x_a is on {device}; move them to one device")


def _check_shape(name: str, t: Tensor, expected: Tuple[int, ...]) -> None:
    if tuple(t.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {tuple(t.shape)}")


def _check_mask(name: str, m: Optional[Tensor], device: torch.device) -> None:
    if m is None:
        return
    if not isinstance(m, Tensor):
        raise TypeError(f"{name} must be a bool torch.Tensor or None, got {type(m).__name__}")
    if m.dtype != torch.bool:
        raise TypeError(f"{name} must be a bool tensor (True = blocked), got dtype {m.dtype}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but x_a is on {device}")


def check_gca_inputs(
    x_a: Tensor, x_b: Tensor, p: GCAParams, key_padding_mask: Optional[Tensor],
    attn_mask: Optional[Tensor], n_heads: int, activation: str,
) -> Optional[Tensor]:
    """Validate every argument; returns attn_mask normalised to (Bm, La, Lb) or None."""
    if not isinstance(x_a, Tensor) or not isinstance(x_b, Tensor):
        raise TypeError("x_a and x_b must be torch.Tensors")
    dtype, device = x_a.dtype, x_a.device
    _check_float("x_a", x_a, dtype, device)
    _check_float("x_b", x_b, dtype, device)
    if x_a.dim() != 3:
        raise ValueError(f"x_a must be (B, La, d), got shape {_shape(x_a)}")
    if x_b.dim() != 3:
        raise ValueError(f"x_b must be (B, Lb, d), got shape {_shape(x_b)}")
    bsz, la, d = x_a.shape
    lb = x_b.shape[1]
    if x_b.shape[0] != bsz:
        raise ValueError(f"x_a and x_b must have the same batch size, got x_a {_shape(x_a)} and x_b {_shape(x_b)}")
    if x_b.shape[2] != d:
        raise ValueError(f"x_a and x_b must have the same feature size d, got x_a {_shape(x_a)} and x_b {_shape(x_b)}")
    if d == 0:
        raise ValueError(f"x_a {_shape(x_a)} and x_b {_shape(x_b)} must have d >= 1")
    if not isinstance(n_heads, int) or n_heads < 1:
        raise ValueError(f"n_heads must be a positive int, got {n_heads!r}")
    if d % n_heads != 0:
        raise ValueError(f"n_heads={n_heads} must divide d={d} (x_a {_shape(x_a)})")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")

    hidden = p.w1.shape[0] if isinstance(p.w1, Tensor) and p.w1.dim() == 2 else None
    expected = {
        "wq": (d, d), "bq": (d,), "wk": (d, d), "bk": (d,), "wv": (d, d), "bv": (d,),
        "wo": (d, d), "bo": (d,), "w1": (hidden, 2 * d), "b1": (hidden,),
        "w2": (d, hidden), "b2": (d,),
    }
    if hidden is None:
        raise ValueError(f"w1 (gate_fc1.weight) must be 2-D (gate_hidden, 2d={2 * d}), got {_shape(p.w1)}")
    for name, shape in expected.items():
        t = getattr(p, name)
        _check_float(name, t, dtype, device)
        _check_shape(name, t, shape)
    if (p.ln_w is None) != (p.ln_b is None):
        raise ValueError("ln_w and ln_b must both be given (LayerNorm on) or both be None (off)")
    if p.ln_w is not None:
        for name in ("ln_w", "ln_b"):
            _check_float(name, getattr(p, name), dtype, device)
            _check_shape(name, getattr(p, name), (d,))

    _check_mask("key_padding_mask", key_padding_mask, device)
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (bsz, lb):
        raise ValueError(f"key_padding_mask must have shape (B, Lb) = {(bsz, lb)}, got {_shape(key_padding_mask)}")
    _check_mask("attn_mask", attn_mask, device)
    if attn_mask is not None:
        if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (la, lb):
            attn_mask = attn_mask[None]
        elif not (attn_mask.dim() == 3 and tuple(attn_mask.shape) in ((bsz, la, lb), (1, la, lb))):
            raise ValueError(
                f"attn_mask must have shape (La, Lb) = {(la, lb)} or (B, La, Lb) = {(bsz, la, lb)}, "
                f"got {_shape(attn_mask)}")
        attn_mask = attn_mask.contiguous()
    return attn_mask


def gated_cross_attention(
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
    need_alignment: bool = False,
    backend: str = "auto",
):
    """Gated cross-attention: ``y = LN(x_a + act(FFN([x_a ; x'])) * x')`` with x' = MHA(x_a, x_b).

    Weights follow ``nn.Linear``'s (out, in) layout; ``w1`` is (gate_hidden, 2d), its first d
    columns act on ``x_a`` and the last d on ``x'``. Returns ``y`` (B, La, d), or ``(y, cos)``
    with the per-row cos(x_a, x') (B, La) when ``need_alignment``.
    """
    p = GCAParams(wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b)
    low = _autocast_dtype(x_a, x_b, *p)
    impl = None
    if low is not None:
        # autocast: every float16/bfloat16/float32 operand goes to the dtype the backend computes
        # in (the autocast dtype, or float32 for cpp), differentiably, as torch's own ops do
        impl = resolve(backend, x_a.device, low, autocast_dtype=low)
        compute = impl.compute_dtype(low)
        x_a, x_b = _cast(x_a, compute), _cast(x_b, compute)
        p = GCAParams(*(None if t is None else _cast(t, compute) for t in p))
    attn_mask = check_gca_inputs(x_a, x_b, p, key_padding_mask, attn_mask, n_heads, activation)
    if x_a.numel() == 0 or x_b.shape[1] == 0:
        # an empty batch or sequence: the reference gives the empty (or, with no keys, the
        # x' = 0) result and keeps the parameters in the graph, like torch's own layers
        impl = resolve("eager", x_a.device, x_a.dtype)
    elif impl is None:
        impl = resolve(backend, x_a.device, x_a.dtype)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.contiguous()
    with _autocast_off(x_a, low):  # under autocast the dtype is chosen above: keep it
        y, cos = impl.gca_fn(x_a, x_b, p, key_padding_mask, attn_mask, n_heads, activation,
                             float(ln_eps))
    if low is not None:
        y, cos = y.to(low), cos.to(low)
    return (y, cos) if need_alignment else y


def _autocast_dtype(*tensors) -> Optional[torch.dtype]:
    """The autocast dtype when autocast is on for the tensors' device and none is float64
    (autocast leaves float64 alone, as torch does); None otherwise."""
    first = tensors[0]
    if not isinstance(first, Tensor) or not torch.is_autocast_enabled(first.device.type):
        return None
    if any(isinstance(t, Tensor) and t.dtype == torch.float64 for t in tensors):
        return None
    return torch.get_autocast_dtype(first.device.type)


def _autocast_off(t: Tensor, low: Optional[torch.dtype]):
    """Autocast switched off for the backend call when it was on (``low`` set); else nothing."""
    return nullcontext() if low is None else torch.autocast(t.device.type, enabled=False)


def _cast(t, dtype: torch.dtype):
    if isinstance(t, Tensor) and t.dtype in (torch.float16, torch.bfloat16, torch.float32):
        return t.to(dtype)
    return t


def cosine_alignment(
    x: Tensor, y: Tensor, mask: Optional[Tensor] = None, absolute: bool = True, backend: str = "auto"
) -> Tensor:
    """Mean over valid rows of ``|cos(x_i, y_i)|``: the paper's orthogonality probe.

    ``x``, ``y``: (..., d) of one shape; ``mask``: (...) bool, True = valid row (None = all
    rows). Differentiable in ``x`` and ``y``, so it also serves as a regulariser. Returns a
    0-dim tensor; 0 when no row is valid.
    """
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError("x and y must be torch.Tensors")
    low = _autocast_dtype(x, y)
    if low is not None:
        # like torch's cosine_similarity under autocast: computed and returned in float32
        x, y = _cast(x, torch.float32), _cast(y, torch.float32)
    _check_float("x", x, x.dtype, x.device)
    _check_float("y", y, x.dtype, x.device)
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got x {_shape(x)} and y {_shape(y)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must be (..., d) with d >= 1, got {_shape(x)}")
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = valid row), got "
                            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}")
        if tuple(mask.shape) != tuple(x.shape[:-1]):
            raise ValueError(f"mask must have shape x.shape[:-1] = {tuple(x.shape[:-1])}, got {_shape(mask)}")
        if mask.device != x.device:
            raise ValueError(f"mask is on {mask.device} but x is on {x.device}")
    impl = resolve(backend, x.device, x.dtype)
    with _autocast_off(x, low):
        return impl.cosine_fn(x, y, mask, bool(absolute))
