"""The matrix products of one dense GCA forward+backward, timed alone: the part of the call that
eager PyTorch and the fused backends share, hence the floor under any speed-up on dense inputs.

A dense fwd+bwd runs 21 d x d products per row (gate hidden size = d): forward q, [k | v],
out_proj, the gate's two halves of its first layer and its second layer (7); backward the weight
gradients and input gradients of each (14). They run here as ``torch.mm`` with MKL, in the order
and layouts the C++ backend uses. Run from the repository root:

    OMP_NUM_THREADS=2 python -m benchmarks.product_floor
"""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.harness import CPU_SHAPES


def _median_seconds(fn, rounds: int = 9) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def products(N: int, d: int):
    """(forward, backward) closures running the dense call's products on N rows of width d."""
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    xa, xb, W, Wkv, W1 = r(N, d), r(N, d), r(d, d), r(2 * d, d), r(d, 2 * d)
    dg, dkv, dh = r(N, d), r(N, 2 * d), r(N, d)
    o, h = torch.empty(N, d), torch.empty(N, d)
    kv = torch.empty(N, 2 * d)
    w, wkv, w1 = torch.empty(d, d), torch.empty(2 * d, d), torch.empty(d, 2 * d)

    def forward():
        torch.mm(xa, W.t(), out=o)                    # q
        torch.mm(xb, Wkv.t(), out=kv)                 # [k | v]
        torch.mm(xa, W.t(), out=o)                    # x' = o Wo^T
        torch.mm(xa, W1[:, :d].t(), out=h)            # gate layer 1, x_a half
        h.addmm_(xa, W1[:, d:].t())                   # gate layer 1, x' half
        torch.mm(h, W.t(), out=o)                     # gate layer 2

    def backward():
        torch.mm(dg.t(), dh, out=w)                   # dW2
        torch.mm(dg, W, out=h)                        # dh
        torch.mm(dh.t(), xa, out=w1[:, :d])           # dW1, both halves
        torch.mm(dh.t(), xa, out=w1[:, d:])
        torch.mm(dh, W1[:, :d], out=o)                # dx_a (gate part)
        o.addmm_(dh, W1[:, d:])                       # dx' (gate part)
        torch.mm(dg.t(), xa, out=w)                   # dWo
        torch.mm(dg, W, out=o)                        # d(o)
        torch.mm(dg.t(), xa, out=w)                   # dWq
        o.addmm_(dg, W)                               # dx_a += dq Wq
        torch.mm(dkv.t(), xb, out=wkv)                # dWk | dWv
        torch.mm(dkv, Wkv, out=o)                     # dx_b

    return forward, backward


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("shape | rows | product GFLOP | forward ms | backward ms | total ms | GFLOP/s")
    for shape in CPU_SHAPES:
        if shape.masks != "dense":
            continue
        N, d = shape.B * shape.L, shape.d
        fwd, bwd = products(N, d)
        tf, tb = _median_seconds(fwd), _median_seconds(bwd)
        flops = 2.0 * 21 * N * d * d
        print(f"{shape} | {N} | {flops / 1e9:.1f} | {tf * 1e3:.1f} | {tb * 1e3:.1f} | "
              f"{(tf + tb) * 1e3:.1f} | {flops / (tf + tb) / 1e9:.0f}")


if __name__ == "__main__":
    main()
