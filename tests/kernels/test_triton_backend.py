"""Triton backend specifics: every output and gradient against the float64 reference on shapes
the shared suite does not use, the multi-block/multi-chunk loops (blocks shrunk to 16), the
attention kernel's o/logsumexp alone, missing upstream gradients, the custom ops under
``opcheck``, and what ``supports`` says.

Runs on the CPU under ``TRITON_INTERPRET=1`` (tests/conftest.py): shapes stay tiny.
"""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

import gca_kernels  # noqa: E402
from gca_kernels.reference import cosine_alignment_ref  # noqa: E402

from .gca_cases import Case, cast_problem, make_problem  # noqa: E402

if "triton" not in gca_kernels.available_backends():
    pytest.skip("triton backend not registered", allow_module_level=True)

from gca_kernels.ops import triton_gca  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# Each listed dimension appears at least once: La != Lb, lengths 1/7/33, d 16/48/80/128,
# heads 1/2/4/8, both activations, LayerNorm on/off, padding, causal 2-D/3-D masks, fully
# masked query rows, fully padded batch rows, d not a power of two with dh not either.
CASES = [
    Case(2, 33, 1, 16, 4, "tanh", layer_norm=False, full_pad_row=True),
    Case(2, 7, 33, 48, 2, "sigmoid", causal="3d", masked_query=True),
    Case(3, 1, 7, 80, 1, "tanh", full_pad_row=True, masked_query=True),
    Case(1, 7, 7, 128, 4, "sigmoid", layer_norm=False, padding=False, causal="2d", gate_hidden=17),
    Case(2, 5, 3, 48, 8, "tanh", causal="2d", gate_hidden=7),
    Case(2, 3, 5, 80, 8, "sigmoid", layer_norm=False, causal="3d", full_pad_row=True),
]


def _call(p, backend="triton"):
    P = p["params"]
    return gca_kernels.gated_cross_attention(
        p["x_a"], p["x_b"], *P[:12], ln_w=P.ln_w, ln_b=P.ln_b,
        key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"], n_heads=p["n_heads"],
        activation=p["activation"], need_alignment=True, backend=backend)


def _outputs_and_grads(p, backend="triton", use_y=True, use_cos=True):
    y, cos = _call(p, backend)
    g = torch.Generator().manual_seed(7)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gc = torch.randn(cos.shape, generator=g, dtype=torch.float64).to(cos.dtype)
    loss = 0
    if use_y:
        loss = loss + (y * gy).sum()
    if use_cos:
        loss = loss + (cos * gc).sum()
    names = list(p["leaves"])
    grads = torch.autograd.grad(loss, list(p["leaves"].values()), allow_unused=True)
    out = {"y": y.detach(), "cos": cos.detach()}
    out.update({"d_" + n: gr for n, gr in zip(names, grads)})
    return out


def _rel(a, ref, scale=None):
    scale = scale if scale is not None else ref.abs().max().item()
    return (a.double() - ref).abs().max().item() / max(scale, 1e-30)


def _assert_matches(out, ref, dtype, what=""):
    for k, r in ref.items():
        assert out[k] is not None, f"{what} no gradient for {k}"
        assert out[k].dtype == dtype, f"{what} {k} came back as {out[k].dtype}"
        assert torch.isfinite(out[k]).all(), f"{what} non-finite {k}"
        # d_bk is zero in exact arithmetic (softmax is shift-invariant): scale by d_bq instead
        scale = ref["d_bq"].abs().max().item() if k == "d_bk" else None
        e = _rel(out[k], r, scale)
        assert e < TOL[dtype], f"{what} {dtype} {k}: rel err {e:.3e}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_every_gradient_match_float64_reference(case):
    base = make_problem(case, seed=3)
    ref = _outputs_and_grads(cast_problem(base, torch.float64), "eager")
    for dtype in (torch.float64, torch.float32):
        _assert_matches(_outputs_and_grads(cast_problem(base, dtype)), ref, dtype, str(case))


