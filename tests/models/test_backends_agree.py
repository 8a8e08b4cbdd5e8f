"""Each backbone, with GCA at every position, gives the same loss and gradients whichever
`gca_backend` runs the operator. The batches are wide enough (more than 128 query rows per
GCA call, about half of them padding) that the C++ backend takes its row-compacted path,
which skips padded keys and keyless query rows in its products: a wrong skip shows here as a
loss or gradient that no longer matches the eager reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import gca_kernels
import models
from tests.models.helpers import N_A, N_B, random_timelines, train_batch

if "cpp" not in gca_kernels.available_backends():
    from gca_kernels.backends import _LOAD_ERRORS

    pytest.skip(f"cpp backend not built: {_LOAD_ERRORS.get('cpp')}", allow_module_level=True)

SETUPS = {
    "abxi": ({"hidden": 16, "n_heads": 2, "ffn_inner": 24, "lora_rank_d": 4, "lora_rank_i": 4,
              "max_len": 12, "n_neg": 8, "gca_heads": 2}, [0, 1, 2]),
    "cdsrnp": ({"hidden": 16, "ffn_inner": 16, "latent": 4, "set_hidden": 12, "n_neg": 6,
                "max_len": 12, "gca_heads": 2}, [0, 1]),
}


def _pair(name, tmp_path):
    cfg, positions = SETUPS[name]
    built = {}
    for backend in ("eager", "cpp"):
        torch.manual_seed(0)
        m = models.build_model(name, N_A, N_B, dict(cfg, gca_positions=positions, gca_backend=backend))
        built[backend] = m
    built["cpp"].load_state_dict(built["eager"].state_dict())
    return built["eager"], built["cpp"]


@pytest.mark.parametrize("name", sorted(SETUPS))
def test_loss_and_gradients_match_eager(name, tmp_path):
    rng = np.random.default_rng(3)
    # short random histories in a 13-wide timeline: many padded keys and keyless query rows
    timelines = random_timelines(32, 13, rng, min_len=2)
    eager, cpp = _pair(name, tmp_path)
    batch = train_batch(timelines, eager.n_negatives, rng)
    results = []
    for m in (eager, cpp):
        torch.manual_seed(1)  # same latent samples (CDSRNP) and negatives in both runs
        loss, _ = m.loss(batch)
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in m.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    for k, g in grads_e.items():
        torch.testing.assert_close(grads_c[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the GCA parameters really were trained through the operator
    assert any(grads_c[k].abs().sum() > 0 for k in grads_c if k.startswith("gca."))
