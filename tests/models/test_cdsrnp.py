"""CDSRNP: shapes, GCA on/off, the neural-process terms, no leak of a user's later items."""

import numpy as np
import pytest
import torch

import models
from models.cdsrnp import gaussian_kl
from tests.models.helpers import N_A, N_B, eval_batch, random_timelines, train_batch

TINY = {"hidden": 16, "ffn_inner": 16, "latent": 4, "set_hidden": 12, "n_neg": 6, "max_len": 8,
        "gca_heads": 2, "gca_backend": "eager"}


def _model(gca, **kw):
    return models.build_model("cdsrnp", N_A, N_B, dict(TINY, gca_positions=gca, **kw))


def test_gaussian_kl_zero_for_equal_and_positive_otherwise():
    mu, ls = torch.randn(3, 4), torch.randn(3, 4) * 0.3
    torch.testing.assert_close(gaussian_kl((mu, ls), (mu, ls)), torch.zeros(3))
    assert (gaussian_kl((mu + 1, ls), (mu, ls)) > 0).all()


@pytest.mark.parametrize("gca", [[], [0], [1], [0, 1]])
def test_forward_backward_score(gca):
    rng = np.random.default_rng(0)
    m = _model(gca)
    batch = train_batch(random_timelines(6, 9, rng), m.n_negatives, rng)
    loss, logs = m.loss(batch)
    assert torch.isfinite(loss) and {"loss_A", "loss_B", "kl"} <= set(logs) and logs["kl"] >= 0
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m.eval()
    eb = eval_batch(random_timelines(6, 8, rng), np.array([0, 1, 1, 0, 1, 0]), 5, rng)
    s = m.score(eb, eb["candidates"])
    assert s.shape == (6, 5) and torch.isfinite(s).all()
    # evaluation is deterministic (latent = prior mean)
    torch.testing.assert_close(m.score(eb, eb["candidates"]), s)
    assert set(m.alignment_stats()) == {f"gca{p}_{d}" for p in gca for d in ("ab", "ba")}


def test_rejects_position_2():
    with pytest.raises(ValueError, match="gca_positions"):
        _model([2])


@pytest.mark.parametrize("gca", [[], [0, 1]])
def test_no_leak_user_states_at_t_ignore_own_later_items(gca):
    """A user's decoded state at column t ignores the user's items after t (its support set
    is the other users, its own pairs enter only the KL term)."""
    rng = np.random.default_rng(1)
    m = _model(gca).eval()
    tl = random_timelines(5, 9, rng, min_len=9)
    base = m.position_states(train_batch(tl, m.n_negatives, rng))
    for t in range(7):
        other = tl.copy()
        other[0, t + 2:] = rng.integers(1, N_A + N_B + 1, size=other[0, t + 2:].shape)
        # the target of column t keeps its domain (the state is read in that domain) but
        # may change identity
        nxt = tl[0, t + 1]
        other[0, t + 1] = rng.integers(1, N_A + 1) if nxt <= N_A else rng.integers(N_A + 1, N_A + N_B + 1)
        h = m.position_states(train_batch(other, m.n_negatives, rng))
        torch.testing.assert_close(h[0, :t + 1], base[0, :t + 1], rtol=1e-5, atol=1e-5)
