"""The fused cosine-alignment reduction of every backend against the float64 reference."""

from __future__ import annotations

import pytest
import torch

import gca_kernels
from gca_kernels.reference import cosine_alignment_ref

BACKENDS = [b for b in gca_kernels.available_backends() if b in ("eager", "triton", "cpp")]

SHAPES = [(1, 1, 1), (2, 7, 16), (3, 33, 48), (2, 5, 80), (4, 9, 128), (1, 300, 7)]


def _problem(shape, dtype, seed=0, masked=True, absolute=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    # y correlated with x so cosines spread over (-1, 1), and a zero row (cos = 0, no NaN)
    y = 0.5 * x + torch.randn(*shape, generator=g, dtype=torch.float64)
    y.view(-1, shape[-1])[0] = 0
    mask = (torch.rand(shape[:-1], generator=g) < 0.7) if masked else None
    return x.to(dtype), y.to(dtype), mask


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("absolute", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_value_and_grads(backend, shape, absolute):
    x64, y64, mask = _problem(shape, torch.float64)
    x64.requires_grad_(True), y64.requires_grad_(True)
    ref = cosine_alignment_ref(x64, y64, mask, absolute)
    gx_ref, gy_ref = torch.autograd.grad(ref * 1.7, (x64, y64))
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        x = x64.detach().to(dtype).requires_grad_(True)
        y = y64.detach().to(dtype).requires_grad_(True)
        out = gca_kernels.cosine_alignment(x, y, mask=mask, absolute=absolute, backend=backend)
        assert out.dim() == 0 and out.dtype == dtype
        gx, gy = torch.autograd.grad(out * 1.7, (x, y))
        assert abs(out.item() - ref.item()) <= tol * max(abs(ref.item()), 1e-3)
        for g, r in ((gx, gx_ref), (gy, gy_ref)):
            assert torch.isfinite(g).all()
            err = (g.double() - r).abs().max().item() / max(r.abs().max().item(), 1e-12)
            assert err < tol, f"{backend} {dtype}: grad rel err {err:.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_valid_row_gives_zero(backend):
    x = torch.randn(2, 3, 8, requires_grad=True)
    out = gca_kernels.cosine_alignment(x, x * 2, mask=torch.zeros(2, 3, dtype=torch.bool), backend=backend)
    assert out.item() == 0.0
    out.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("backend", BACKENDS)
def test_known_values(backend):
    x = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    y = torch.tensor([[0.0, 3.0], [-2.0, -2.0], [1.0, 1.0]])
    # cosines: 0 (orthogonal), -1 (opposite), 1/sqrt(2)
    got = gca_kernels.cosine_alignment(x, y, backend=backend)
    torch.testing.assert_close(got, torch.tensor((0 + 1 + 2 ** -0.5) / 3))
    got = gca_kernels.cosine_alignment(x, y, mask=torch.tensor([True, False, True]), absolute=False, backend=backend)
    torch.testing.assert_close(got, torch.tensor((0 + 2 ** -0.5) / 2))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck(backend):
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    assert torch.autograd.gradcheck(
        lambda a, b: gca_kernels.cosine_alignment(a, b, mask=mask, backend=backend), (x, y))
