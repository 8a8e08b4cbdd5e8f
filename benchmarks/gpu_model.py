"""Roofline model of one GCA forward+backward on a GPU, from traced kernel sequences.

No GPU is needed, and none of these figures is a measurement. Each plan runs on ``meta``
tensors of the real shape, so nothing is computed. A ``TorchDispatchMode`` records every ATen
kernel (view ops excluded). The Triton launchers' kernels are replaced by stand-ins
(``benchmarks.gpu_compile.kernels_standing_in``) that record each launch in order. Each
kernel gets its bytes (the sizes of the tensors it reads plus those it writes, each once) and
its FLOPs (products and attention dots). Its time is
``max(FLOPs / (e_c * peak), bytes / (e_m * bandwidth)) + gap``. The plans:

- ``eager``: the float64-oracle reference (``gca_kernels.reference``) in the given dtype,
  backward by autograd: what a user of the eager layer runs.
- ``compile``: the eager sequence with every maximal run of non-product kernels fused into one
  kernel. That kernel reads the run's inputs that were made outside it and writes the outputs
  used after it. This is an optimistic stand-in for ``torch.compile`` (it fuses more than
  Inductor may, and it keeps the reference's materialised scores).
- ``fused``: the Triton backend's own launch sequence (``gca_kernels.ops.triton_gca``),
  torch products included.

    python -m benchmarks.gpu_model [--shape B,L,D,H ...] [--dtype bf16] [--kernels]

Assumptions (H200 SXM): 989 TFLOP/s dense bf16/fp16 tensor cores, 4.8 TB/s HBM3e. Products
at e_c = 0.7, attention dots at 0.35 (small, masked tiles), e_m = 0.85 for every stream,
gap = 2 us per kernel (launch gap and tail; the host enqueues asynchronously). The floor is the
plan-independent minimum: all products at peak, or reading x_a, x_b, dy, the weights and
writing y, dx_a, dx_b once at full bandwidth, whichever is larger.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks.gpu_compile import kernels_standing_in

PEAK = 989e12
BW = 4.8e12
E_PRODUCT, E_ATTN, E_MEM = 0.7, 0.35, 0.85
GAP_S = 2e-6
SHAPES = [(1024, 50, 256, 2), (256, 200, 128, 4)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# ATen ops that only re-describe memory: no kernel.
_VIEWS = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "as_strided", "detach",
          "slice", "select", "unsqueeze", "squeeze", "alias", "reshape", "unbind", "split",
          "empty", "empty_like", "new_empty", "empty_strided", "lift_fresh", "_reshape_alias",
          "split_with_sizes", "narrow", "view_as", "resolve_conj", "resolve_neg"}
_PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "addmm_", "matmul"}


@dataclass
class Kernel:
    name: str
    reads: List[Tuple[int, int]]  # (tensor key, bytes)
    writes: List[Tuple[int, int]]
    flops: float = 0.0
    kind: str = "memory"  # memory | product | attention

    @property
    def nbytes(self) -> int:
        return sum(b for _, b in self.reads) + sum(b for _, b in self.writes)


def _key(t: torch.Tensor) -> int:
    return id(t.untyped_storage()) if t.device.type != "meta" else t.untyped_storage()._cdata


def _tensors(x) -> List[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


def _product_flops(name: str, args) -> float:
    if name in ("mm", "matmul"):
        a, b = args[0], args[1]
    elif name in ("addmm", "addmm_", "baddbmm"):
        a, b = args[1], args[2]
    else:  # bmm
        a, b = args[0], args[1]
    batch = a.shape[0] if a.dim() == 3 else 1
    return 2.0 * batch * a.shape[-2] * a.shape[-1] * b.shape[-1]


class _Trace(TorchDispatchMode):
    def __init__(self, kernels: List[Kernel]):
        super().__init__()
        self.kernels = kernels
        self.keep: List[torch.Tensor] = []  # keeps storages alive so their keys stay unique

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        if name in _VIEWS:
            return out
        ins = _tensors((args, kwargs))
        outs = _tensors(out)
        self.keep += ins + outs
        reads = [(_key(t), t.numel() * t.element_size()) for t in ins if t.numel() > 1]
        writes = [(_key(t), t.numel() * t.element_size()) for t in outs]
        if name in ("zero_", "fill_", "zeros", "zeros_like", "full", "ones", "scalar_tensor"):
            reads = []
        flops = _product_flops(name, args) if name in _PRODUCTS else 0.0
        self.kernels.append(Kernel(name, reads, writes, flops, "product" if flops else "memory"))
        return out


# Which tensor arguments a Triton kernel writes, and its dots: FLOPs per (B * H * La * Lb * dh).
_TRITON_WRITES = {
    "_attn_fwd_kernel": ("O", "LSE"), "_attn_bwd_dq_kernel": ("DELTA", "DQ", "DBQ_PART"),
    "_attn_bwd_dkdv_kernel": ("DK", "DV", "DBKV_PART"),
    "_gate_hidden_kernel": ("C", "PART"),
    "_gate_out_fwd_kernel": ("Y", "COS", "MEAN", "RSTD"),
    "_gate_out_bwd_kernel": ("DXA", "DXP", "DGPRE", "PART"),
    "_pack_weights_kernel": ("P",), "_column_sums_kernel": ("OUT",),
    "_cos_align_fwd_kernel": ("PARTIAL",), "_cos_align_bwd_kernel": ("DX", "DY"),
}
# dots per kernel: forward s, pv; dq: s, dp twice, then dq; dkdv: s, dv, dp, dk
_ATTN_DOTS = {"_attn_fwd_kernel": 2, "_attn_bwd_dq_kernel": 5, "_attn_bwd_dkdv_kernel": 4}


# Pointer arguments a kernel touches only when a constexpr flag is set (else a placeholder).
_FLAGGED = {"KPM": "HAS_KPM", "AM": "HAS_AM", "LNW": "HAS_LN", "LNB": "HAS_LN",
            "BIAS": "HAS_BIAS", "HMASK": "MASKED", "PART": "MASKED", "A2": "TWO", "B2": "TWO",
            "DK": "WANT_DK", "DV": "WANT_DV"}


def _launch_kernel(call: dict, keep: List[torch.Tensor]) -> Kernel:
    """A Triton launch (``gpu_compile.KernelStandIn``'s record) as a Kernel: the tensors it
    touches (each once; a placeholder pointer its flags switch off is not traffic) and its dots."""
    fn = call["fn"]
    values = dict(zip(fn.arg_names, call["args"]))
    values.update(call["kwargs"])
    name = fn.__name__
    writes_names = _TRITON_WRITES.get(name, ())
    reads, writes = [], []
    seen = set()
    for arg, v in values.items():
        if not isinstance(v, torch.Tensor) or (_key(v), arg in writes_names) in seen:
            continue
        if arg in _FLAGGED and not values.get(_FLAGGED[arg], True):
            continue  # a placeholder pointer the kernel does not touch
        seen.add((_key(v), arg in writes_names))
        keep.append(v)
        item = (_key(v), v.numel() * v.element_size())
        (writes if arg in writes_names else reads).append(item)
    flops, kind = 0.0, "memory"
    if name in _ATTN_DOTS:
        dots = _ATTN_DOTS[name]
        if name == "_attn_bwd_dkdv_kernel":  # s, then dv and/or dp + dk
            dots = 1 + bool(values["WANT_DV"]) + 2 * bool(values["WANT_DK"])
        b = values["Q"].shape[0]
        flops, kind = 2.0 * dots * b * values["La"] * values["Lb"] * values["D"], "attention"
    elif name == "_gate_hidden_kernel":
        flops = 2.0 * values["M"] * values["N"] * values["K"] * (2 if values["TWO"] else 1)
        kind = "product"
    return Kernel(name, reads, writes, flops, kind)


def _inputs(shape, dtype, device="meta", grad=False):
    B, L, d, H = shape

    def e(*s):
        t = torch.empty(*s, dtype=dtype, device=device)
        return t.requires_grad_(grad)

    x_a, x_b = e(B, L, d), e(B, L, d)
    w = [e(d, d), e(d)] * 4 + [e(d, 2 * d), e(d), e(d, d), e(d)]
    ln = [e(d), e(d)]
    kpm = torch.zeros(B, L, dtype=torch.bool, device=device)
    am = torch.ones(L, L, dtype=torch.bool, device=device).triu(1)[None]
    return x_a, x_b, w, ln, kpm, am


def trace_eager(shape, dtype) -> List[Kernel]:
    from gca_kernels.reference import gated_cross_attention_ref

    B, L, d, H = shape
    x_a, x_b, w, ln, kpm, am = _inputs(shape, dtype, grad=True)
    dy = torch.empty(B, L, d, dtype=dtype, device="meta")
    dcos = torch.empty(B, L, dtype=dtype, device="meta")
    kernels: List[Kernel] = []
    with _Trace(kernels):
        y, cos = gated_cross_attention_ref(x_a, x_b, *w, *ln, kpm, am, H, "sigmoid", 1e-5)
        torch.autograd.backward([y, cos], [dy, dcos])
    return kernels


def trace_fused(shape, dtype) -> List[Kernel]:
    """The Triton backend's launches for one forward and backward, then the copy autograd makes
    of each gradient whose layout differs from its parameter's (AccumulateGrad)."""
    from gca_kernels.ops import triton_gca as T

    B, L, d, H = shape
    x_a, x_b, w, ln, kpm, am = _inputs(shape, dtype)
    kernels: List[Kernel] = []
    trace = _Trace(kernels)
    with kernels_standing_in(lambda call: kernels.append(_launch_kernel(call, trace.keep)),
                             cosine=False), trace:
        y, cos, saved = T.gca_forward(x_a, x_b, *w, *ln, kpm, am, H, "sigmoid", 1e-5)
        dy = torch.empty(B, L, d, dtype=dtype, device="meta")
        dcos = torch.empty(B, L, dtype=dtype, device="meta")
        g = T.gca_backward(dy, dcos, x_a, x_b, w[6], w[8], w[10], ln[0], kpm, am, saved, H,
                           "sigmoid", 1e-5)
        for grad in T.split_grads(g, d, w[10].shape[0], True):
            if grad is not None and not grad.is_contiguous():
                grad.contiguous()
    return kernels


def fuse_runs(kernels: Sequence[Kernel]) -> List[Kernel]:
    """The compile stand-in: each maximal run of memory kernels becomes one kernel."""
    out: List[Kernel] = []
    i = 0
    while i < len(kernels):
        if kernels[i].kind != "memory":
            out.append(kernels[i])
            i += 1
            continue
        j = i
        while j < len(kernels) and kernels[j].kind == "memory":
            j += 1
        run = kernels[i:j]
        made = {k for kern in run for k, _ in kern.writes}
        later = {k for kern in kernels[j:] for k, _ in kern.reads}
        reads = {k: b for kern in run for k, b in kern.reads if k not in made}
        writes = {}
        for kern in run:
            for k, b in kern.writes:
                if k in later or not any(k in {r for r, _ in x.reads} for x in kernels[j:] + run):
                    writes[k] = b
        out.append(Kernel(f"fused[{len(run)}]", list(reads.items()), list(writes.items())))
        i = j
    return out


def kernel_time(k: Kernel) -> float:
    eff = {"product": E_PRODUCT, "attention": E_ATTN}.get(k.kind, 1.0)
    t_c = k.flops / (eff * PEAK) if k.flops else 0.0
    return max(t_c, k.nbytes / (E_MEM * BW)) + GAP_S


def summarise(kernels: Sequence[Kernel]) -> Dict[str, float]:
    return {
        "kernels": len(kernels),
        "gbytes": sum(k.nbytes for k in kernels) / 1e9,
        "gflop": sum(k.flops for k in kernels) / 1e9,
        "ms": sum(kernel_time(k) for k in kernels) * 1e3,
    }


def floor_ms(shape, dtype) -> float:
    B, L, d, H = shape
    es = torch.empty((), dtype=dtype).element_size()
    rows = B * L
    flops = 2.0 * rows * d * d * 21 + 2.0 * 11 * B * L * L * d
    nbytes = es * (rows * d * 6 + 18 * d * d)  # x_a, x_b, dy in; y, dx_a, dx_b out; weights
    return max(flops / PEAK, nbytes / BW) * 1e3


def saved_bytes_eager(shape, dtype) -> int:
    """Bytes autograd keeps from the eager forward for backward (inputs and weights excluded):
    the activation memory a training step holds per GCA layer."""
    from gca_kernels.reference import gated_cross_attention_ref

    B, L, d, H = shape
    x_a, x_b, w, ln, kpm, am = _inputs(shape, dtype, grad=True)
    leaves = {_key(t) for t in [x_a, x_b, *w, *ln]}
    kept: Dict[int, int] = {}

    def pack(t):
        if _key(t) not in leaves:
            kept[_key(t)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gated_cross_attention_ref(x_a, x_b, *w, *ln, kpm, am, H, "sigmoid", 1e-5)
    return sum(kept.values())


def saved_bytes_fused(shape, dtype) -> int:
    """Bytes of the Triton backend's ``Saved`` (inputs and weights excluded)."""
    from gca_kernels.ops import triton_gca as T

    B, L, d, H = shape
    x_a, x_b, w, ln, kpm, am = _inputs(shape, dtype)
    with kernels_standing_in(lambda call: None, cosine=False):
        _, _, saved = T.gca_forward(x_a, x_b, *w, *ln, kpm, am, H, "sigmoid", 1e-5)
    return sum(t.numel() * t.element_size() for t in saved)


def model(shape, dtype) -> Dict[str, Dict[str, float]]:
    eager = trace_eager(shape, dtype)
    res = {"eager": summarise(eager), "compile": summarise(fuse_runs(eager)),
           "fused": summarise(trace_fused(shape, dtype))}
    res["eager"]["saved_mb"] = saved_bytes_eager(shape, dtype) / 1e6
    res["fused"]["saved_mb"] = saved_bytes_fused(shape, dtype) / 1e6
    res["floor"] = {"ms": floor_ms(shape, dtype)}
    return res


def _shape(text: str) -> Tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"--shape wants B,L,D,H, got {text!r}")
    return parts  # type: ignore[return-value]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=_shape, nargs="+", default=SHAPES)
    ap.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    ap.add_argument("--kernels", action="store_true", help="list the fused plan's kernels")
    ap.add_argument("--json", help="write the figures to this file")
    args = ap.parse_args(argv)
    dtype = DTYPES[args.dtype]
    table = {}
    print(f"modelled, not measured ({args.dtype}, fwd+bwd; H200 assumptions in the docstring)")
    print(f"{'shape':>22} {'plan':>8} {'kernels':>8} {'GB':>7} {'GFLOP':>7} {'ms':>7} {'vs eager':>9}"
          f" {'saved MB':>9}")
    for shape in args.shape:
        res = model(shape, dtype)
        table[",".join(map(str, shape))] = res
        for plan in ("eager", "compile", "fused"):
            r = res[plan]
            ratio = res["eager"]["ms"] / r["ms"]
            saved = f"{r['saved_mb']:>9.0f}" if "saved_mb" in r else f"{'':>9}"
            print(f"{str(shape):>22} {plan:>8} {r['kernels']:>8} {r['gbytes']:>7.2f} "
                  f"{r['gflop']:>7.1f} {r['ms']:>7.3f} {ratio:>8.2f}x {saved}")
        print(f"{str(shape):>22} {'floor':>8} {'':>8} {'':>7} {'':>7} {res['floor']['ms']:>7.3f}")
        if args.kernels:
            for k in trace_fused(shape, dtype):
                print(f"    {k.name:<24} {k.kind:<9} {k.nbytes / 1e6:>8.1f} MB {k.flops / 1e9:>7.2f} GFLOP "
                      f"{kernel_time(k) * 1e6:>7.1f} us")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(table, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