@pytest.mark.parametrize("case", [
    Case(2, 37, 41, 40, 2, "tanh", causal="3d", full_pad_row=True, gate_hidden=24),
    Case(1, 20, 70, 32, 1, "sigmoid", layer_norm=False, masked_query=True, gate_hidden=33),
], ids=str)
def test_multi_block_loops(case, monkeypatch):
    """Blocks of 16: several key/query blocks (online-softmax rescaling across blocks, a block
    with no visible key before one with), and gate widths that are not a power of two; the
    weight packing and the column sums over several row and column blocks."""
    monkeypatch.setattr(triton_gca, "_INTERP_MAX_SEQ_BLOCK", 16)
    monkeypatch.setattr(triton_gca, "_INTERP_PACK_BLOCKS", (8, 16))
    monkeypatch.setattr(triton_gca, "_INTERP_SUM_BLOCKS", (4, 16))
    base = make_problem(case, seed=5)
    ref = _outputs_and_grads(cast_problem(base, torch.float64), "eager")
    for dtype in (torch.float64, torch.float32):
        _assert_matches(_outputs_and_grads(cast_problem(base, dtype)), ref, dtype, str(case))


def test_attention_kernel_o_and_logsumexp():
    """The flash-attention kernel alone: o per head and lse against softmax in float64;
    rows with no visible key give o = 0 and lse = +inf."""
    case = Case(2, 9, 6, 48, 4, causal="3d", full_pad_row=True, masked_query=True)
    p = cast_problem(make_problem(case), torch.float64)
    P = p["params"]
    with torch.no_grad():
        out = torch.ops.gca_kernels.triton_gca_fwd(
            p["x_a"], p["x_b"], *P[:12], P.ln_w, P.ln_b, p["key_padding_mask"], p["attn_mask"],
            4, "sigmoid", 1e-5)
    q, kv, o_ext, lse = out[2:6]
    B, La, d = q.shape
    H, dh = 4, 12
    o = o_ext[..., :d]
    qh = q.view(B, La, H, dh).transpose(1, 2)
    kh = kv[..., :d].reshape(B, -1, H, dh).transpose(1, 2)
    vh = kv[..., d:].reshape(B, -1, H, dh).transpose(1, 2)
    s = qh @ kh.transpose(-1, -2) / math.sqrt(dh)
    vis = ~p["key_padding_mask"][:, None, None, :] & ~p["attn_mask"][:, None]
    s = s.masked_fill(~vis, float("-inf"))
    want_lse = torch.logsumexp(s, -1)  # -inf where nothing is visible
    has = vis.any(-1).expand(B, H, La)
    want_o = torch.where(has[..., None], torch.softmax(s.masked_fill(~has[..., None], 0), -1) @ vh, 0)
    torch.testing.assert_close(o.view(B, La, H, dh).transpose(1, 2), want_o, rtol=1e-12, atol=1e-12)
    assert torch.isinf(lse[~has]).all() and (lse[~has] > 0).all()
    torch.testing.assert_close(lse[has], want_lse[has], rtol=1e-12, atol=1e-12)
    assert not has.all() and has.any()  # the case does contain both kinds of rows
    # o's tail [has_key, 0, ...] carries the output projection's bias to rows that saw a key
    assert torch.equal(o_ext[..., d], has[:, 0].to(o_ext.dtype))
    assert torch.count_nonzero(o_ext[..., d + 1:]) == 0


@pytest.mark.parametrize("use_y,use_cos", [(True, False), (False, True)])
def test_one_output_unused(use_y, use_cos):
    """A None upstream gradient (y or cos not in the loss) is treated as zero."""
    case = Case(2, 5, 4, 16, 2, "tanh", causal="2d", full_pad_row=True)
    base = make_problem(case, seed=11)
    ref = _outputs_and_grads(cast_problem(base, torch.float64), "eager", use_y, use_cos)
    out = _outputs_and_grads(cast_problem(base, torch.float64), "triton", use_y, use_cos)
    for k, r in ref.items():
        if r is None:  # e.g. ln_w/ln_b get no gradient from cos alone
            assert out[k] is None or torch.count_nonzero(out[k]) == 0, k
            continue
        scale = ref["d_bq"].abs().max().item() if k == "d_bk" else None
        assert _rel(out[k], r, scale) < 1e-10, k


