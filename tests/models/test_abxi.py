"""ABXI: shapes, GCA on/off at every position set, no leak of a target into its own input."""

import numpy as np
import pytest
import torch

import models
from tests.models.helpers import N_A, N_B, eval_batch, random_timelines, same_domain_resample, train_batch

TINY = {"hidden": 16, "n_heads": 2, "ffn_inner": 24, "lora_rank_d": 4, "lora_rank_i": 4, "max_len": 8,
        "n_neg": 8, "gca_heads": 2, "gca_backend": "eager"}
POSITION_SETS = [[], [0], [1], [2], [0, 1], [0, 2], [0, 1, 2]]


def _model(gca, **kw):
    cfg = dict(TINY, gca_positions=gca, **kw)
    return models.build_model("abxi", N_A, N_B, cfg)


@pytest.mark.parametrize("gca", POSITION_SETS)
def test_forward_backward_and_score_shapes(gca):
    rng = np.random.default_rng(0)
    m = _model(gca)
    batch = train_batch(random_timelines(5, 9, rng), m.n_negatives, rng)
    loss, logs = m.loss(batch)
    assert loss.dim() == 0 and torch.isfinite(loss) and set(logs) == {"loss_A", "loss_B"}
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # every GCA module receives gradient
    for name, p in m.gca.named_parameters():
        assert p.grad.abs().sum() > 0 or "norm" in name, name
    m.eval()
    eb = eval_batch(random_timelines(5, 8, rng), np.array([0, 1, 0, 1, 1]), 6, rng)
    s = m.score(eb, eb["candidates"])
    assert s.shape == (5, 6) and torch.isfinite(s).all()
    stats = m.alignment_stats()
    assert set(stats) == {f"gca{p}_{d}" for p in gca for d in ("ab", "ba")}
    for v in stats.values():
        assert 0.0 <= v["cos_x_xprime"] <= 1.0 and 0.0 <= v["cos_x_y"] <= 1.0


def test_gca_changes_the_model_and_param_count():
    base, with_gca = _model([]), _model([0])
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    d = TINY["hidden"]
    pair = 2 * (4 * (d * d + d) + (2 * d * d + d) + (d * d + d) + 2 * d)
    assert n(with_gca) - n(base) == pair
    assert base.alignment_stats() == {}


def test_rejects_unknown_position():
    with pytest.raises(ValueError, match="gca_positions"):
        _model([3])


@pytest.mark.parametrize("gca", [[], [0, 1, 2]])
def test_no_leak_position_t_ignores_later_items(gca):
    """The state at column t must not change when the items after t change (identities of
    items after t, and domains of items from t + 2 on: the target domain of column t is the
    task ABXI conditions on, as in its paper)."""
    rng = np.random.default_rng(1)
    m = _model(gca).eval()
    tl = random_timelines(6, 9, rng, min_len=9)
    base = m.position_states(train_batch(tl, m.n_negatives, rng))
    length = tl.shape[1] - 1
    for t in range(length - 1):
        other = tl.copy()
        other[:, t + 1:] = same_domain_resample(tl[:, t + 1:], rng)
        # flip domains beyond t + 1
        flip = rng.random((tl.shape[0], tl.shape[1] - t - 2)) < 0.5
        tail = other[:, t + 2:]
        tail[flip] = np.where(tail[flip] > N_A, 1, N_A + 1)
        h = m.position_states(train_batch(other, m.n_negatives, rng))
        torch.testing.assert_close(h[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-6)
        # ... and the state did depend on something: later columns differ
        assert not torch.allclose(h[:, t + 1:], base[:, t + 1:])


def test_eval_state_matches_training_state_at_last_column_without_gca():
    """Compacted (evaluation) and gapped (training) layouts give the same state for the
    latest position: positions are counted back over items, attention is causal."""
    rng = np.random.default_rng(2)
    m = _model([]).eval()
    tl = random_timelines(4, 9, rng, min_len=4)
    tb = train_batch(tl, m.n_negatives, rng)
    h_train = m.position_states(tb)[:, -1]
    dom = tb["target_domain"][:, -1].numpy()
    eb = eval_batch(tl[:, :-1], dom, 3, rng)
    torch.testing.assert_close(m.user_state(eb), h_train, rtol=1e-5, atol=1e-5)


def test_pack_rows_matches_dense():
    rng = np.random.default_rng(3)
    a, b = _model([0, 2]), _model([0, 2], pack_rows=False)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    batch = train_batch(random_timelines(4, 9, rng), a.n_negatives, rng)
    torch.testing.assert_close(a.loss(batch)[0], b.loss(batch)[0], rtol=1e-5, atol=1e-6)


def test_compiled_states_match_eager():
    """torch.compile traces the whole backbone with GCA in one graph (fullgraph: no break
    around FusedGCA). aot_eager runs dynamo + AOT autograd without inductor's slow codegen."""
    rng = np.random.default_rng(4)
    m = _model([0], pack_rows=False, dropout=0.0).train()
    batch = train_batch(random_timelines(4, 9, rng), m.n_negatives, rng)
    eager = m.position_states(batch)
    compiled = torch.compile(m.position_states, dynamic=False, fullgraph=True, backend="aot_eager")(batch)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    compiled.sum().backward()
    assert m.item_emb.weight.grad is not None
