"""Mixed precision as users set it up: float32 parameters, ``torch.autocast`` around the
forward. The documented behaviour (README, "Mixed precision"):

- every backend returns y and cos in the autocast dtype, like ``nn.MultiheadAttention``;
- the GPU backends (triton, cuda) and eager compute in the autocast dtype (float32
  accumulation inside the fused kernels); the cpp backend, which has no half-precision
  kernels, computes in float32;
- ``cosine_alignment`` computes in and returns float32, like torch's ``cosine_similarity``;
- parameter gradients are float32; float64 inputs are left alone, as torch's autocast does.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import gca_kernels
from tests.usage.common import DEVICES, fused_backends, make_batch, num_threads

# the autocast dtypes each device type supports, with the tolerance of results that passed
# through that dtype (relative to the largest reference value)
DTYPES = {"cpu": [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)],
          "cuda": [(torch.bfloat16, 3e-2), (torch.float16, 4e-3)]}


class LinearThenGCA(nn.Module):
    """The standard mixed-precision pattern: an nn.Linear (which autocast runs in half) feeding
    FusedGCA, whose own parameters stay float32."""

    def __init__(self, d, heads, backend):
        super().__init__()
        self.emb = nn.Embedding(97, d)
        self.lin = nn.Linear(d, d)
        self.gca = gca_kernels.FusedGCA(d, heads, backend=backend)

    def forward(self, batch):
        x_a, x_b = self.lin(self.emb(batch["ids_a"])), self.lin(self.emb(batch["ids_b"]))
        return self.gca(x_a, x_b, key_padding_mask=batch["kpm"], attn_mask=batch["am"], need_alignment=True)


def _cases():
    for device in DEVICES:
        # (triton on the CPU is its interpreter, a test vehicle without half precision)
        for backend in ["eager"] + [b for b in fused_backends(device) if b != "triton" or device != "cpu"]:
            for dtype, tol in DTYPES[device]:
                yield pytest.param(device, backend, dtype, tol, id=f"{device}-{backend}-{str(dtype)[6:]}")


@pytest.mark.parametrize("device,backend,dtype,tol", list(_cases()))
@pytest.mark.parametrize("mask", ["dense", "left_causal"])
def test_autocast_matches_float32_reference(device, backend, dtype, tol, mask):
    small = backend == "triton" and device == "cpu"
    B, L, d = (3, 6, 16) if small else (32, 50, 64)
    torch.manual_seed(0)
    model = LinearThenGCA(d, 2, backend).to(device)
    ref = LinearThenGCA(d, 2, "eager").to(device)
    ref.load_state_dict(model.state_dict())
    batch = make_batch(B, L, L, d, mask, device=device, seed=2)
    w = torch.randn(B, L, d, device=device)

    y_ref, cos_ref = ref(batch)
    ((y_ref * w).sum() + cos_ref.sum()).backward()
    with num_threads(2), torch.autocast(device, dtype=dtype):
        y, cos = model(batch)
        assert y.dtype == dtype and cos.dtype == dtype, (y.dtype, cos.dtype)
        loss = (y.float() * w).sum() + cos.float().sum()
    loss.backward()

    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.float(), y_ref, rtol=tol, atol=tol * scale)
    torch.testing.assert_close(cos.float(), cos_ref, rtol=tol, atol=tol)
    # gradients pass through half-precision products (the Linear, and the GCA's own on
    # half-precision backends): the error norm within a few times the dtype's tolerance of
    # each gradient's norm; the key bias's gradient is 0 in exact arithmetic (softmax ignores
    # a constant added to a row's scores), so it is held to the model's largest gradient norm
    top = max(p.grad.norm().item() for p in ref.parameters())
    for (name, p), (_, p_ref) in zip(model.named_parameters(), ref.named_parameters()):
        assert p.grad.dtype == torch.float32, name
        g_scale = p_ref.grad.norm().item()
        g_scale = top if g_scale < 1e-6 * top else g_scale
        err = (p.grad - p_ref.grad).norm().item() / g_scale
        assert err <= 8 * tol, f"{name}: relative gradient error {err:.3g}"


@pytest.mark.parametrize("device", DEVICES)
def test_cosine_alignment_under_autocast_is_float32(device):
    x = torch.randn(40, 16, device=device, requires_grad=True)
    y = torch.randn(40, 16, device=device, dtype=torch.bfloat16)
    with torch.autocast(device, dtype=torch.bfloat16):
        c = gca_kernels.cosine_alignment(x, y)
    assert c.dtype == torch.float32
    torch.testing.assert_close(c, gca_kernels.cosine_alignment(x.detach(), y.float()))
    c.backward()
    assert x.grad.dtype == torch.float32


def test_float64_is_left_alone_under_autocast():
    gca = gca_kernels.FusedGCA(16, 2).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = gca(x, x)
    assert y.dtype == torch.float64
    torch.testing.assert_close(y, gca(x, x))


def test_without_autocast_mixed_dtypes_still_fail_in_one_line():
    gca = gca_kernels.FusedGCA(16, 2)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="wq has dtype torch.float32 but x_a has dtype torch.bfloat16"):
        gca(x, x)