def test_opcheck_custom_ops():
    case = Case(2, 3, 4, 16, 2, "tanh", causal="2d", full_pad_row=True, gate_hidden=5)
    p = cast_problem(make_problem(case), torch.float64)
    P = p["params"]
    args = (p["x_a"], p["x_b"], *P[:12], P.ln_w, P.ln_b, p["key_padding_mask"], p["attn_mask"],
            2, "tanh", 1e-5)
    torch.library.opcheck(torch.ops.gca_kernels.triton_gca_fwd.default, args)
    nolns = (*args[:14], None, None, p["key_padding_mask"], None, 2, "sigmoid", 1e-5)
    torch.library.opcheck(torch.ops.gca_kernels.triton_gca_fwd.default, nolns)
    with torch.no_grad():
        y, cos, *saved = torch.ops.gca_kernels.triton_gca_fwd(*args)
    det = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
    x_a, x_b, wq, bq, wk, bk, wv, bv, wo, bo, w1, b1, w2, b2, ln_w, ln_b, kpm, am = det[:18]
    bwd_args = (torch.randn_like(y), torch.randn_like(cos), x_a, x_b, wo, w1, w2, ln_w, kpm, am,
                saved, 2, "tanh", 1e-5)
    torch.library.opcheck(torch.ops.gca_kernels.triton_gca_bwd.default, bwd_args)
    with torch.no_grad():  # without LayerNorm: the flat bias gradient is shorter
        y, cos, *saved = torch.ops.gca_kernels.triton_gca_fwd(*nolns)
    nolns_bwd = (torch.randn_like(y), torch.randn_like(cos), x_a, x_b, wo, w1, w2, None, kpm,
                 None, saved, 2, "sigmoid", 1e-5)
    torch.library.opcheck(torch.ops.gca_kernels.triton_gca_bwd.default, nolns_bwd)

    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    yy = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    torch.library.opcheck(torch.ops.gca_kernels.triton_cos_fwd.default, (x, yy, mask, True))
    torch.library.opcheck(torch.ops.gca_kernels.triton_cos_fwd.default, (x, yy, None, False))
    torch.library.opcheck(torch.ops.gca_kernels.triton_cos_bwd.default,
                          (torch.tensor(0.7, dtype=torch.float64), x.detach(), yy.detach(), mask, True))


@pytest.mark.parametrize("shape", [(3, 5, 100), (70, 3), (2, 0, 8)], ids=str)
def test_cosine_reduction_other_shapes(shape):
    """d not a power of two and > 64, many rows in one block, 3-D masks, and no row at all."""
    g = torch.Generator().manual_seed(2)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    y64 = -0.3 * x64 + torch.randn(*shape, generator=g, dtype=torch.float64)
    mask = torch.rand(shape[:-1], generator=g) < 0.6
    for absolute in (True, False):
        xr, yr = x64.clone().requires_grad_(True), y64.clone().requires_grad_(True)
        ref = cosine_alignment_ref(xr, yr, mask, absolute)
        gref = torch.autograd.grad(ref, (xr, yr))
        for dtype in (torch.float64, torch.float32):
            x = x64.to(dtype).requires_grad_(True)
            y = y64.to(dtype).requires_grad_(True)
            out = gca_kernels.cosine_alignment(x, y, mask=mask, absolute=absolute, backend="triton")
            assert out.dtype == dtype and out.dim() == 0
            grads = torch.autograd.grad(out, (x, y))
            assert abs(out.item() - ref.item()) <= TOL[dtype] * max(abs(ref.item()), 1e-3)
            for gr, r in zip(grads, gref):
                assert torch.isfinite(gr).all()
                if r.numel():
                    assert _rel(gr, r, max(r.abs().max().item(), 1e-12)) < TOL[dtype]


