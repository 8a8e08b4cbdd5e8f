"""Every GCA backend against the float64 eager reference: output, cosine and every gradient.

Runs each registered backend (eager; triton under TRITON_INTERPRET=1; cpp where built) over
the random cases of ``gca_cases``. Errors are relative to the reference's largest magnitude
(per tensor); float32 must also stay within twice the eager float32 error plus a floor (the
flash-attention rule), which keeps the bound meaningful for every shape.
"""

from __future__ import annotations

import pytest
import torch

import gca_kernels
from gca_kernels.reference import gated_cross_attention_ref

from .gca_cases import CASES, GRADCHECK_CASES, Case, cast_problem, make_problem

CPU_BACKENDS = [b for b in gca_kernels.available_backends() if b in ("eager", "triton", "cpp")]
FUSED_CPU_BACKENDS = [b for b in CPU_BACKENDS if b != "eager"]


def run(problem, backend, grad_seed=1):
    """Forward with `backend`, backward of a random linear function of (y, cos)."""
    p = problem
    y, cos = gca_kernels.gated_cross_attention(
        p["x_a"], p["x_b"], *p["params"][:12], ln_w=p["params"].ln_w, ln_b=p["params"].ln_b,
        key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"], n_heads=p["n_heads"],
        activation=p["activation"], need_alignment=True, backend=backend)
    g = torch.Generator().manual_seed(grad_seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gc = torch.randn(cos.shape, generator=g, dtype=torch.float64).to(cos.dtype)
    leaves = list(p["leaves"].values())
    grads = torch.autograd.grad((y * gy).sum() + (cos * gc).sum(), leaves, allow_unused=True)
    out = {"y": y.detach(), "cos": cos.detach()}
    for name, gr in zip(p["leaves"], grads):
        out["d_" + name] = gr
    return out


def rel_err(a, ref, floor=1e-30):
    scale = max(ref.abs().max().item(), floor, 1e-30)
    return (a.double() - ref).abs().max().item() / scale


def floor_for(key, ref):
    # d_bk is exactly zero in theory (softmax ignores a constant added to a row's scores):
    # measure its rounding noise against its sibling d_bq's scale instead of against zero.
    return ref["d_bq"].abs().max().item() if key == "d_bk" else 1e-30


@pytest.fixture(scope="module")
def reference_cache():
    return {}


def reference(case: Case, cache):
    if case not in cache:
        base = make_problem(case)
        cache[case] = (base, run(cast_problem(base, torch.float64), "eager"))
    return cache[case]


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_float64_reference(backend, case, reference_cache):
    base, ref = reference(case, reference_cache)
    # float64: the same maths, only the summation order may differ
    out64 = run(cast_problem(base, torch.float64), backend)
    for k, r in ref.items():
        assert out64[k] is not None, f"{backend}: no gradient for {k}"
        assert torch.isfinite(out64[k]).all(), f"{backend}: non-finite {k}"
        e = rel_err(out64[k], r, floor_for(k, ref))
        assert e < 1e-10, f"{backend} float64 {k}: rel err {e:.3e}"
    # float32: within rounding of the reference, and no worse than eager float32 (x2 + floor)
    out32 = run(cast_problem(base, torch.float32), backend)
    eager32 = out32 if backend == "eager" else run(cast_problem(base, torch.float32), "eager")
    for k, r in ref.items():
        assert out32[k].dtype == torch.float32, f"{backend}: {k} came back as {out32[k].dtype}"
        assert torch.isfinite(out32[k]).all(), f"{backend}: non-finite {k} in float32"
        e, e_eager = rel_err(out32[k], r, floor_for(k, ref)), rel_err(eager32[k], r, floor_for(k, ref))
        assert e < 1e-5, f"{backend} float32 {k}: rel err {e:.3e} (eager {e_eager:.3e})"
        assert e <= 2 * e_eager + 2e-6, f"{backend} float32 {k}: rel err {e:.3e} vs eager {e_eager:.3e}"


def test_reference_is_what_the_contract_says():
    """The oracle itself, checked on one row by hand-written maths (single head, no masks)."""
    case = Case(1, 2, 3, 4, 1, padding=False)
    p = make_problem(case)
    P = p["params"]
    y, cos = gated_cross_attention_ref(p["x_a"], p["x_b"], *P[:12], ln_w=P.ln_w, ln_b=P.ln_b)
    xa, xb = p["x_a"][0, 1], p["x_b"][0]
    q = P.wq @ xa + P.bq
    k = xb @ P.wk.T + P.bk
    v = xb @ P.wv.T + P.bv
    s = k @ q / 2.0
    prob = torch.exp(s - s.max()) / torch.exp(s - s.max()).sum()
    xp = P.wo @ (prob @ v) + P.bo
    h = torch.clamp(P.w1[:, :4] @ xa + P.w1[:, 4:] @ xp + P.b1, min=0)
    g = torch.sigmoid(P.w2 @ h + P.b2)
    z = xa + g * xp
    want = (z - z.mean()) / torch.sqrt(z.var(unbiased=False) + 1e-5) * P.ln_w + P.ln_b
    torch.testing.assert_close(y[0, 1], want)
    torch.testing.assert_close(cos[0, 1], xa @ xp / (xa.norm() * xp.norm()))


@pytest.mark.parametrize("case", GRADCHECK_CASES, ids=str)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_float64(backend, case):
    p = cast_problem(make_problem(case), torch.float64)
    names = list(p["leaves"])
    P = p["params"]._asdict()

    def fn(*leaves):
        d = dict(zip(names, leaves))
        kw = {k: d.get(k, P[k]) for k in P}
        y, cos = gca_kernels.gated_cross_attention(
            d["x_a"], d["x_b"], **kw, key_padding_mask=p["key_padding_mask"],
            attn_mask=p["attn_mask"], n_heads=p["n_heads"], activation=p["activation"],
            need_alignment=True, backend=backend)
        return y, cos

    # The Triton interpreter costs ~0.1 s a call: check a random projection of the Jacobian
    # (fast mode) there, the full Jacobian elsewhere.
    assert torch.autograd.gradcheck(fn, tuple(p["leaves"].values()), eps=1e-6, atol=1e-6, rtol=1e-5,
                                    fast_mode=backend == "triton")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fully_masked_rows_are_layernorm_of_x_a_and_finite(backend):
    case = Case(3, 6, 5, 16, 2, causal=None, full_pad_row=True, masked_query=True)
    p = cast_problem(make_problem(case), torch.float32)
    out = run(p, backend)
    for k, v in out.items():
        assert torch.isfinite(v).all(), f"{k} has NaN/inf"
    P = p["params"]
    ln = torch.nn.functional.layer_norm(p["x_a"].detach(), (16,), P.ln_w.detach(), P.ln_b.detach(), 1e-5)
    # batch row 0: every key padded; row 0 of every batch: attn_mask blocks all keys
    torch.testing.assert_close(out["y"][0], ln[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["y"][:, 0], ln[:, 0], rtol=1e-5, atol=1e-5)
    assert (out["cos"][0] == 0).all() and (out["cos"][:, 0] == 0).all()


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_deterministic_bitwise(backend):
    case = Case(2, 9, 11, 48, 4, causal="2d", full_pad_row=True)
    base = make_problem(case)
    a = run(cast_problem(base, torch.float32), backend)
    b = run(cast_problem(base, torch.float32), backend)
    for k in a:
        assert torch.equal(a[k], b[k]), f"{backend}: {k} differs between two identical runs"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_noncontiguous_inputs(backend):
    case = Case(2, 5, 6, 16, 2)
    base = cast_problem(make_problem(case), torch.float32)
    ref = run(base, backend)
    # same values, transposed storage
    p = dict(base)
    xa_t = base["x_a"].detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_(True)
    xb_t = base["x_b"].detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True)
    assert not xa_t.is_contiguous() and not xb_t.is_contiguous()
    p["x_a"], p["x_b"] = xa_t, xb_t
    p["leaves"] = {**base["leaves"], "x_a": xa_t, "x_b": xb_t}
    out = run(p, backend)
    for k in ref:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_compile_fullgraph_matches_eager(backend):
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = gca_kernels.FusedGCA(32, n_heads=2, activation="tanh", backend=backend)
    x_a, x_b = torch.randn(2, 6, 32, requires_grad=True), torch.randn(2, 5, 32)
    kpm = torch.tensor([[False] * 5, [False, False, True, True, True]])
    want_y, want_c = m(x_a, x_b, key_padding_mask=kpm, need_alignment=True)
    (want_y.sum() + want_c.sum()).backward()
    want_grad = x_a.grad.clone()
    x_a.grad = None

    compiled = torch.compile(m, fullgraph=True, backend="aot_eager" if backend == "triton" else "inductor")
    y, c = compiled(x_a, x_b, key_padding_mask=kpm, need_alignment=True)
    (y.sum() + c.sum()).backward()
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c, want_c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_a.grad, want_grad, rtol=1e-5, atol=1e-5)
