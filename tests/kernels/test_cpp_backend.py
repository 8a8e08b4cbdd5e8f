"""The C++ (CPU) backend on its own: every operator output and gradient against the float64
reference over a wide case grid, gradcheck, opcheck of the custom ops, determinism,
torch.compile, and the argument checks of the compiled entry points.

Skipped (with the reason) when the extension is not built; build it with
``python setup.py build_ext --inplace``.
"""

from __future__ import annotations

import gc

import pytest
import torch

import gca_kernels
from gca_kernels.backends import resolve
from gca_kernels.reference import cosine_alignment_ref

from .gca_cases import Case, cast_problem, make_problem

if "cpp" not in gca_kernels.available_backends():
    from gca_kernels.backends import _LOAD_ERRORS

    pytest.skip(f"cpp backend not built: {_LOAD_ERRORS.get('cpp')}", allow_module_level=True)

from gca_kernels import _C  # noqa: E402

# La != Lb, odd lengths, d in {16, 20, 48, 80, 96, 128}, 1..8 heads, both activations, LN on/off,
# padding, 2-D/3-D causal masks, fully masked query rows, fully padded batch rows. The head
# widths (2 to 128) take every path of the attention tiles: whole pairs of 16-column chunks, a
# single chunk after them (dh 48), and the scalar tail of widths that are not a multiple of 16.
CASES = [
    Case(2, 1, 7, 16, 1),
    Case(2, 7, 1, 16, 2, "tanh"),
    Case(3, 33, 7, 48, 4, "sigmoid", layer_norm=False, causal="2d"),
    Case(2, 7, 33, 80, 8, "tanh", causal="3d", full_pad_row=True),
    Case(2, 33, 33, 128, 2, "sigmoid", causal="2d", masked_query=True),
    Case(2, 7, 7, 128, 1, "tanh", layer_norm=False, padding=False),
    Case(3, 9, 33, 48, 2, "tanh", causal="3d", masked_query=True, full_pad_row=True, gate_hidden=20),
    Case(2, 33, 1, 80, 4, "sigmoid", full_pad_row=True),
    Case(1, 7, 9, 16, 8, "sigmoid", layer_norm=False, masked_query=True),
    Case(3, 37, 35, 96, 2, "sigmoid", causal="3d", masked_query=True),
    # d 20: the key/value transposes take 16 x 16 register tiles and an element-wise tail
    # (4 columns forward, 8 backward), over three key tiles, the last one partial
    Case(2, 9, 37, 20, 2, "tanh", causal="2d", masked_query=True),
]


def run(p, backend, seed=1):
    y, cos = gca_kernels.gated_cross_attention(
        p["x_a"], p["x_b"], *p["params"][:12], ln_w=p["params"].ln_w, ln_b=p["params"].ln_b,
        key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"], n_heads=p["n_heads"],
        activation=p["activation"], need_alignment=True, backend=backend)
    g = torch.Generator().manual_seed(seed)
    gy = torch.randn(y.shape, generator=g, dtype=torch.float64).to(y.dtype)
    gc = torch.randn(cos.shape, generator=g, dtype=torch.float64).to(cos.dtype)
    grads = torch.autograd.grad((y * gy).sum() + (cos * gc).sum(), list(p["leaves"].values()))
    return {"y": y.detach(), "cos": cos.detach(), **{"d_" + k: v for k, v in zip(p["leaves"], grads)}}


def rel_err(a, ref, scale=None):
    s = scale if scale is not None else ref.abs().max().item()
    return (a.double() - ref).abs().max().item() / max(s, 1e-30)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_every_gradient_match_float64_reference(case):
    base = make_problem(case)
    ref = run(cast_problem(base, torch.float64), "eager")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        out = run(cast_problem(base, dtype), "cpp")
        assert set(out) == set(ref)
        for k, r in ref.items():
            assert out[k].dtype == dtype and torch.isfinite(out[k]).all(), k
            # d_bk is zero in theory (softmax is shift-invariant): judge its noise on d_bq's scale
            scale = ref["d_bq"].abs().max().item() if k == "d_bk" else None
            e = rel_err(out[k], r, scale)
            assert e < tol, f"{dtype} {k}: rel err {e:.2e} >= {tol:.0e}"


