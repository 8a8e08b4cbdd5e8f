"""The layer at the edges users reach: empty batches, one-element sequences, shapes changing
from call to call, two Python threads sharing one module, state dicts moved between backends."""

from __future__ import annotations

import threading

import pytest
import torch

import gca_kernels
from tests.usage.common import (CrossDomainModel, check_against_reference, clone_as,
                                fused_backends, make_batch, num_threads, run)

BACKENDS = ["eager"] + fused_backends("cpu", small=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("B,La,Lb", [(0, 5, 7), (3, 0, 4), (3, 4, 0), (0, 0, 0)])
def test_empty_batch_or_sequence(backend, B, La, Lb):
    """Like torch's layers: empty inputs give empty outputs; with no key at all every row has
    x' = 0, so y = LayerNorm(x_a); backward gives zero (never NaN) parameter gradients."""
    gca = gca_kernels.FusedGCA(16, 2, backend=backend)
    x_a = torch.randn(B, La, 16, requires_grad=True)
    x_b = torch.randn(B, Lb, 16, requires_grad=True)
    y, cos = gca(x_a, x_b, key_padding_mask=torch.zeros(B, Lb, dtype=torch.bool), need_alignment=True)
    assert y.shape == (B, La, 16) and cos.shape == (B, La)
    if Lb == 0 and B * La > 0:
        torch.testing.assert_close(y, gca.norm(x_a))
        assert (cos == 0).all()
    (y.sum() + cos.sum()).backward()
    for name, p in gca.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if Lb == 0 or B * La == 0:
            if not name.startswith("norm"):
                assert (p.grad == 0).all(), name
    assert x_a.grad.shape == x_a.shape and x_b.grad.shape == x_b.shape


@pytest.mark.parametrize("backend", BACKENDS[1:])
@pytest.mark.parametrize("La,Lb", [(1, 1), (1, 9), (9, 1)])
@pytest.mark.parametrize("mask", ["dense", "padded"])
def test_length_one(backend, La, Lb, mask):
    torch.manual_seed(0)
    model = CrossDomainModel(16, 2, backend="eager")
    check_against_reference(model, backend, make_batch(200 if backend != "triton" else 3, La, Lb, 16, mask),
                            what=f"{backend} La{La} Lb{Lb} {mask}")


def test_shapes_change_from_call_to_call():
    """One module, one optimiser, batches of changing B, La, Lb and masks (the C++ backend
    keeps buffers sized by earlier calls): every step matches the reference run in lockstep."""
    torch.manual_seed(0)
    base = CrossDomainModel(32, 2, backend="eager")
    seq = [(64, 50, 50, "dense"), (3, 7, 5, "padded"), (40, 20, 33, "left_causal"),
           (64, 50, 50, "causal"), (1, 1, 1, "dense"), (128, 10, 12, "padded"), (64, 50, 50, "dense")]
    for backend in fused_backends("cpu"):
        fused, ref = clone_as(base, backend, torch.float32), clone_as(base, "eager", torch.float64)
        opt_f = torch.optim.SGD(fused.parameters(), lr=0.5)
        opt_r = torch.optim.SGD(ref.parameters(), lr=0.5)
        with num_threads(2):
            for i, (B, La, Lb, mask) in enumerate(seq):
                batch = make_batch(B, La, Lb, 32, mask, seed=i)
                got, want = run(fused, batch), run(ref, batch)
                for k in want:
                    torch.testing.assert_close(got[k].double(), want[k], rtol=2e-4, atol=2e-5,
                                               msg=lambda m, k=k: f"{backend} step {i} {k}: {m}")
                opt_f.step()
                opt_r.step()


def test_two_python_threads_share_one_module():
    """Two threads calling one module at once (e.g. a data-parallel evaluation loop, a web
    server): each result equals the same call made alone."""
    torch.manual_seed(0)
    for backend in fused_backends("cpu"):
        model = CrossDomainModel(32, 2, backend=backend)
        batches = [make_batch(48, 30, 30, 32, m, seed=s) for s, m in enumerate(["dense", "left_causal"] * 3)]
        alone = [run(model, b) for b in batches]
        results, errors = [None] * len(batches), []

        def work(i):
            try:
                for _ in range(3):
                    b = batches[i]
                    with torch.no_grad():
                        _, y = model(b["ids_a"], b["ids_b"], b["kpm"], b["am"])
                    results[i] = y
            except Exception as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(batches))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for i, want in enumerate(alone):
            torch.testing.assert_close(results[i], want["y"], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_between_backends():
    """A model trained on one backend loads into another (and into a plain eager module) and
    computes the same function."""
    torch.manual_seed(0)
    names = ["eager"] + fused_backends("cpu")
    batch = make_batch(32, 20, 20, 32, "left_causal", seed=1)
    src = CrossDomainModel(32, 2, backend=names[-1])
    with torch.no_grad():
        for p in src.parameters():
            p.add_(0.01 * torch.randn_like(p))
    want = run(src, batch)["y"]
    for name in names:
        dst = CrossDomainModel(32, 2, backend=name)
        dst.load_state_dict(src.state_dict())
        assert set(dst.state_dict()) == set(src.state_dict())
        torch.testing.assert_close(run(dst, batch)["y"], want, rtol=1e-5, atol=1e-5)
