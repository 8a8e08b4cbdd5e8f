"""Speed and peak memory of the GCA operator and the cosine-alignment reduction.

One pytest-benchmark group per (operator, pass, device, dtype, shape); inside a group the
eager reference, ``torch.compile`` of the eager reference and every fused backend available
for the device run one after another, and each fused row carries its speed-up over eager
and over compile and its peak memory in ``extra_info``: the ratio of the medians, and the
median ratio of interleaved back-to-back calls (``x_*_paired``, steadier on a shared machine
whose speed drifts between the groups' tests). Run:

    pytest benchmarks/ --benchmark-only

Triton is skipped on the CPU: its interpreter says nothing about speed.
"""

from __future__ import annotations

import pytest
import torch

import gca_kernels
from benchmarks.harness import (
    BASELINES, CPU_SHAPES, GPU_BF16_SHAPES, GPU_SHAPES, TABLE, Shape, cosine_reference,
    forward_backward, gca_call, make_inputs, median_seconds, paired_speedup, peak_memory_bytes,
    reference_forward,
)

torch._dynamo.config.cache_size_limit = 64


def _fused_backends(device: str):
    avail = gca_kernels.available_backends()
    wanted = ("triton", "cuda") if device == "cuda" else ("cpp",)
    return [b for b in wanted if b in avail]


def _configs():
    out = []
    for s in CPU_SHAPES:
        out.append(("cpu", torch.float32, s))
    if torch.cuda.is_available():
        for s in GPU_SHAPES:
            out.append(("cuda", torch.bfloat16, s))
        for s in GPU_SHAPES:
            if s not in GPU_BF16_SHAPES:
                out.append(("cuda", torch.float32, s))
    return out


def _cases():
    cases = []
    for device, dtype, shape in _configs():
        for op in ("gca", "cosine"):
            for pas in ("fwd", "fwd_bwd"):
                for impl in ["eager", "compile"] + _fused_backends(device):
                    dt = str(dtype).replace("torch.", "")
                    cases.append(pytest.param(op, pas, device, dtype, shape, impl,
                                              id=f"{op}-{pas}-{device}-{dt}-{shape}-{impl}"))
    return cases


_COMPILED = {}


def _compiled(op: str):
    if op not in _COMPILED:
        _COMPILED[op] = torch.compile(reference_forward if op == "gca" else cosine_reference)
    return _COMPILED[op]


def _impl_fn(op: str, impl: str, heads: int):
    if op == "gca":
        if impl == "eager":
            return gca_call(reference_forward, heads)
        if impl == "compile":
            return gca_call(_compiled("gca"), heads)
        return gca_call(lambda *a, **k: gca_kernels.gated_cross_attention(*a, **k, backend=impl), heads)
    if impl == "eager":
        return cosine_reference
    if impl == "compile":
        return _compiled("cosine")
    return lambda x, y, m: gca_kernels.cosine_alignment(x, y, mask=m, backend=impl)


def _workload(op: str, pas: str, device: str, dtype, shape: Shape, impl: str):
    """A zero-argument callable doing one forward (no_grad) or one forward+backward."""
    need_grad = pas == "fwd_bwd"
    leaves, kpm, causal = make_inputs(shape, device, dtype, need_grad)
    fn = _impl_fn(op, impl, shape.heads)
    if op == "gca":
        args, grad_leaves = (leaves, kpm, causal), leaves
    else:
        x, y = leaves[0], leaves[1]
        args, grad_leaves = (x, y, None if kpm is None else ~kpm), [x, y]

    if not need_grad:
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    return forward_backward(fn, args, grad_leaves)


@pytest.mark.parametrize("op, pas, device, dtype, shape, impl", _cases())
def test_bench(benchmark, op, pas, device, dtype, shape, impl):
    group = f"{op}-{pas}-{device}-{str(dtype).replace('torch.', '')}-{shape}"
    benchmark.group = group
    run = _workload(op, pas, device, dtype, shape, impl)
    run()  # warm-up: compilation, kernel autotuning, allocator
    run()
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def timed():
        out = run()
        sync()
        return out

    benchmark(timed)
    median = benchmark.stats.stats.median
    peak = peak_memory_bytes(run, device)
    BASELINES[(group, impl)] = {"median": median, "peak": peak, "run": run}

    info = {"median_ms": median * 1e3, "peak_MiB": peak / 2**20}
    if impl != "eager":
        for base in ("eager", "compile"):
            if base == impl:
                continue
            if (group, base) not in BASELINES:  # run alone (-k): measure the baseline now
                b_run = _workload(op, pas, device, dtype, shape, base)
                b_run()
                BASELINES[(group, base)] = {"median": median_seconds(b_run, device),
                                            "peak": peak_memory_bytes(b_run, device),
                                            "run": b_run}
            info[f"x_{base}"] = BASELINES[(group, base)]["median"] / median
            info[f"x_{base}_paired"] = paired_speedup(BASELINES[(group, base)]["run"], run, device)
        info["mem_vs_eager"] = peak / max(BASELINES[(group, "eager")]["peak"], 1)
    benchmark.extra_info.update(info)
    TABLE.add(group=group, impl=impl, median_ms=median * 1e3, x_eager=info.get("x_eager"),
              x_compile=info.get("x_compile"), x_eager_paired=info.get("x_eager_paired"),
              x_compile_paired=info.get("x_compile_paired"), peak_MiB=peak / 2**20,
              mem_vs_eager=info.get("mem_vs_eager"))