def left_padded_problem(lengths, L, d, heads, activation="sigmoid", layer_norm=True,
                        mask="2d", seed=0):
    """Histories like the backbones' batches: batch row b has its last lengths[b] keys unpadded
    (0 = every key padded), and a causal cross mask (query t sees keys <= t; "3d": one shift
    per batch row). Big enough (>= 128 rows) for the compact-row path of the cpp backend."""
    B = len(lengths)
    p = make_problem(Case(B, L, L, d, heads, activation, layer_norm, padding=False), seed=seed)
    lengths = torch.tensor(lengths)
    p["key_padding_mask"] = torch.arange(L)[None, :] < (L - lengths)[:, None]
    if mask is None:
        p["attn_mask"] = None
    else:
        causal = torch.ones(L, L, dtype=torch.bool).triu(1)
        if mask == "3d":
            causal = torch.stack([torch.roll(causal, shifts=b % 3, dims=1) for b in range(B)])
        p["attn_mask"] = causal
    return p


COMPACT_CASES = {
    # keyless rows everywhere, one batch row fully padded, one not padded at all
    "mixed": dict(lengths=[0, 40, 7, 23, 1, 31, 12, 40], L=40, d=32, heads=2),
    "mixed-3d-tanh-noln": dict(lengths=[5, 0, 17, 3, 9, 0], L=24, d=48, heads=4,
                               activation="tanh", layer_norm=False, mask="3d"),
    # heads wider than 64 on the compact path (query rows in groups of four): dh 128, and dh 72
    # (not a multiple of the 16-wide register blocks)
    "wide-head": dict(lengths=[0, 30, 7, 23, 1, 30], L=30, d=128, heads=1),
    "wide-head-odd-3d": dict(lengths=[5, 0, 17, 3, 9, 24, 12], L=24, d=144, heads=2,
                             activation="tanh", mask="3d"),
    # padded keys, no mask: every query row with an unpadded key is active (dense queries,
    # compact keys)
    "keys-only": dict(lengths=[5, 30, 12, 30, 20, 30], L=30, d=32, heads=2, mask=None),
    # no padding and no mask: every row active, the dense path
    "dense": dict(lengths=[30] * 6, L=30, d=32, heads=1, mask=None),
    # one fully padded batch row among 12: above the active fraction that compaction needs
    "dense-one-empty-row": dict(lengths=[20] * 11 + [0], L=20, d=16, heads=2, mask=None),
    # over 1,024 active rows (1,652 of 2,048): the weight gradients take their two half-row
    # products side by side
    "many-rows": dict(lengths=[40 + (7 * b) % 25 for b in range(32)], L=64, d=16, heads=2),
}


@pytest.mark.parametrize("name", list(COMPACT_CASES))
def test_compact_rows_match_float64_reference(name):
    base = left_padded_problem(**COMPACT_CASES[name])
    ref = run(cast_problem(base, torch.float64), "eager")
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        out = run(cast_problem(base, dtype), "cpp")
        for k, r in ref.items():
            assert torch.isfinite(out[k]).all(), k
            scale = ref["d_bq"].abs().max().item() if k == "d_bk" else None
            e = rel_err(out[k], r, scale)
            assert e < tol, f"{name} {dtype} {k}: rel err {e:.2e} >= {tol:.0e}"
    # padded keys get exactly zero gradient, keyless query rows get exactly LN(x_a)
    p32 = cast_problem(base, torch.float32)
    out = run(p32, "cpp")
    kpm, am = base["key_padding_mask"], base["attn_mask"]
    assert (out["d_x_b"][kpm] == 0).all()
    L = kpm.shape[1]
    blocked = kpm[:, None, :].expand(-1, L, -1) if am is None else (kpm[:, None, :] | am)
    keyless = blocked.all(-1)
    P = p32["params"]
    za = p32["x_a"].detach()
    ln = za if P.ln_w is None else torch.nn.functional.layer_norm(
        za, za.shape[-1:], P.ln_w.detach(), P.ln_b.detach(), 1e-5)
    torch.testing.assert_close(out["y"][keyless], ln[keyless], rtol=1e-5, atol=1e-5)
    assert (out["cos"][keyless] == 0).all()


