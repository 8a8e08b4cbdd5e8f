"""The CUDA extension's backend (``backend="cuda"``) against the float64 reference, on a GPU.

Skipped without a CUDA device or without the built extension. Every dtype (float64 to 1e-10;
float32, bfloat16 and float16 under the flash-attention rule: at most twice the eager error in
the same dtype plus a floor), on padded batches with causal masks and keyless rows, on dense
batches, at head sizes up to the backend's limit (256: the tiled attention's largest shared
memory) and with more rows than one chunk of the LayerNorm-parameter reduction; bitwise
determinism run to run.
"""

from __future__ import annotations

import pytest
import torch

import gca_kernels

from .gca_cases import CASES, Case, cast_problem, make_problem
from .test_gca_backends import floor_for, rel_err, run

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in gca_kernels.available_backends(),
    reason="needs a CUDA GPU and the built CUDA extension (gca_kernels._C_cuda)")

FLOOR = {torch.float32: 2e-6, torch.bfloat16: 2e-2, torch.float16: 3e-3}
# dense batches; 300 query rows (three LayerNorm chunks and a partial one); heads of 256 (the
# limit), of 96 (not a multiple of 32) and of 8 (most lanes idle); more keys than one tile
EXTRA = [Case(4, 50, 50, 64, 2, padding=False),
         Case(6, 50, 70, 128, 4, padding=False, causal="2d"),
         Case(2, 33, 40, 256, 1, causal="3d", full_pad_row=True),
         Case(3, 17, 65, 96, 1, "tanh", masked_query=True),
         Case(2, 9, 33, 16, 2, layer_norm=False)]


def _on_gpu(problem, dtype):
    p = cast_problem(problem, dtype)
    out = dict(p)
    for k in ("key_padding_mask", "attn_mask"):
        if p.get(k) is not None:
            out[k] = p[k].cuda()
    leaves = {n: t.detach().cuda().requires_grad_(True) for n, t in p["leaves"].items()}
    out["leaves"] = leaves
    out["x_a"], out["x_b"] = leaves["x_a"], leaves["x_b"]
    out["params"] = type(p["params"])(*(None if t is None else leaves.get(n, t.cuda())
                                         for n, t in zip(p["params"]._fields, p["params"])))
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES + EXTRA, ids=str)
def test_cuda_matches_float64_reference(case, dtype):
    base = make_problem(case)
    ref = {k: v.cuda() for k, v in run(cast_problem(base, torch.float64), "eager").items()}
    fused = run(_on_gpu(base, dtype), "cuda")
    eager = None if dtype == torch.float64 else run(_on_gpu(base, dtype), "eager")
    for k, r in ref.items():
        assert fused[k] is not None and fused[k].dtype == dtype, k
        assert torch.isfinite(fused[k]).all(), f"cuda {dtype}: non-finite {k}"
        e = rel_err(fused[k], r, floor_for(k, ref))
        if dtype == torch.float64:
            assert e < 1e-10, f"cuda float64 {k}: rel err {e:.3e}"
        else:
            e_eager = rel_err(eager[k], r, floor_for(k, ref))
            assert e <= 2 * e_eager + FLOOR[dtype], f"cuda {dtype} {k}: {e:.3e} vs eager {e_eager:.3e}"


def test_cuda_is_deterministic():
    p = _on_gpu(make_problem(Case(8, 40, 45, 64, 2, causal="2d", full_pad_row=True)), torch.float32)
    a, b = run(p, "cuda"), run(p, "cuda")
    for k in a:
        assert torch.equal(a[k], b[k]), k
