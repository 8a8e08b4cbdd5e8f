"""C++ (CPU) and CUDA backends: the compiled extensions behind ``torch.library`` custom ops.

``gca_kernels._C`` (CPU: ATen products + OpenMP row kernels, float32/float64) and
``gca_kernels._C_cuda`` (CUDA: cuBLAS products + CUDA row kernels, float32/float64/bf16/fp16)
are built by ``setup.py``. Each operator is a forward op and a backward op
(``gca_kernels::cpp_gca_fwd``/``cpp_gca_bwd``, ``cpp_cos_fwd``/``cpp_cos_bwd`` and the
``cuda_*`` twins), each with a fake (meta) implementation, the forward carrying an autograd
registration: ``torch.compile(fullgraph=True)`` traces through them without graph breaks.

The GCA forward returns, besides ``y`` and ``cos``, what its backward needs: q, [k | v], the
attention output o, the per-(row, head) logsumexp, x', the gate's hidden layer h, the gate g
and the LayerNorm row statistics; called directly rather than through the custom op, also the
gathered input rows of the CPU's compact path. The (B, H, La, Lb) probabilities are never
stored; the backward recomputes them from q, k and the logsumexp.

Importing this module registers whichever of ``cpp``/``cuda`` was built; if neither was, it
raises ImportError saying how to build them (caught by the backend loader).
"""

from __future__ import annotations

import glob
import importlib
import importlib.machinery
import importlib.util
import os
import sys
from typing import List, Optional

import torch
from torch import Tensor

from gca_kernels.backends import GCAParams, register_backend
from gca_kernels.ops import output_grads

_ACTIVATION_CODE = {"sigmoid": 0, "tanh": 1}
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the gca_kernels package