def test_compile_fullgraph_no_graph_break():
    """The custom ops trace as single nodes: no graph break, and the compiled module's outputs
    and gradients equal the uncompiled ones."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = gca_kernels.FusedGCA(16, n_heads=2, activation="sigmoid", layer_norm=False, backend="triton")
    x_a, x_b = torch.randn(2, 3, 16, requires_grad=True), torch.randn(2, 4, 16)
    am = torch.triu(torch.ones(3, 4, dtype=torch.bool), diagonal=1)
    y0, c0 = m(x_a, x_b, attn_mask=am, need_alignment=True)
    g0 = torch.autograd.grad(y0.sum() + gca_kernels.cosine_alignment(x_a, y0, backend="triton"), x_a)[0]
    explain = torch._dynamo.explain(lambda a, b: m(a, b, attn_mask=am, need_alignment=True))(x_a, x_b)
    assert explain.graph_break_count == 0, explain.break_reasons
    compiled = torch.compile(
        lambda a, b: m(a, b, attn_mask=am, need_alignment=True), fullgraph=True, backend="aot_eager")
    y1, c1 = compiled(x_a, x_b)
    g1 = torch.autograd.grad(y1.sum() + gca_kernels.cosine_alignment(x_a, y1, backend="triton"), x_a)[0]
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(c1, c0, rtol=0, atol=0)
    torch.testing.assert_close(g1, g0, rtol=1e-6, atol=1e-6)


def test_supports_says_why():
    s = triton_gca.supports
    assert s(torch.device("cpu"), torch.float32) is None  # the interpreter is on in tests
    assert s(torch.device("cpu"), torch.float64) is None
    assert "float32/float64" in s(torch.device("cpu"), torch.bfloat16)
    assert s(torch.device("cuda"), torch.bfloat16) is None
    assert s(torch.device("cuda"), torch.float16) is None
    assert "not supported" in s(torch.device("cuda"), torch.int32)
    assert "meta" in s(torch.device("meta"), torch.float32)


def test_supports_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = triton_gca.supports(torch.device("cpu"), torch.float32)
    assert why is not None and "TRITON_INTERPRET=1" in why
    with pytest.raises(gca_kernels.BackendUnavailableError, match="TRITON_INTERPRET"):
        gca_kernels.cosine_alignment(torch.ones(2, 3), torch.ones(2, 3), backend="triton")


def test_inputs_unchanged_by_call():
    """The ops declare mutates_args=(): every input is bitwise unchanged after forward+backward."""
    case = Case(2, 4, 5, 16, 1, causal="2d")
    p = cast_problem(make_problem(case), torch.float32)
    before = {k: v.detach().clone() for k, v in p["leaves"].items()}
    _outputs_and_grads(p)
    for k, v in p["leaves"].items():
        assert torch.equal(v.detach(), before[k]), k


@pytest.mark.parametrize("blocks", [(8, 16), (64, 64)], ids=str)
@pytest.mark.parametrize("d,n", [(4, 3), (16, 33), (40, 24)], ids=str)
def test_pack_weights_layouts(d, n, blocks, monkeypatch):
    """The packed buffer holds [Wk ; Wv], [bk | bv], [Wo | bo | 0] and [W1a ; Wq] exactly, for
    d below and above the packing's column block and 4d + n + 1 rows below and above its row
    block (d = 4: the bias row 2d is narrower than Wo's d + 8)."""
    monkeypatch.setattr(triton_gca, "_INTERP_PACK_BLOCKS", blocks)
    g = torch.Generator().manual_seed(d + n)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    wq, wk, wv, wo, w1 = r(d, d), r(d, d), r(d, d), r(d, d), r(n, 2 * d)
    bk, bv, bo = r(d), r(d), r(d)
    wkv, bkv, wo_ext, w1q = triton_gca._unpack(
        triton_gca._pack_weights(wq, wk, wv, wo, w1, bk, bv, bo), d, n)
    assert torch.equal(wkv, torch.cat([wk, wv]))
    assert torch.equal(bkv, torch.cat([bk, bv]))
    assert torch.equal(wo_ext, torch.cat([wo, bo[:, None], torch.zeros(d, 7, dtype=wo.dtype)], 1))
    assert torch.equal(w1q, torch.cat([w1[:, :d], wq]))


@pytest.mark.parametrize("sums", [(4, 16), (256, 256)], ids=str)
def test_column_sums_of_partial_blocks(sums, monkeypatch):
    """One launch reduces four (P, C) blocks of different shapes into their concatenated
    column sums, with P and C below and above the kernel's blocks."""
    monkeypatch.setattr(triton_gca, "_INTERP_SUM_BLOCKS", sums)
    shapes = [(3, 5), (1, 16), (37, 40), (9, 1)]
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(p, c, generator=g, dtype=torch.float64) for p, c in shapes]
    ws = torch.cat([t.reshape(-1) for t in parts])
    out = triton_gca._column_sums(ws, shapes, torch.float32)
    want = torch.cat([t.sum(0) for t in parts]).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
