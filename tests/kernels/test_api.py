"""Public API: FusedGCA's parameters, backend selection, and every bad-input error."""

from __future__ import annotations

import pytest
import torch

import gca_kernels
from gca_kernels.backends import BackendUnavailableError, resolve


def _module_and_inputs(d=16, heads=2, **kw):
    m = gca_kernels.FusedGCA(d, n_heads=heads, backend="eager", **kw)
    return m, torch.randn(2, 5, d), torch.randn(2, 7, d)


def test_parameter_names_and_shapes_follow_the_contract():
    m = gca_kernels.FusedGCA(48, n_heads=4)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {
        "q_proj.weight": (48, 48), "q_proj.bias": (48,), "k_proj.weight": (48, 48), "k_proj.bias": (48,),
        "v_proj.weight": (48, 48), "v_proj.bias": (48,), "out_proj.weight": (48, 48), "out_proj.bias": (48,),
        "gate_fc1.weight": (48, 96), "gate_fc1.bias": (48,), "gate_fc2.weight": (48, 48), "gate_fc2.bias": (48,),
        "norm.weight": (48,), "norm.bias": (48,),
    }
    m2 = gca_kernels.FusedGCA(48, gate_hidden=20, layer_norm=False, ln_eps=1e-6)
    assert m2.norm is None and m2.gate_fc1.weight.shape == (20, 96) and m2.gate_fc2.weight.shape == (48, 20)


def test_layer_norm_off_gives_plain_residual():
    m, xa, xb = _module_and_inputs(layer_norm=False)
    y, cos = m(xa, xb, need_alignment=True)
    assert y.shape == xa.shape and cos.shape == (2, 5)
    # with the gate forced shut (sigmoid(-inf) = 0) y must equal x_a exactly
    with torch.no_grad():
        m.gate_fc2.bias.fill_(-1e4)
        m.gate_fc2.weight.zero_()
    torch.testing.assert_close(m(xa, xb), xa)


def test_available_backends_and_auto():
    avail = gca_kernels.available_backends()
    assert avail[0] == "eager" and set(avail) <= set(gca_kernels.BACKEND_NAMES)
    want = "cpp" if "cpp" in avail else "eager"
    assert resolve("auto", torch.device("cpu"), torch.float32).name == want


def test_env_override_and_forced_backends(monkeypatch):
    monkeypatch.setenv("GCA_BACKEND", "eager")
    assert resolve("auto", torch.device("cpu"), torch.float32).name == "eager"
    monkeypatch.setenv("GCA_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="backend must be"):
        resolve("auto", torch.device("cpu"), torch.float32)
    monkeypatch.delenv("GCA_BACKEND")
    # no CUDA extension can exist on a CPU-only torch
    if "cuda" not in gca_kernels.available_backends():
        with pytest.raises(BackendUnavailableError, match="'cuda' is not available"):
            resolve("cuda", torch.device("cpu"), torch.float32)


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    if "triton" not in gca_kernels.available_backends():
        pytest.skip("triton backend not available on this machine")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(BackendUnavailableError, match="cannot serve"):
        resolve("triton", torch.device("cpu"), torch.float32)


def test_module_rejects_bad_construction():
    with pytest.raises(ValueError, match="n_heads"):
        gca_kernels.FusedGCA(10, n_heads=3)
    with pytest.raises(ValueError, match="activation"):
        gca_kernels.FusedGCA(8, activation="relu")
    with pytest.raises(ValueError, match="backend"):
        gca_kernels.FusedGCA(8, backend="fast")
    with pytest.raises(ValueError, match="d_model"):
        gca_kernels.FusedGCA(0)


@pytest.mark.parametrize("bad, exc, match", [
    (lambda xa, xb: (xa[:1], xb, {}), ValueError, "same batch size"),
    (lambda xa, xb: (xa, xb[..., :8], {}), ValueError, "same feature size"),
    (lambda xa, xb: (xa[0], xb, {}), ValueError, r"x_a must be \(B, La, d\)"),
    (lambda xa, xb: (xa, xb, {"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}), ValueError, "key_padding_mask must have shape"),
    (lambda xa, xb: (xa, xb, {"key_padding_mask": torch.zeros(2, 7)}), TypeError, "key_padding_mask must be a bool"),
    (lambda xa, xb: (xa, xb, {"attn_mask": torch.zeros(5, 6, dtype=torch.bool)}), ValueError, "attn_mask must have shape"),
    (lambda xa, xb: (xa, xb, {"attn_mask": torch.zeros(3, 5, 7, dtype=torch.bool)}), ValueError, "attn_mask must have shape"),
    (lambda xa, xb: (xa, xb, {"attn_mask": torch.zeros(5, 7, dtype=torch.int64)}), TypeError, "attn_mask must be a bool"),
    (lambda xa, xb: (xa.long(), xb, {}), TypeError, "x_a must be a floating"),
    (lambda xa, xb: (xa, xb.double(), {}), TypeError, "x_b has dtype"),
    (lambda xa, xb: (xa, xb.to("meta"), {}), ValueError, "x_b is on meta"),
])
def test_bad_inputs_name_the_argument(bad, exc, match):
    m, xa, xb = _module_and_inputs()
    a, b, kw = bad(xa, xb)
    with pytest.raises(exc, match=match):
        m(a, b, **kw)


def test_weight_shape_errors_name_the_weight():
    xa, xb = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    w = [torch.randn(8, 8), torch.randn(8)] * 4 + [torch.randn(8, 16), torch.randn(8), torch.randn(8, 8), torch.randn(8)]
    w[8] = torch.randn(8, 12)  # gate_fc1 must take 2d = 16 inputs
    with pytest.raises(ValueError, match=r"w1 must have shape \(8, 16\)"):
        gca_kernels.gated_cross_attention(xa, xb, *w)
    w[8] = torch.randn(8, 16)
    with pytest.raises(ValueError, match="n_heads=3 must divide d=8"):
        gca_kernels.gated_cross_attention(xa, xb, *w, n_heads=3)
    with pytest.raises(ValueError, match="ln_w and ln_b"):
        gca_kernels.gated_cross_attention(xa, xb, *w, ln_w=torch.ones(8))


def test_cosine_alignment_errors():
    x = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="same shape"):
        gca_kernels.cosine_alignment(x, x[:, :2])
    with pytest.raises(TypeError, match="mask must be a bool"):
        gca_kernels.cosine_alignment(x, x, mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"mask must have shape"):
        gca_kernels.cosine_alignment(x, x, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="x must be a floating"):
        gca_kernels.cosine_alignment(x.long(), x.long())
