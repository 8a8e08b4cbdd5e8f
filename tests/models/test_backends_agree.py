"""Each backbone, with GCA at every position, gives the same training objective (its loss + the
alignment regulariser) and gradients, the same evaluation scores and the same alignment probe
whichever `gca_backend` runs the operator, at 2 threads, on two kinds of batch:

- "padded": short random histories in a 13-wide timeline (about half the keys padding, many
  keyless query rows): the C++ backend takes its row-compacted path;
- "dense": full-length timelines of 96 users (1,152 query rows per GCA call, nearly every row
  sees a key): the dense path, with the weight-gradient products split over two threads
  (from 1,024 rows), which is where dense training once crashed.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import gca_kernels
import models
from tests.models.helpers import N_A, N_B, eval_batch, random_timelines, train_batch

if "cpp" not in gca_kernels.available_backends():
    from gca_kernels.backends import _LOAD_ERRORS

    pytest.skip(f"cpp backend not built: {_LOAD_ERRORS.get('cpp')}", allow_module_level=True)

SETUPS = {
    "sasrec": ({"hidden": 16, "max_len": 12, "ffn_inner": 24, "n_neg": 3, "dropout": 0.0,
                "gca_heads": 2}, [0, 1]),
    "abxi": ({"hidden": 16, "n_heads": 2, "ffn_inner": 24, "lora_rank_d": 4, "lora_rank_i": 4,
              "max_len": 12, "n_neg": 8, "gca_heads": 2}, [0, 1, 2]),
    "cdsrnp": ({"hidden": 16, "ffn_inner": 16, "latent": 4, "set_hidden": 12, "n_neg": 6,
                "max_len": 12, "gca_heads": 2}, [0, 1]),
    "llm4cdsr": ({"hidden": 16, "ffn_inner": 16, "global_dim": 24, "adapter_hidden": 20,
                  "max_len": 12, "gca_heads": 2, "dropout": 0.0}, [0, 1, 2]),
}
BATCHES = {"padded": (32, 2), "dense": (96, 13)}  # users, shortest history (width 13)


def _pair(name, tmp_path):
    cfg, positions = SETUPS[name]
    built = {}
    for backend in ("eager", "cpp"):
        torch.manual_seed(0)
        m = models.build_model(name, N_A, N_B, dict(cfg, gca_positions=positions, gca_backend=backend, align_reg=0.3,
                                                    **({"emb_cache_dir": str(tmp_path)} if name == "llm4cdsr" else {})))
        if hasattr(m, "prepare_data"):
            tl = random_timelines(12, 10, np.random.default_rng(0), min_len=5)
            rows = [r[r > 0] for r in tl]
            m.prepare_data(SimpleNamespace(
                offsets=np.concatenate([[0], np.cumsum([len(r) for r in rows])]),
                items=np.concatenate(rows), n_items_a=N_A, n_items_b=N_B))
        built[backend] = m
    built["cpp"].load_state_dict(built["eager"].state_dict())
    return built["eager"], built["cpp"]


@pytest.mark.parametrize("kind", sorted(BATCHES))
@pytest.mark.parametrize("name", sorted(SETUPS))
def test_loss_and_gradients_match_eager(name, kind, tmp_path):
    rng = np.random.default_rng(3)
    users, min_len = BATCHES[kind]
    timelines = random_timelines(users, 13, rng, min_len=min_len)
    eager, cpp = _pair(name, tmp_path)
    batch = train_batch(timelines, eager.n_negatives, rng)
    history = random_timelines(users, 12, rng, min_len=min(min_len, 12))
    ev = eval_batch(history, rng.integers(0, 2, users), 6, rng)
    results = []
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for m in (eager, cpp):
            torch.manual_seed(1)  # same latent samples (CDSRNP) and negatives in both runs
            loss, logs = m(batch)
            loss.backward()
            m.eval()
            with torch.no_grad():
                scores = m.score(ev, ev["candidates"])
            results.append((loss.detach(), logs["align_cos"], scores, m.alignment_stats(),
                            {k: p.grad.clone() for k, p in m.named_parameters() if p.grad is not None}))
    finally:
        torch.set_num_threads(before)
    (loss_e, cos_e, scores_e, probe_e, grads_e), (loss_c, cos_c, scores_c, probe_c, grads_c) = results
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert cos_c == pytest.approx(cos_e, rel=1e-5)
    torch.testing.assert_close(scores_c, scores_e, rtol=1e-5, atol=1e-5)
    assert probe_e.keys() == probe_c.keys() == {f"gca{p}_{d}" for p in SETUPS[name][1] for d in ("ab", "ba")}
    for k, v in probe_e.items():
        assert probe_c[k] == pytest.approx(v, rel=1e-5), k
    assert grads_e.keys() == grads_c.keys()
    for k, g in grads_e.items():
        torch.testing.assert_close(grads_c[k], g, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the GCA parameters really were trained through the operator
    assert any(grads_c[k].abs().sum() > 0 for k in grads_c if k.startswith("gca."))
