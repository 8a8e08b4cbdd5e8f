"""The torch custom ops over a compiled extension (``gca_kernels._C`` or ``gca_kernels._C_cuda``).

Each operator is one ``torch.library.custom_op`` with ``register_fake`` and
``register_autograd``: eager calls, ``torch.compile`` (no graph breaks) and functorch all take
the same path. The extension's entry points take the parameter bundle
(:class:`gca_kernels.GCAParams`) as the list of its twelve weights and biases plus the optional
LayerNorm pair; the C++ side names them once (``GCAWeights::from_list``).

The GCA forward returns y, cos and what its backward needs (:class:`Saved`, the C++
``GCASaved``): q, [k | v], o, x', h and g exist on the rows the products ran on (the active
rows on the CPU's compact path, whose count depends on the masks: the fake kernel gives them a
data-dependent size), the per-(row, head) logsumexp and the LayerNorm row statistics on every
row. The (B, H, La, Lb) probabilities are never stored; the backward recomputes them.
"""

from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from gca_kernels.backends import GCAParams
from gca_kernels.ops import output_grads

ACTIVATION_CODE = {"sigmoid": 0, "tanh": 1}


class Saved(NamedTuple):
    """The forward's intermediates, in the extension's order (csrc: ``GCASaved``)."""
    q: Tensor        # (nq, d)
    kv: Tensor       # (nk, 2d): [k | v]
    o: Tensor        # (nq, d): attention output before Wo
    lse: Tensor      # (B*La, H), accumulation dtype; +inf where a row sees no key
    xp: Tensor       # (nq, d): x'
    h: Tensor        # (nq, hidden): the gate's hidden layer, post-ReLU
    g: Tensor        # (nq, d): the gate, post-activation
    mean: Tensor     # (B*La,) or (0,): LayerNorm row mean
    rstd: Tensor     # (B*La,) or (0,): LayerNorm row 1/std
    xa_rows: Tensor  # (nq, d) gathered rows of x_a on the compact path, else (0, d)
    xb_rows: Tensor  # (nk, d) gathered rows of x_b on the compact path, else (0, d)


