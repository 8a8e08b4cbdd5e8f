"""Measurement helpers for the benchmark suite: problems, peak memory, the results table.

Peak memory is what the allocator saw during one call, minus what was live before it: on
CUDA from the caching allocator's statistics, on the CPU from the profiler's allocation
events (which include the compiled extensions' internal temporaries, so fused and eager
backends are counted alike).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

import gca_kernels
from gca_kernels.reference import cosine_alignment_ref, gated_cross_attention_ref


@dataclass(frozen=True)
class Shape:
    B: int
    L: int
    d: int
    heads: int
    # "padded": left-padded histories of random lengths under a causal cross mask (what the
    # backbones feed: about half the keys padded, many query rows keyless); "dense": full-length
    # sequences, no mask (what a user with full-length sequences has; nothing to skip)
    masks: str = "padded"

    def __str__(self) -> str:
        base = f"B{self.B}-L{self.L}-d{self.d}-h{self.heads}"
        return base if self.masks == "padded" else f"{base}-{self.masks}"


_SIZES = [(256, 50, 64, 2), (256, 50, 256, 2), (128, 200, 128, 1)]
CPU_SHAPES = [Shape(*s, masks=m) for s in _SIZES for m in ("padded", "dense")]
GPU_SHAPES = [Shape(*s) for s in _SIZES] + [Shape(1024, 50, 256, 2), Shape(256, 200, 128, 4)]
# bf16 only for the two large GPU shapes of the issue; float32 everywhere else
GPU_BF16_SHAPES = [Shape(1024, 50, 256, 2), Shape(256, 200, 128, 4)]


def make_inputs(shape: Shape, device: str, dtype: torch.dtype, requires_grad: bool, seed: int = 0):
    """A GCA problem: x_a, x_b, the weights (the leaves), the key padding mask and the cross
    mask (both None for ``masks="dense"``)."""
    g = torch.Generator().manual_seed(seed)
    B, L, d = shape.B, shape.L, shape.d
    x_a = torch.randn(B, L, d, generator=g)
    x_b = torch.randn(B, L, d, generator=g)
    if shape.masks == "dense":
        kpm = causal = None
    else:
        # left padding: each user has between 1 and L items
        lengths = torch.randint(1, L + 1, (B,), generator=g)
        kpm = torch.arange(L)[None, :] < (L - lengths)[:, None]
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # query t sees keys <= t
    w = 1 / math.sqrt(d)
    params = [torch.randn(d, d, generator=g) * w, torch.zeros(d)] * 4
    params += [torch.randn(d, 2 * d, generator=g) * w / math.sqrt(2), torch.zeros(d),
               torch.randn(d, d, generator=g) * w, torch.zeros(d)]
    ln = [torch.ones(d), torch.zeros(d)]
    leaves = [x_a, x_b] + params + ln
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in leaves]
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return leaves, to(kpm), to(causal)


def gca_call(impl: Callable, heads: int):
    """A closure computing one GCA forward with ``impl`` (reference or a backend call)."""
    def fn(leaves, kpm, causal):
        x_a, x_b, *w = leaves
        return impl(x_a, x_b, *w[:12], ln_w=w[12], ln_b=w[13], key_padding_mask=kpm,
                    attn_mask=causal, n_heads=heads, activation="sigmoid")
    return fn


def fixed_upstream_gradient(out: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """The gradient fed into backward: ones for a scalar, else a seeded normal draw. Made once
    per workload, outside the timed region: drawing it per call (torch.randn_like) cost 3.3 ms at
    (256, 50, 64) and 11.7 ms at the two larger shapes on the 2-core CPU, charged to every
    implementation alike, which hid part of the differences being measured."""
    if out.dim() == 0:
        return torch.ones_like(out)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out.shape, generator=g).to(device=out.device, dtype=out.dtype)


def forward_backward(fn: Callable, args: tuple, grad_leaves) -> Callable[[], object]:
    """A zero-argument callable: fn(*args), then the gradients of grad_leaves for a fixed upstream
    gradient (drawn on the first, warm-up call and reused by the timed ones)."""
    grad_out = []

    def run():
        out = fn(*args)
        if not grad_out:
            grad_out.append(fixed_upstream_gradient(out))
        return torch.autograd.grad(out, grad_leaves, grad_out[0])
    return run


def reference_forward(x_a, x_b, *w, **kw):
    y, _ = gated_cross_attention_ref(x_a, x_b, *w, **kw)
    return y


def cosine_reference(x, y, mask):
    return cosine_alignment_ref(x, y, mask, True)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def peak_memory_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during ``fn()`` above what was live when it started.

    The cpp backend's scratch buffers outlive a call (they are reused by the next one): they
    are freed first, so the measured call allocates them again and they count in its peak.
    """
    gca_kernels.release_cpu_workspace()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def median_seconds(fn: Callable[[], object], device: str, min_time: float = 0.5, min_runs: int = 3) -> float:
    """Median wall time of ``fn`` (used for baselines measured outside pytest-benchmark)."""
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - start < min_time:
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    return statistics.median(times)


def paired_speedup(base: Callable[[], object], fused: Callable[[], object], device: str,
                   min_time: float = 2.0, min_pairs: int = 7) -> float:
    """Median over interleaved pairs of (time of ``base``) / (time of ``fused``).

    On a shared machine the speed drifts by tens of percent over seconds; two medians taken
    one after the other inherit that drift, a ratio of back-to-back calls mostly does not.
    The order inside a pair alternates, so neither side always runs first.
    """
    ratios: List[float] = []
    start = time.perf_counter()
    while len(ratios) < min_pairs or time.perf_counter() - start < min_time:
        t = {}
        for name, fn in ((("b", base), ("f", fused)) if len(ratios) % 2 == 0
                         else (("f", fused), ("b", base))):
            synchronize(device)
            t0 = time.perf_counter()
            fn()
            synchronize(device)
            t[name] = time.perf_counter() - t0
        ratios.append(t["b"] / t["f"])
        if len(ratios) >= 200:
            break
    return statistics.median(ratios)


@dataclass
class ResultTable:
    """Rows collected during the run, printed at the end by conftest.py."""
    rows: List[Dict] = field(default_factory=list)

    def add(self, **row) -> None:
        self.rows.append(row)

    def render(self) -> str:
        if not self.rows:
            return ""
        cols = ["group", "impl", "median_ms", "x_eager", "x_compile", "x_eager_paired",
                "x_compile_paired", "peak_MiB", "mem_vs_eager"]
        lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
        for r in self.rows:
            cells = []
            for c in cols:
                v = r.get(c)
                cells.append("-" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v)))
            lines.append(" | ".join(cells))
        return "\n".join(lines)


TABLE = ResultTable()
# medians, peaks and workloads of the baselines, keyed by (group, impl), shared across a session
# so the ratios of a fused backend come from the same run
BASELINES: Dict[tuple, Dict[str, object]] = {}


def torch_threads_note() -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


def maybe_none(x: Optional[float]) -> Optional[float]:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x