def _gathers(p):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run(p, "cpp")
    return sum(e.count for e in prof.key_averages() if e.key == "gca::gather_rows")


def test_compact_path_taken_only_when_rows_are_skipped():
    # The accuracy tests above would pass on the dense path too: check which one ran. The
    # forward gathers x_a's active rows and x_b's unpadded ones and hands them to the backward,
    # which gathers nothing again (one forward + backward here).
    expected = {"mixed": 2, "keys-only": 1, "dense": 0, "dense-one-empty-row": 0}
    for name, n in expected.items():
        p = cast_problem(left_padded_problem(**COMPACT_CASES[name]), torch.float32)
        assert _gathers(p) == n, name


def test_compact_rows_deterministic_bitwise():
    base = left_padded_problem(**COMPACT_CASES["mixed-3d-tanh-noln"])
    a = run(cast_problem(base, torch.float32), "cpp")
    b = run(cast_problem(base, torch.float32), "cpp")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_scratch_memory_is_reused_across_calls_without_aliasing_results():
    # The temporaries live in per-thread scratch slots kept between calls. Calls of different
    # sizes in turn (slots grow, then serve smaller requests) must give exactly what a call
    # from freed scratch gives, and nothing a call returns may be overwritten by the next one.
    problems = [cast_problem(left_padded_problem(**COMPACT_CASES[n]), torch.float32)
                for n in ("mixed", "mixed-3d-tanh-noln", "keys-only", "dense")]
    fresh = []
    for p in problems:
        _C.release_workspace()
        assert _C.workspace_bytes() == 0
        fresh.append(run(p, "cpp"))
    kept = [run(p, "cpp") for p in problems * 2]
    assert _C.workspace_bytes() > 0
    snapshot = [{k: v.clone() for k, v in out.items()} for out in kept]
    for _ in range(2):  # later calls write the slots again
        run(problems[1], "cpp")
        run(problems[0], "cpp")
    for i, out in enumerate(kept):
        for k in out:
            assert torch.equal(out[k], fresh[i % len(problems)][k]), (i, k)
            assert torch.equal(out[k], snapshot[i][k]), (i, k)
    held = _C.workspace_bytes()
    assert gca_kernels.release_cpu_workspace() == held
    assert _C.workspace_bytes() == 0 and gca_kernels.release_cpu_workspace() == 0


def test_recycled_outputs_never_alias_live_tensors_and_come_back_once_dropped():
    # Outputs, gradients and saved intermediates of 64 KiB and more come from a per-thread pool
    # (recycled_empty in csrc/cpu_memory.cpp): a buffer is handed out again only once nothing
    # refers to it, and then instead of a fresh allocation.
    p = cast_problem(left_padded_problem(**COMPACT_CASES["wide-head"]), torch.float32)
    gca_kernels.release_cpu_workspace()
    first = run(p, "cpp")
    assert max(v.numel() * v.element_size() for v in first.values()) >= 64 << 10
    snapshot = {k: v.clone() for k, v in first.items()}
    second = run(p, "cpp")  # every tensor of the first call is still alive
    # (untyped_storage() gives the storage a Python object of its own: this must not keep
    # the memory from coming back either)
    storages = lambda out: {v.untyped_storage().data_ptr() for v in out.values()}  # noqa: E731
    assert not storages(first) & storages(second)
    for k in first:
        assert torch.equal(first[k], snapshot[k]), k
        assert torch.equal(second[k], snapshot[k]), k
    held = _C.workspace_bytes()
    del first
    third = run(p, "cpp")  # takes the first call's memory back: the pool does not grow
    assert _C.workspace_bytes() == held
    assert not storages(second) & storages(third)
    for k in third:
        assert torch.equal(third[k], snapshot[k]), k
    # storages stay resizable, like at::empty's
    y = third.pop("y")
    y.resize_(2 * y.numel())
    assert torch.equal(y[: snapshot["y"].numel()].view_as(snapshot["y"]), snapshot["y"])
    assert gca_kernels.release_cpu_workspace() == held and _C.workspace_bytes() == 0
    assert torch.equal(second["d_x_a"], snapshot["d_x_a"])  # released blocks live on in use


