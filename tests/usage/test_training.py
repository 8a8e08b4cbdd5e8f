"""Training as users run it: a ``torch.compile(fullgraph=True)`` model stepped by an optimiser,
and a two-process DistributedDataParallel step, each on dense batches of 1,600 query rows."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.usage.common import CrossDomainModel, clone_as, fused_backends, make_batch, num_threads, run


@pytest.mark.parametrize("mask", ["dense"])
def test_compiled_training_step(mask):
    backends = fused_backends("cpu")
    if not backends:
        pytest.skip("no fused CPU backend")
    torch.manual_seed(0)
    base = CrossDomainModel(64, 2, backend="eager")
    batch = make_batch(32, 50, 50, 64, mask, seed=1)
    for backend in backends:
        eager, comp = clone_as(base, backend, torch.float32), clone_as(base, backend, torch.float32)
        compiled = torch.compile(comp, fullgraph=True, dynamic=False)
        opt_e = torch.optim.Adam(eager.parameters(), lr=1e-2)
        opt_c = torch.optim.Adam(comp.parameters(), lr=1e-2)
        with num_threads(2):
            for step in range(2):
                for m, model, opt in ((eager, eager, opt_e), (comp, compiled, opt_c)):
                    opt.zero_grad()
                    loss, _ = model(batch["ids_a"], batch["ids_b"], batch["kpm"], batch["am"])
                    loss.backward()
                    opt.step()
                for (k, p), (_, q) in zip(eager.named_parameters(), comp.named_parameters()):
                    torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6,
                                               msg=lambda msg, k=k: f"{backend} step {step} {k}: {msg}")


def _ddp_worker(rank, world, init_file, out_file, backend):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        # "linear": every parameter takes part (DDP skips the all-reduce of unused ones)
        model = clone_as(CrossDomainModel(64, 2, backend="eager", inputs="linear"), backend, torch.float32)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        batch = make_batch(32, 50, 50, 64, "left_causal", seed=9)
        # this rank's half of the batch rows (the causal mask is shared by all rows)
        half = {k: v if v is None or k == "am" else v[rank * 16:(rank + 1) * 16] for k, v in batch.items()}
        loss, _ = ddp(half["ids_a"], half["ids_b"], half["kpm"], half["am"])
        loss.backward()
        if rank == 0:
            torch.save({k: p.grad for k, p in model.named_parameters()}, out_file)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo file store test on Linux")
def test_two_process_ddp_step(tmp_path):
    """Each rank takes half the batch; DDP's averaged gradients equal the one-process gradients
    of the whole batch (the loss is a mean over equal halves)."""
    backends = fused_backends("cpu")
    if not backends:
        pytest.skip("no fused CPU backend")
    backend = backends[0]
    out = tmp_path / "grads.pt"
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "init"), str(out), backend), nprocs=2,
                       join=True, start_method="spawn")
    got = torch.load(out)
    torch.manual_seed(0)
    model = clone_as(CrossDomainModel(64, 2, backend="eager", inputs="linear"), backend, torch.float32)
    want = run(model, make_batch(32, 50, 50, 64, "left_causal", seed=9))
    for k, g in got.items():
        torch.testing.assert_close(g, want[k], rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