N_WEIGHTS = 12  # GCAParams before ln_w, ln_b


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def define_ops(prefix: str, ext) -> Tuple[Callable, Callable]:
    """Custom ops ``gca_kernels::<prefix>_{gca,cos}_{fwd,bwd}`` over the extension ``ext``;
    returns the backend's ``gca_fn`` and ``cosine_fn``."""

    @torch.library.custom_op(f"gca_kernels::{prefix}_gca_fwd", mutates_args=())
    def gca_fwd(x_a: Tensor, x_b: Tensor, weights: List[Tensor], ln_w: Optional[Tensor],
                ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor], n_heads: int, activation: int,
                ln_eps: float) -> List[Tensor]:
        return ext.gca_fwd(x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, n_heads,
                           activation, ln_eps)

    @gca_fwd.register_fake
    def _(x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, n_heads, activation,
          ln_eps):
        B, La, d = x_a.shape
        N = B * La
        p = GCAParams(*weights, ln_w, ln_b)
        ctx = torch.library.get_ctx()
        nq, nk = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # rows the products ran on
        na, nb = ctx.new_dynamic_size(), ctx.new_dynamic_size()  # gathered rows (0 when dense)
        acc = _acc_dtype(x_a.dtype)
        e = x_a.new_empty
        n_ln = N if p.ln_w is not None else 0
        saved = Saved(q=e(nq, d), kv=e(nk, 2 * d), o=e(nq, d), lse=e(N, n_heads, dtype=acc),
                      xp=e(nq, d), h=e(nq, p.w1.shape[0]), g=e(nq, d), mean=e(n_ln, dtype=acc),
                      rstd=e(n_ln, dtype=acc), xa_rows=e(na, d), xb_rows=e(nb, d))
        return [e(B, La, d), e(B, La), *saved]

    @torch.library.custom_op(f"gca_kernels::{prefix}_gca_bwd", mutates_args=())
    def gca_bwd(dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, weights: List[Tensor],
                ln_w: Optional[Tensor], ln_b: Optional[Tensor],
                key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor],
                saved: List[Tensor], n_heads: int, activation: int,
                ln_eps: float) -> List[Tensor]:
        return ext.gca_bwd(dy, dcos, x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask,
                           saved, n_heads, activation, ln_eps)

    @gca_bwd.register_fake
    def _(dy, dcos, x_a, x_b, weights, ln_w, ln_b, key_padding_mask, attn_mask, saved, n_heads,
          activation, ln_eps):
        n_ln = x_a.shape[-1] if ln_w is not None else 0
        return ([torch.empty_like(x_a), torch.empty_like(x_b)]
                + [torch.empty_like(t) for t in weights]
                + [x_a.new_empty(n_ln), x_a.new_empty(n_ln)])

    def gca_setup_context(ctx, inputs, output):
        x_a, x_b, weights, ln_w, ln_b, kpm, am, n_heads, activation, ln_eps = inputs
        # Only y and cos carry gradients: no zero-filled gradient for each saved intermediate.
        ctx.set_materialize_grads(False)
        ctx.config = (n_heads, activation, ln_eps)
        ctx.save_for_backward(x_a, x_b, ln_w, ln_b, kpm, am, *weights, *output[2:])

    def gca_backward(ctx, grads):
        x_a, x_b, ln_w, ln_b, kpm, am, *rest = ctx.saved_tensors
        weights, saved = rest[:N_WEIGHTS], rest[N_WEIGHTS:]
        dy, dcos = output_grads(x_a, grads[0], grads[1])
        dx_a, dx_b, *dw = gca_bwd(dy.contiguous(), dcos.contiguous(), x_a, x_b, weights, ln_w,
                                  ln_b, kpm, am, saved, *ctx.config)
        dln_w, dln_b = (dw[12], dw[13]) if ln_w is not None else (None, None)
        return dx_a, dx_b, dw[:12], dln_w, dln_b, None, None, None, None, None

    gca_fwd.register_autograd(gca_backward, setup_context=gca_setup_context)

    @torch.library.custom_op(f"gca_kernels::{prefix}_cos_fwd", mutates_args=())
    def cos_fwd(x: Tensor, y: Tensor, mask: Optional[Tensor], absolute: bool) -> Tensor:
        return ext.cos_fwd(x, y, mask, absolute)

    @cos_fwd.register_fake
    def _(x, y, mask, absolute):
        return x.new_empty(())

    @torch.library.custom_op(f"gca_kernels::{prefix}_cos_bwd", mutates_args=())
    def cos_bwd(gout: Tensor, x: Tensor, y: Tensor, mask: Optional[Tensor],
                absolute: bool) -> List[Tensor]:
        return ext.cos_bwd(gout, x, y, mask, absolute)

    @cos_bwd.register_fake
    def _(gout, x, y, mask, absolute):
        return [torch.empty_like(x), torch.empty_like(y)]

    def cos_setup_context(ctx, inputs, output):
        x, y, mask, absolute = inputs
        ctx.absolute = absolute
        ctx.save_for_backward(x, y, mask)

    def cos_backward(ctx, gout):
        x, y, mask = ctx.saved_tensors
        dx, dy = cos_bwd(gout.contiguous(), x, y, mask, ctx.absolute)
        return dx, dy, None, None

    cos_fwd.register_autograd(cos_backward, setup_context=cos_setup_context)

    def gca_fn(x_a, x_b, p: GCAParams, key_padding_mask, attn_mask, n_heads, activation, ln_eps):
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        out = gca_fwd(x_a.contiguous(), x_b.contiguous(), [t.contiguous() for t in p[:N_WEIGHTS]],
                      c(p.ln_w), c(p.ln_b), c(key_padding_mask), c(attn_mask), int(n_heads),
                      ACTIVATION_CODE[activation], float(ln_eps))
        return out[0], out[1]

    def cosine_fn(x, y, mask, absolute):
        # (..., d) as given: the extension flattens the leading dimensions itself
        m = None if mask is None else mask.contiguous()
        return cos_fwd(x.contiguous(), y.contiguous(), m, bool(absolute))

    return gca_fn, cosine_fn