def _load_extension(name: str):
    """Import ``gca_kernels.<name>``; returns (module, None) or (None, why it failed).

    Tests run from the source tree, whose ``gca_kernels`` shadows the installed copy; when the
    tree has no in-place build, the installed copy's compiled file is loaded instead.
    """
    try:
        return importlib.import_module(f"gca_kernels.{name}"), None
    except ImportError as exc:
        first = f"{type(exc).__name__}: {exc}"
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    for entry in sys.path:
        pkg = os.path.join(entry or os.getcwd(), "gca_kernels")
        if not os.path.isdir(pkg) or os.path.realpath(pkg) == os.path.realpath(_HERE):
            continue
        for suffix in suffixes:
            for path in glob.glob(os.path.join(pkg, name + suffix)):
                try:
                    spec = importlib.util.spec_from_file_location(f"gca_kernels.{name}", path)
                    mod = importlib.util.module_from_spec(spec)
                    spec.loader.exec_module(mod)
                    sys.modules[f"gca_kernels.{name}"] = mod
                    return mod, None
                except ImportError as exc:
                    first += f"; {path}: {exc}"
    return None, first


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _define_ops(prefix: str, ext):
    """Custom ops ``gca_kernels::<prefix>_{gca,cos}_{fwd,bwd}`` calling the extension ``ext``."""

    @torch.library.custom_op(f"gca_kernels::{prefix}_gca_fwd", mutates_args=())
    def gca_fwd(x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor, wk: Tensor, bk: Tensor,
                wv: Tensor, bv: Tensor, wo: Tensor, bo: Tensor, w1: Tensor, b1: Tensor,
                w2: Tensor, b2: Tensor, ln_w: Optional[Tensor], ln_b: Optional[Tensor],
                key_padding_mask: Optional[Tensor], attn_mask: Optional[Tensor], n_heads: int,
                activation: int, ln_eps: float) -> List[Tensor]:
        # custom_op: the unused rows of the saved intermediates are zeroed (op outputs must be
        # deterministic) and the gathered input rows are not kept (shapes must be static)
        return ext.gca_fwd(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
                           key_padding_mask, attn_mask, n_heads, activation, ln_eps, True)

    @gca_fwd.register_fake
    def _(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
          key_padding_mask, attn_mask, n_heads, activation, ln_eps):
        B, La, d = x_a.shape
        Lb = x_b.shape[1]
        N, M, hid = B * La, B * Lb, w1.shape[0]
        acc = _acc_dtype(x_a.dtype)
        e = x_a.new_empty
        n_ln = N if ln_w is not None else 0
        return [e(B, La, d), e(B, La), e(N, d), e(M, 2 * d), e(N, d),
                e(N, n_heads, dtype=acc), e(N, d), e(N, hid), e(N, d),
                e(n_ln, dtype=acc), e(n_ln, dtype=acc), e(0, d), e(0, d)]

    @torch.library.custom_op(f"gca_kernels::{prefix}_gca_bwd", mutates_args=())
    def gca_bwd(dy: Tensor, dcos: Tensor, x_a: Tensor, x_b: Tensor, wq: Tensor, bq: Tensor,
                wk: Tensor, bk: Tensor, wv: Tensor, bv: Tensor, wo: Tensor, bo: Tensor,
                w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, ln_w: Optional[Tensor],
                ln_b: Optional[Tensor], key_padding_mask: Optional[Tensor],
                attn_mask: Optional[Tensor], q: Tensor, kv: Tensor, o: Tensor, lse: Tensor,
                xp: Tensor, h: Tensor, g: Tensor, mean: Tensor, rstd: Tensor, xa_g: Tensor,
                xb_g: Tensor, n_heads: int, activation: int, ln_eps: float) -> List[Tensor]:
        return ext.gca_bwd(dy, dcos, x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2,
                           ln_w, ln_b, key_padding_mask, attn_mask, q, kv, o, lse, xp, h, g,
                           mean, rstd, xa_g, xb_g, n_heads, activation, ln_eps)

    @gca_bwd.register_fake
    def _(dy, dcos, x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
          key_padding_mask, attn_mask, q, kv, o, lse, xp, h, g, mean, rstd, xa_g, xb_g, n_heads,
          activation, ln_eps):
        like = [x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2]
        d = x_a.shape[-1]
        n_ln = d if ln_w is not None else 0
        return [torch.empty_like(t) for t in like] + [x_a.new_empty(n_ln), x_a.new_empty(n_ln)]

    def gca_setup_context(ctx, inputs, output):
        (x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
         kpm, am, n_heads, activation, ln_eps) = inputs
        _, _, q, kv, o, lse, xp, h, g, mean, rstd, xa_g, xb_g = output
        # Only y and cos carry gradients; without this autograd would allocate and zero-fill a
        # gradient for each of the eleven saved intermediates on every backward (time and memory).
        ctx.set_materialize_grads(False)
        ctx.has_ln = ln_w is not None
        ctx.has_kpm, ctx.has_am = kpm is not None, am is not None
        ctx.meta = (n_heads, activation, ln_eps)
        extra = [t for t in (ln_w, ln_b, kpm, am) if t is not None]
        ctx.save_for_backward(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2,
                              q, kv, o, lse, xp, h, g, mean, rstd, xa_g, xb_g, *extra)

    def gca_backward(ctx, grads):
        saved = list(ctx.saved_tensors)
        base, stats, extra = saved[:14], saved[14:25], saved[25:]
        ln_w = ln_b = kpm = am = None
        if ctx.has_ln:
            ln_w, ln_b, extra = extra[0], extra[1], extra[2:]
        if ctx.has_kpm:
            kpm, extra = extra[0], extra[1:]
        if ctx.has_am:
            am = extra[0]
        dy, dcos = output_grads(base[0], grads[0], grads[1])
        out = gca_bwd(dy.contiguous(), dcos.contiguous(), *base, ln_w, ln_b, kpm, am, *stats, *ctx.meta)
        dln_w, dln_b = (out[14], out[15]) if ctx.has_ln else (None, None)
        return (*out[:14], dln_w, dln_b, None, None, None, None, None)

    gca_fwd.register_autograd(gca_backward, setup_context=gca_setup_context)

    class GCAEager(torch.autograd.Function):
        """gca_fwd / gca_bwd calling the extension directly: eager mode only (see CosEager).

        The custom op's Python machinery (schema checks of 21 arguments, the registered autograd
        wrapper, a second op for the backward) cost about 0.5 ms per forward + backward at
        (256, 50, 64), measured against this path.
        """

        @staticmethod
        def forward(ctx, x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b,
                    kpm, am, n_heads, activation, ln_eps):
            # the saved intermediates stay inside this Function: their unused rows (never read
            # by the backward) are left unwritten
            out = ext.gca_fwd(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w,
                              ln_b, kpm, am, n_heads, activation, ln_eps, False)
            ctx.set_materialize_grads(False)
            ctx.meta = (n_heads, activation, ln_eps)
            ctx.has_ln = ln_w is not None
            ctx.save_for_backward(x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2,
                                  ln_w, ln_b, kpm, am, *out[2:])
            return out[0], out[1]

        @staticmethod
        @torch.autograd.function.once_differentiable  # the backward itself is not differentiable
        def backward(ctx, dy, dcos):
            saved = ctx.saved_tensors
            dy, dcos = output_grads(saved[0], dy, dcos)
            out = ext.gca_bwd(dy.contiguous(), dcos.contiguous(), *saved, *ctx.meta)
            dln_w, dln_b = (out[14], out[15]) if ctx.has_ln else (None, None)
            return (*out[:14], dln_w, dln_b, None, None, None, None, None)

    def gca_apply(x_a, x_b, *rest):
        if _must_use_op(x_a, x_b):
            return gca_fwd(x_a, x_b, *rest)
        return GCAEager.apply(x_a, x_b, *rest)

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
        ctx.absolute, ctx.has_mask = absolute, mask is not None
        ctx.save_for_backward(x, y, *([mask] if mask is not None else []))

    def cos_backward(ctx, gout):
        x, y, *m = ctx.saved_tensors
        mask = m[0] if ctx.has_mask else None
        dx, dy = cos_bwd(gout.contiguous(), x, y, mask, ctx.absolute)
        return dx, dy, None, None

    cos_fwd.register_autograd(cos_backward, setup_context=cos_setup_context)

    class CosEager(torch.autograd.Function):
        """The same forward and backward, calling the extension directly: eager mode only.

        At small sizes the custom op's Python machinery (op dispatch, the registered autograd
        wrapper, a second op call in backward) cost about 70 us per forward + backward, ~10% of
        the whole at (256, 50, 64); this path costs a few us.
        """

        @staticmethod
        def forward(ctx, x, y, mask, absolute):
            ctx.absolute = absolute
            ctx.save_for_backward(x, y, mask)
            return ext.cos_fwd(x, y, mask, absolute)

        @staticmethod
        @torch.autograd.function.once_differentiable  # the backward itself is not differentiable
        def backward(ctx, gout):
            x, y, mask = ctx.saved_tensors
            dx, dy = ext.cos_bwd(gout.contiguous(), x, y, mask, ctx.absolute)
            return dx, dy, None, None

    def cos_apply(x, y, mask, absolute):
        if _must_use_op(x, y):
            return cos_fwd(x, y, mask, absolute)
        if not (torch.is_grad_enabled() and (x.requires_grad or y.requires_grad)):
            # nothing to differentiate (a probe under no_grad): no autograd node. The Function's
            # apply alone cost ~4 us a call (6.1 against 1.9 us on tiny inputs), ~8% of the
            # forward at (256, 50, 64)
            return ext.cos_fwd(x, y, mask, absolute)
        return CosEager.apply(x, y, mask, absolute)

    return gca_apply, cos_apply