def test_recycled_blocks_of_a_shape_no_longer_used_are_dropped():
    # A free block that no request has taken for 4,096 requests leaves the pool, also when the
    # calls in between need nothing new (a training shape, then evaluation at another).
    # one more batch row, fully padded: the same active rows (so the same scratch slots, which
    # keep the largest size seen), other output sizes
    case = COMPACT_CASES["wide-head"]
    old = cast_problem(left_padded_problem(**case), torch.float32)
    new = cast_problem(left_padded_problem(**dict(case, lengths=case["lengths"] + [0])),
                       torch.float32)
    gca_kernels.release_cpu_workspace()
    run(new, "cpp")
    run(new, "cpp")
    only_new = _C.workspace_bytes()
    gca_kernels.release_cpu_workspace()
    for _ in range(2):
        run(old, "cpp")
    for _ in range(2):
        run(new, "cpp")
    assert _C.workspace_bytes() > only_new  # both shapes' blocks are kept for now
    for _ in range(400):  # ~16 pooled requests per forward + backward: > 4,096 + 256
        run(new, "cpp")
        # free what Python reference cycles hold at once: otherwise the pool grows now and
        # then until the collector runs, and growing also drops idle blocks (the young
        # generations are enough, and much faster than a full collection)
        gc.collect(1)
        if _C.workspace_bytes() == only_new:
            break
    assert _C.workspace_bytes() == only_new


@pytest.mark.parametrize("case", [Case(2, 3, 4, 8, 2, "tanh", causal="3d", full_pad_row=True),
                                  Case(1, 4, 3, 6, 1, "sigmoid", layer_norm=False, masked_query=True)],
                         ids=str)
