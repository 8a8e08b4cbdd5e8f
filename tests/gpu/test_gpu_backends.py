"""The GPU backends (compiled Triton, the CUDA extension) against the float64 reference.

Skipped without a CUDA device; ``bash benchmarks/gpu_check.sh`` runs this module first.
Every GPU backend, in float32, bfloat16 and float16, on the random cases of ``gca_cases``
(padded, causal 2-d and 3-d masks, keyless rows) and on dense batches: the output, the cosine
and every gradient. The tolerance is the flash-attention rule: the fused error against the
float64 reference is at most twice the eager error in the same dtype, plus a floor. Then the
launch path is captured in a CUDA graph and replayed: it must create no tensor from a Python
scalar and read nothing back to the host.
"""

from __future__ import annotations

import pytest
import torch

import gca_kernels

from ..kernels.gca_cases import CASES, Case, cast_problem, make_problem
from ..kernels.test_gca_backends import floor_for, rel_err, run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

GPU_BACKENDS = [b for b in ("triton", "cuda") if torch.cuda.is_available()
                and b in gca_kernels.available_backends()]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# relative error floors per dtype: a few units of the last place of the output's scale
FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}
DENSE = [Case(8, 50, 50, 64, 2, padding=False), Case(4, 200, 200, 128, 4, padding=False, causal="2d")]


def _on(problem, dtype):
    p = cast_problem(problem, dtype)
    out = dict(p)
    for k in ("x_a", "x_b", "key_padding_mask", "attn_mask"):
        if p.get(k) is not None:
            out[k] = p[k].cuda()
    leaves = {n: t.detach().cuda().requires_grad_(True) for n, t in p["leaves"].items()}
    out["leaves"] = leaves
    out["x_a"], out["x_b"] = leaves.get("x_a", out["x_a"]), leaves.get("x_b", out["x_b"])
    out["params"] = type(p["params"])(*(None if t is None else leaves.get(n, t.cuda())
                                         for n, t in zip(p["params"]._fields, p["params"])))
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES + DENSE, ids=str)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backend_matches_float64_reference(backend, case, dtype):
    base = make_problem(case)
    ref = run(cast_problem(base, torch.float64), "eager")
    eager = run(_on(base, dtype), "eager")
    fused = run(_on(base, dtype), backend)
    for k, r in ref.items():
        r = r.cuda() if r is not None else r
        assert fused[k] is not None and torch.isfinite(fused[k]).all(), f"{backend} {dtype} {k}"
        e = rel_err(fused[k].float(), r, floor_for(k, ref))
        e_eager = rel_err(eager[k].float(), r, floor_for(k, ref))
        assert e <= 2 * e_eager + FLOOR[dtype], f"{backend} {dtype} {k}: {e:.3e} vs eager {e_eager:.3e}"


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_forward_backward_capture_in_a_cuda_graph(backend):
    """Static shapes: a warm-up step, then one captured forward+backward replayed; the replay
    equals an eager call of the same backend bit for bit."""
    case = Case(4, 50, 50, 64, 2, causal="2d")
    p = _on(make_problem(case), torch.bfloat16)
    leaves = list(p["leaves"].values())

    def step():
        y, cos = gca_kernels.gated_cross_attention(
            p["x_a"], p["x_b"], *p["params"][:12], ln_w=p["params"].ln_w, ln_b=p["params"].ln_b,
            key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"],
            n_heads=p["n_heads"], need_alignment=True, backend=backend)
        return (y,) + torch.autograd.grad(y.float().square().sum() + cos.float().sum(), leaves)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            want = step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
