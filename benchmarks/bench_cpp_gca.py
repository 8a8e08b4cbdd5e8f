"""Side-by-side timing of eager / torch.compile / cpp on the CPU shapes of the issue.

Same problems as the main suite (benchmarks.harness), interleaved rounds so that load from
other processes on the machine hits every implementation alike. Run from the repo root:

    OMP_NUM_THREADS=2 python -m benchmarks.bench_cpp_gca [--rounds 5] [--skip-compile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import gca_kernels
from benchmarks.harness import (CPU_SHAPES, cosine_reference, forward_backward, gca_call,
                                make_inputs, peak_memory_bytes, reference_forward)


def workload(op, pas, shape, fn):
    need_grad = pas == "fwd_bwd"
    leaves, kpm, causal = make_inputs(shape, "cpu", torch.float32, need_grad)
    if op == "gca":
        args, grad_leaves = (leaves, kpm, causal), leaves
    else:
        args, grad_leaves = (leaves[0], leaves[1], None if kpm is None else ~kpm), leaves[:2]
    if not need_grad:
        def run():
            with torch.no_grad():
                return fn(*args)
        return run

    return forward_backward(fn, args, grad_leaves)


def impls(op, heads, skip_compile):
    if op == "gca":
        out = {"eager": gca_call(reference_forward, heads),
               "cpp": gca_call(lambda *a, **k: gca_kernels.gated_cross_attention(*a, **k, backend="cpp"), heads)}
        if not skip_compile:
            out["compile"] = gca_call(torch.compile(reference_forward), heads)
        return out
    out = {"eager": cosine_reference,
           "cpp": lambda x, y, m: gca_kernels.cosine_alignment(x, y, mask=m, backend="cpp")}
    if not skip_compile:
        out["compile"] = torch.compile(cosine_reference)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--ops", default="gca,cosine")
    ap.add_argument("--masks", default="padded,dense", help="input kinds: padded, dense")
    ap.add_argument("--passes", default="fwd,fwd_bwd")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("op | pass | shape | eager ms | compile ms | cpp ms | x eager | x compile | peak MiB eager/cpp")
    for op in args.ops.split(","):
        for shape in [s for s in CPU_SHAPES if s.masks in args.masks.split(",")]:
            fns = impls(op, shape.heads, args.skip_compile)
            for pas in args.passes.split(","):
                runs = {k: workload(op, pas, shape, f) for k, f in fns.items()}
                for r in runs.values():  # warm-up (compilation)
                    r(); r()
                times = {k: [] for k in runs}
                for _ in range(args.rounds):
                    for k, r in runs.items():
                        t0 = time.perf_counter()
                        r()
                        times[k].append(time.perf_counter() - t0)
                med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
                peak = {k: peak_memory_bytes(runs[k], "cpu") / 2**20 for k in ("eager", "cpp")}
                comp = med.get("compile", float("nan"))
                print(f"{op} | {pas} | {shape} | {med['eager']:.2f} | {comp:.2f} | {med['cpp']:.2f} | "
                      f"{med['eager'] / med['cpp']:.2f} | {comp / med['cpp']:.2f} | "
                      f"{peak['eager']:.1f}/{peak['cpp']:.1f}", flush=True)


if __name__ == "__main__":
    main()