def test_gradcheck(case):
    p = cast_problem(make_problem(case), torch.float64)
    names = list(p["leaves"])
    P = p["params"]._asdict()

    def fn(*leaves):
        d = dict(zip(names, leaves))
        return gca_kernels.gated_cross_attention(
            d["x_a"], d["x_b"], **{k: d.get(k, P[k]) for k in P},
            key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"],
            n_heads=p["n_heads"], activation=p["activation"], need_alignment=True, backend="cpp")

    assert torch.autograd.gradcheck(fn, tuple(p["leaves"].values()), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_auto_picks_cpp_on_cpu():
    assert resolve("auto", torch.device("cpu"), torch.float32).name == "cpp"
    assert resolve("auto", torch.device("cpu"), torch.float64).name == "cpp"


def test_rejects_half_precision_with_a_reason():
    with pytest.raises(gca_kernels.BackendUnavailableError, match="float32 and float64"):
        resolve("cpp", torch.device("cpu"), torch.bfloat16)


def test_fully_masked_rows():
    case = Case(3, 6, 5, 16, 2, full_pad_row=True, masked_query=True)
    p = cast_problem(make_problem(case), torch.float32)
    out = run(p, "cpp")
    assert all(torch.isfinite(v).all() for v in out.values())
    P = p["params"]
    ln = torch.nn.functional.layer_norm(p["x_a"].detach(), (16,), P.ln_w.detach(), P.ln_b.detach(), 1e-5)
    torch.testing.assert_close(out["y"][0], ln[0], rtol=1e-5, atol=1e-5)  # every key padded
    torch.testing.assert_close(out["y"][:, 0], ln[:, 0], rtol=1e-5, atol=1e-5)  # row sees nothing
    assert (out["cos"][0] == 0).all() and (out["cos"][:, 0] == 0).all()
    # x' is exactly 0 there: the output bias must receive nothing from those rows
    only_masked = make_problem(Case(1, 2, 3, 16, 1, padding=False))
    only_masked["key_padding_mask"] = torch.ones(1, 3, dtype=torch.bool)
    g = run(cast_problem(only_masked, torch.float64), "cpp")
    assert torch.equal(g["d_bo"], torch.zeros_like(g["d_bo"]))
    assert torch.equal(g["d_wq"], torch.zeros_like(g["d_wq"]))


def test_deterministic_bitwise():
    base = make_problem(Case(3, 17, 13, 48, 4, "tanh", causal="3d", full_pad_row=True))
    a = run(cast_problem(base, torch.float32), "cpp")
    b = run(cast_problem(base, torch.float32), "cpp")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _op_args(case, dtype=torch.float64):
    p = cast_problem(make_problem(case), dtype)
    P = p["params"]
    leaves = [p["x_a"], p["x_b"], list(P[:12]), P.ln_w, P.ln_b]
    return leaves, p


@pytest.mark.parametrize("case", [Case(2, 3, 4, 8, 2, causal="2d"),
                                  Case(2, 4, 3, 8, 1, "tanh", layer_norm=False, padding=False)], ids=str)
def test_opcheck_gca(case):
    leaves, p = _op_args(case)
    am = p["attn_mask"]
    am = am[None] if am is not None and am.dim() == 2 else am  # the op takes (Bm, La, Lb)
    args = (*leaves, p["key_padding_mask"], am, p["n_heads"],
            0 if p["activation"] == "sigmoid" else 1, 1e-5)
    torch.library.opcheck(torch.ops.gca_kernels.cpp_gca_fwd.default, args)


def test_opcheck_cosine():
    x = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(9, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(9) < 0.6
    torch.library.opcheck(torch.ops.gca_kernels.cpp_cos_fwd.default, (x, y, mask, True))
    torch.library.opcheck(torch.ops.gca_kernels.cpp_cos_fwd.default, (x, y, None, False))


def test_compile_fullgraph_forward_and_backward():
    torch._dynamo.reset()
    m = gca_kernels.FusedGCA(24, n_heads=3, activation="sigmoid", backend="cpp").double()
    x_a = torch.randn(2, 5, 24, dtype=torch.float64, requires_grad=True)
    x_b = torch.randn(2, 7, 24, dtype=torch.float64)
    kpm = torch.rand(2, 7) < 0.3
    causal = torch.ones(5, 7, dtype=torch.bool).triu(1)
    y0, c0 = m(x_a, x_b, kpm, causal, need_alignment=True)
    g0 = torch.autograd.grad(y0.sum() + c0.sum(), [x_a, *m.parameters()])
    y1, c1 = torch.compile(m, fullgraph=True)(x_a, x_b, kpm, causal, need_alignment=True)
    g1 = torch.autograd.grad(y1.sum() + c1.sum(), [x_a, *m.parameters()])
    torch.testing.assert_close(y1, y0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(c1, c0, rtol=1e-12, atol=1e-12)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# float32 takes sixteen rows at a time: d of whole 16-column blocks, with a partial block, or
# shorter than one; row counts that end in a partial group; d <= 64 (grouped backward) or not
@pytest.mark.parametrize("shape", [(1, 1), (7, 16), (1000, 48), (3, 33, 80), (5, 37, 20), (300, 64)], ids=str)
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_cosine_alignment(shape, absolute, masked):
    g = torch.Generator().manual_seed(0)
    x64 = torch.randn(*shape, generator=g, dtype=torch.float64)
    y64 = 0.3 * x64 + torch.randn(*shape, generator=g, dtype=torch.float64)
    y64.view(-1, shape[-1])[0] = 0  # a zero row: cos = 0, finite gradient
    mask = (torch.rand(shape[:-1], generator=g) < 0.6) if masked else None
    x64.requires_grad_(True), y64.requires_grad_(True)
    ref = cosine_alignment_ref(x64, y64, mask, absolute)
    rx, ry = torch.autograd.grad(ref * 0.7, (x64, y64))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = x64.detach().to(dtype).requires_grad_(True)
        y = y64.detach().to(dtype).requires_grad_(True)
        out = gca_kernels.cosine_alignment(x, y, mask=mask, absolute=absolute, backend="cpp")
        assert out.dim() == 0 and out.dtype == dtype
        gx, gy = torch.autograd.grad(out * 0.7, (x, y))
        assert abs(out.item() - ref.item()) <= tol * max(abs(ref.item()), 1e-3)
        assert rel_err(gx, rx) < tol and rel_err(gy, ry) < tol


def test_cosine_without_grad_matches_with_grad():
    # under no_grad (a probe) no autograd node is recorded: same value
    x, y = torch.randn(4, 50, 64), torch.randn(4, 50, 64)
    mask = torch.rand(4, 50) < 0.5
    with torch.no_grad():
        v0 = gca_kernels.cosine_alignment(x, y, mask=mask, backend="cpp")
    assert v0.grad_fn is None
    v1 = gca_kernels.cosine_alignment(x.requires_grad_(True), y, mask=mask, backend="cpp")
    assert v1.grad_fn is not None and torch.equal(v0, v1.detach())


def test_cosine_bitwise_across_thread_counts():
    x = torch.randn(3000, 40, requires_grad=True)
    y = torch.randn(3000, 40, requires_grad=True)
    mask = torch.rand(3000) < 0.5
    old = torch.get_num_threads()
    outs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            v = gca_kernels.cosine_alignment(x, y, mask=mask, backend="cpp")
            outs.append((v.detach(), *torch.autograd.grad(v, (x, y))))
    finally:
        torch.set_num_threads(old)
    for a, b in zip(*outs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("uses", ["y+cos", "y", "cos"])
def test_gca_under_compile_matches_eager_bitwise(uses):
    # one custom op for eager and compiled calls: the same numbers, including when only one of
    # the two outputs feeds the loss (the other's gradient arrives as None, taken as zero), on
    # the compact path (>= 128 rows, about half of them keyless)
    torch._dynamo.reset()
    p = cast_problem(make_problem(Case(8, 24, 20, 16, 2, causal="2d", full_pad_row=True)), torch.float32)

    def fwd_bwd(x_a, x_b, *params):
        y, cos = gca_kernels.gated_cross_attention(
            x_a, x_b, *params[:12], ln_w=params[12], ln_b=params[13],
            key_padding_mask=p["key_padding_mask"], attn_mask=p["attn_mask"], n_heads=p["n_heads"],
            activation=p["activation"], need_alignment=True, backend="cpp")
        return y, cos

    leaves = list(p["leaves"].values())

    def run(f):
        y, cos = f(*leaves)
        loss = {"y+cos": (y * y).sum() + cos.sum(), "y": (y * y).sum(), "cos": cos.sum()}[uses]
        return y, cos, torch.autograd.grad(loss, leaves, allow_unused=True)

    y0, c0, g0 = run(fwd_bwd)
    y1, c1, g1 = run(torch.compile(fwd_bwd, fullgraph=True))
    assert torch.equal(y0, y1) and torch.equal(c0, c1)
    for name, a, b in zip(p["leaves"], g0, g1):
        assert (a is None) == (b is None), name
        assert a is None or torch.equal(a, b), name


# --- argument checks of the compiled entry points (called directly, bypassing functional.py)

def _raw_args(B=2, La=3, Lb=4, d=8, hid=8, dtype=torch.float32):
    t = lambda *s: torch.randn(*s, dtype=dtype)  # noqa: E731
    return [t(B, La, d), t(B, Lb, d), [t(d, d), t(d), t(d, d), t(d), t(d, d), t(d), t(d, d), t(d),
            t(hid, 2 * d), t(hid), t(d, hid), t(d)], t(d), t(d), None, None, 2, 0, 1e-5]


def _set_weight(i, value):
    return lambda a: a[2].__setitem__(i, value)


@pytest.mark.parametrize("mutate, message", [
    (lambda a: a.__setitem__(0, a[0].double()), "x_a has dtype Double"),
    (lambda a: a.__setitem__(0, a[0].long()), "x_a has dtype Long"),
    (lambda a: a[2].__setitem__(0, a[2][0].double()), "wq has dtype Double"),
    (lambda a: a.__setitem__(1, torch.randn(3, 4, 8)), r"x_b must have shape \[2, 4, 8\]"),
    (_set_weight(2, torch.randn(8, 7)), r"wk must have shape \[8, 8\]"),
    (_set_weight(9, torch.randn(9)), r"b1 must have shape \[8\]"),
    (lambda a: a.__setitem__(0, torch.randn(2, 8, 3).transpose(1, 2)), "x_a .* must be contiguous"),
    (lambda a: a.__setitem__(0, torch.randn(6, 8)), r"x_a must be \(B, La, d\)"),
    (lambda a: a.__setitem__(5, torch.zeros(2, 5, dtype=torch.bool)), r"key_padding_mask must have shape \(B, Lb\)"),
    (lambda a: a.__setitem__(5, torch.zeros(2, 4)), "key_padding_mask must be a bool tensor"),
    (lambda a: a.__setitem__(6, torch.zeros(3, 3, 4, dtype=torch.bool)), "attn_mask must have shape"),
    (lambda a: a.__setitem__(7, 3), "n_heads=3 must divide d=8"),
    (lambda a: a.__setitem__(8, 5), "activation code"),
    (lambda a: a.__setitem__(4, None), "ln_w and ln_b must both be given"),
])
def test_entry_point_argument_checks(mutate, message):
    args = _raw_args()
    _C.gca_fwd(*args)  # the unmodified call is valid
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        _C.gca_fwd(*args)


def test_entry_point_rejects_meta_device_and_bad_backward_shapes():
    args = _raw_args()
    meta = list(args)
    meta[0] = torch.empty(2, 3, 8, device="meta")
    with pytest.raises(RuntimeError, match="x_a must be a CPU tensor"):
        _C.gca_fwd(*meta)
    outs = _C.gca_fwd(*args)
    y = outs[0]
    with pytest.raises(RuntimeError, match=r"dy must have shape"):
        _C.gca_bwd(torch.randn(2, 3, 7), torch.randn(2, 3), *args[:7], outs[2:], 2, 0, 1e-5)
    bad_lse = [*outs[2:5], torch.zeros(6, 3), *outs[6:]]
    with pytest.raises(RuntimeError, match=r"lse .*shape"):
        _C.gca_bwd(torch.randn_like(y), torch.randn(2, 3), *args[:7], bad_lse, 2, 0, 1e-5)
    with pytest.raises(RuntimeError, match=r"saved must hold the forward's 11 intermediates"):
        _C.gca_bwd(torch.randn_like(y), torch.randn(2, 3), *args[:7], outs[2:-1], 2, 0, 1e-5)
    with pytest.raises(RuntimeError, match=r"weights must hold 12 tensors"):
        _C.gca_fwd(args[0], args[1], args[2][:11], *args[3:])


def test_cosine_entry_point_checks():
    x, y = torch.randn(5, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match=r"y must have shape \[5, 4\]"):
        _C.cos_fwd(x, torch.randn(5, 3), None, True)
    with pytest.raises(RuntimeError, match="mask must be a bool tensor"):
        _C.cos_fwd(x, y, torch.ones(5), True)
    with pytest.raises(RuntimeError, match="supports Float/Double"):
        _C.cos_fwd(x.half(), y.half(), None, True)
    with pytest.raises(RuntimeError, match=r"x must be \(\.\.\., d\)"):
        _C.cos_fwd(torch.tensor(1.0), torch.tensor(1.0), None, True)
    with pytest.raises(RuntimeError, match=r"mask must have x's shape without its last dimension, \[2, 5\]"):
        _C.cos_fwd(torch.randn(2, 5, 4), torch.randn(2, 5, 4), torch.ones(10, dtype=torch.bool), True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cosine_extension_flattens_leading_dims(dtype):
    # (..., d) inputs go to the extension as they are; the results must be those of the same
    # rows flattened to (rows, d), bit for bit
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(3, 7, 20, generator=g, dtype=dtype), torch.randn(3, 7, 20, generator=g, dtype=dtype)
    m = torch.rand(3, 7, generator=g) > 0.4
    go = torch.tensor(0.7, dtype=dtype)
    assert torch.equal(_C.cos_fwd(x, y, m, True), _C.cos_fwd(x.reshape(-1, 20), y.reshape(-1, 20), m.reshape(-1), True))
    dx, dy = _C.cos_bwd(go, x, y, m, True)
    dx2, dy2 = _C.cos_bwd(go, x.reshape(-1, 20), y.reshape(-1, 20), m.reshape(-1), True)
    assert dx.shape == x.shape and dy.shape == y.shape
    assert torch.equal(dx.reshape(-1, 20), dx2) and torch.equal(dy.reshape(-1, 20), dy2)
