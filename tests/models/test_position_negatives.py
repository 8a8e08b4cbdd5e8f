"""ABXI's and CDSRNP's sampled softmax under both `neg_sampling` modes, against references
that gather every negative's embedding (float64): `per_position` scores each position against
its own negatives, `per_user` against one pool per user; gradients of every parameter agree."""

import numpy as np
import pytest
import torch

import models
from cdsr.batching import TrainSampler
from cdsr.synthetic import PRESETS, generate
from tests.models.helpers import N_A, N_B, random_timelines, train_batch

CONFIGS = {
    "abxi": {"hidden": 16, "n_heads": 2, "ffn_inner": 24, "lora_rank_d": 4, "lora_rank_i": 4, "max_len": 8,
             "n_neg": 5, "gca_heads": 2, "gca_backend": "eager", "gca_positions": [0, 2]},
    "cdsrnp": {"hidden": 16, "ffn_inner": 16, "latent": 4, "set_hidden": 12, "n_neg": 5, "max_len": 8,
               "gca_heads": 2, "gca_backend": "eager", "gca_positions": [0, 1]},
}


def _model(name, mode, **kw):
    torch.manual_seed(0)
    m = models.build_model(name, N_A, N_B, {**CONFIGS[name], "neg_sampling": mode, **kw}).double()
    return m.eval()  # no dropout, CDSRNP decodes the prior's mean: two forwards agree exactly


def _batch(k, seed=0):
    rng = np.random.default_rng(seed)
    return train_batch(random_timelines(6, 9, rng), {"A": k, "B": k}, rng)


def _reference_loss(m, batch, mode):
    """The model's loss with every negative's embedding gathered ((B, L, K, d) or (B, K, d))."""
    k, temp, emb = m.config["n_neg"], m.config["temperature"], m.item_emb.weight
    tdom, target = batch["target_domain"], batch["target"]
    neg_a, neg_b = batch["neg_a"], batch["neg_b"]
    b = target.shape[0]
    if m.name == "abxi":
        h = m.position_states(batch)
    else:
        out, kl = m.latent_states(batch)
        h = torch.where((tdom == 1).unsqueeze(-1), out["b"], out["a"])

    def scores(ids):  # ids (B, L, K) per position or (B, K) per user
        e = emb[ids]
        return torch.einsum("bld,blkd->blk", h, e) if ids.dim() == 3 else torch.einsum("bld,bkd->blk", h, e)

    if mode == "per_position":
        a, bb = neg_a[..., :k], neg_b[..., :k]
    else:
        a, bb = neg_a.reshape(b, -1)[:, :k], neg_b.reshape(b, -1)[:, :k]
    if m.name == "abxi":
        negs = torch.cat([scores(a), scores(bb)], dim=-1)
    else:
        negs = torch.where((tdom == 1).unsqueeze(-1), scores(bb), scores(a))
    pos = (h * emb[target]).sum(-1, keepdim=True)
    nll = -torch.log_softmax(torch.cat([pos, negs], dim=-1) / temp, dim=-1)[..., 0]
    total = 0.0
    for d in (0, 1):
        w = (tdom == d).double()
        if m.name == "abxi":  # per-user mean over the domain's positions, averaged over users
            total = total + ((nll * w).sum(1) / w.sum(1).clamp(min=1)).mean()
        else:  # mean over the batch's positions of the domain
            total = total + (nll * w).sum() / w.sum().clamp(min=1)
    if m.name == "cdsrnp":
        total = total + m.config["kl_weight"] * kl.mean()
    return total


@pytest.mark.parametrize("mode", ["per_position", "per_user"])
@pytest.mark.parametrize("name", ["abxi", "cdsrnp"])
def test_loss_and_every_gradient_match_the_full_gather_reference(name, mode):
    m = _model(name, mode)
    # per_position: 7 drawn per position, the model scores the first 5; per_user: the
    # sampler's few per position (here 1), pooled per user
    batch = _batch(7 if mode == "per_position" else m.n_negatives["A"])
    params = [p for p in m.parameters() if p.requires_grad]
    loss, _ = m.loss(batch)
    ref = _reference_loss(m, batch, mode)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    want = torch.autograd.grad(ref, params, allow_unused=True)
    for (pname, _), g, w in zip(m.named_parameters(), got, want):
        if w is None:
            assert g is None or not g.any(), pname
        else:
            torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12, msg=pname)


@pytest.mark.parametrize("name", ["abxi", "cdsrnp"])
def test_per_position_scores_each_position_with_its_own_draw(name):
    m = _model(name, "per_position")
    batch = _batch(5, seed=1)
    base, _ = m.loss(batch)
    # the same negatives, moved between positions: a per-user pool would not notice
    moved = dict(batch, neg_a=batch["neg_a"].roll(1, dims=1), neg_b=batch["neg_b"].roll(1, dims=1))
    assert not torch.equal(m.loss(moved)[0], base)
    # padding positions' negatives are never scored
    pad = batch["target"] == 0
    assert pad.any()
    other = {key: batch[key].clone() for key in ("neg_a", "neg_b")}
    other["neg_a"][pad] = 1
    other["neg_b"][pad] = N_A + 1
    assert torch.equal(m.loss(dict(batch, **other))[0], base)


@pytest.mark.parametrize("name", ["abxi", "cdsrnp"])
def test_negative_counts_and_errors(name):
    cfg = CONFIGS[name]
    per_user = models.build_model(name, N_A, N_B, cfg)
    assert per_user.config["neg_sampling"] == "per_user"
    assert per_user.n_negatives == {"A": 1, "B": 1}  # ceil(5 / 8): one pool of 5 per user
    per_pos = models.build_model(name, N_A, N_B, {**cfg, "neg_sampling": "per_position"})
    assert per_pos.n_negatives == {"A": 5, "B": 5}
    with pytest.raises(ValueError, match=r"neg_[ab] must be .* K >= n_neg = 5"):
        per_pos.loss(_batch(4))
    with pytest.raises(ValueError, match="neg_sampling must be one of per_user, per_position"):
        models.build_model(name, N_A, N_B, {**cfg, "neg_sampling": "per_item"})


@pytest.mark.parametrize("name", ["abxi", "cdsrnp"])
def test_trains_on_the_pipeline_per_position_batches(name):
    data = generate(PRESETS["tiny"])
    torch.manual_seed(0)
    m = models.build_model(name, data.n_items_a, data.n_items_b,
                           {**CONFIGS[name], "n_neg": 4, "neg_sampling": "per_position"})
    s = TrainSampler(data, m.config["max_len"], 16, m.n_negatives, 0, neg_sampling="per_position")
    batch = next(iter(s.epoch(0)))
    assert batch["neg_a"].shape[-1] == 4 and batch["neg_b"].shape[-1] == 4
    loss, _ = m.loss(batch)
    loss.backward()
    assert torch.isfinite(loss) and m.item_emb.weight.grad.abs().sum() > 0