def _must_use_op(x: Tensor, y: Tensor) -> bool:
    """True wherever something may be tracing or wrapping the tensors (torch.compile, fake
    tensors, functorch transforms, tensor subclasses): there the registered custom op runs;
    plain eager calls take the direct autograd.Function path."""
    return (torch.compiler.is_compiling() or type(x) is not Tensor or type(y) is not Tensor
            or torch._C._functorch.is_functorch_wrapped_tensor(x)
            or torch._C._functorch.is_functorch_wrapped_tensor(y)
            or torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None
            or torch._C._len_torch_dispatch_stack() > 0)


def _make_backend(gca_fwd, cos_fwd):
    def gca_fn(x_a, x_b, p: GCAParams, key_padding_mask, attn_mask, n_heads, activation, ln_eps):
        c = lambda t: None if t is None else t.contiguous()  # noqa: E731
        out = gca_fwd(x_a.contiguous(), x_b.contiguous(), *(t.contiguous() for t in p[:12]),
                      c(p.ln_w), c(p.ln_b), c(key_padding_mask), c(attn_mask), int(n_heads),
                      _ACTIVATION_CODE[activation], float(ln_eps))
        return out[0], out[1]

    def cosine_fn(x, y, mask, absolute):
        # (..., d) as given: the extension flattens the leading dimensions itself
        m = None if mask is None else mask.contiguous()
        return cos_fwd(x.contiguous(), y.contiguous(), m, bool(absolute))

    return gca_fn, cosine_fn


def _cpu_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on the CPU only, got tensors on {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"the cpp backend supports float32 and float64 on the CPU, got {dtype}"
    return None


def _cuda_supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices only, got tensors on {device}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the cuda backend supports float16/bfloat16/float32/float64, got {dtype}"
    return None


_C, _C_ERROR = _load_extension("_C")
_C_CUDA, _C_CUDA_ERROR = _load_extension("_C_cuda")

if _C is not None:
    _gca_fn, _cosine_fn = _make_backend(*_define_ops("cpp", _C))
    # under autocast the CPU kernels compute in float32 (they have no half-precision paths)
    register_backend("cpp", gca_fn=_gca_fn, cosine_fn=_cosine_fn, supports=_cpu_supports,
                     autocast_compute=torch.float32)
if _C_CUDA is not None:
    _gca_fn, _cosine_fn = _make_backend(*_define_ops("cuda", _C_CUDA))
    register_backend("cuda", gca_fn=_gca_fn, cosine_fn=_cosine_fn, supports=_cuda_supports)
if _C is None and _C_CUDA is None:
    raise ImportError(
        f"the compiled extensions are not built (gca_kernels._C: {_C_ERROR}; gca_kernels._C_cuda: "
        f"{_C_CUDA_ERROR}). Build them with `pip install --no-build-isolation .` or, in the source "
        "tree, `python setup.py build_ext --inplace`")
