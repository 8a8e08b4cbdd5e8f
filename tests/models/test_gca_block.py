"""GCA[i] pair: masks, parallel directions, padding rows, the probe rows, the alignment probe
and its pooled means, the alignment regulariser against the float64 eager reference, and that
every backbone runs its GCA through these modules."""

import math

import pytest
import torch

import gca_kernels
import models
from gca_kernels.reference import gated_cross_attention_ref
from models.gca_block import (GCALayers, GCAPair, before_mask, next_time_horizon, probe_rows, time_masks,
                              timeline_masks)


def _ref(mod, xq, xk, kpm, attn, cos=False):
    n = mod.norm
    return gated_cross_attention_ref(
        xq, xk, mod.q_proj.weight, mod.q_proj.bias, mod.k_proj.weight, mod.k_proj.bias,
        mod.v_proj.weight, mod.v_proj.bias, mod.out_proj.weight, mod.out_proj.bias,
        mod.gate_fc1.weight, mod.gate_fc1.bias, mod.gate_fc2.weight, mod.gate_fc2.bias,
        ln_w=None if n is None else n.weight, ln_b=None if n is None else n.bias,
        key_padding_mask=kpm, attn_mask=attn, n_heads=mod.n_heads, activation=mod.activation)[1 if cos else 0]


def test_timeline_masks_are_causal_inclusive_with_key_padding():
    valid_a = torch.tensor([[False, True, True, False]])
    valid_b = torch.tensor([[True, False, True, True]])
    attn_ab, kpm_b, attn_ba, kpm_a = timeline_masks(valid_a, valid_b)
    assert attn_ab.shape == (1, 4, 4) and attn_ab.dtype == torch.bool
    # column t sees columns <= t, blocks the future
    assert not attn_ab[0, 2, 2] and not attn_ab[0, 2, 0] and attn_ab[0, 2, 3]
    assert torch.equal(kpm_b, ~valid_b) and torch.equal(kpm_a, ~valid_a)
    assert torch.equal(attn_ab, attn_ba)


def test_time_masks_strictly_before_and_padding():
    time_a = torch.tensor([[-1, 1, 4]])
    time_b = torch.tensor([[0, 2, 3]])
    attn_ab, kpm_b, attn_ba, kpm_a = time_masks(time_a, time_b)
    # A item at time 1 sees B at time 0 only; at time 4 sees all three.
    assert attn_ab[0, 1].tolist() == [False, True, True]
    assert attn_ab[0, 2].tolist() == [False, False, False]
    # B at time 0 sees nothing (A at -1 is padding), B at time 2 sees A at 1, not padding.
    assert attn_ba[0, 0].tolist() == [True, True, True]
    assert attn_ba[0, 1].tolist() == [True, False, True]
    assert kpm_a.tolist() == [[True, False, False]] and kpm_b.tolist() == [[False, False, False]]


def test_next_time_horizon_extends_latest_to_now():
    time = torch.tensor([[-1, -1, 2, 5]])
    h = next_time_horizon(time, now=8)
    assert h.tolist() == [[-1, -1, 5, 8]]
    m = before_mask(h, torch.tensor([[0, 3, 6, 7]]))
    assert m[0, 2].tolist() == [False, False, True, True]
    assert m[0, 3].tolist() == [False, False, False, False]


@pytest.mark.parametrize("layer_norm,activation", [(True, "sigmoid"), (False, "tanh")])
def test_pair_runs_both_directions_from_pre_gca_values(layer_norm, activation):
    torch.manual_seed(1)
    pair = GCAPair(8, n_heads=2, activation=activation, layer_norm=layer_norm, backend="eager")
    x_a, x_b = torch.randn(2, 5, 8), torch.randn(2, 4, 8)
    valid_a = torch.tensor([[False, True, True, True, True], [False, False, False, True, True]])
    valid_b = torch.tensor([[True, True, True, True], [False, False, True, True]])
    time_a = torch.tensor([[-1, 0, 2, 5, 7], [-1, -1, -1, 1, 3]])
    time_b = torch.tensor([[1, 3, 4, 6], [-1, -1, 0, 2]])
    masks = time_masks(time_a, time_b)
    y_a, y_b = pair(x_a, x_b, valid_a, valid_b, masks)
    exp_a = _ref(pair.ab, x_a, x_b, masks[1], masks[0]) * valid_a[..., None]
    exp_b = _ref(pair.ba, x_b, x_a, masks[3], masks[2]) * valid_b[..., None]
    torch.testing.assert_close(y_a, exp_a, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(y_b, exp_b, rtol=1e-5, atol=1e-6)
    assert (y_a[~valid_a] == 0).all() and (y_b[~valid_b] == 0).all()
    # first valid A row (time 0) sees no B key: x' = 0, y = LN(x_a) or x_a
    row = x_a[0, 1]
    expect = torch.nn.functional.layer_norm(row, (8,), pair.ab.norm.weight, pair.ab.norm.bias) if layer_norm else row
    torch.testing.assert_close(y_a[0, 1], expect, rtol=1e-5, atol=1e-6)


def test_probe_rows_come_from_the_masks_not_the_values():
    # batch 0: row 0 padding, row 1 an item whose only keys are padding (keyless), row 2 an
    # item whose one visible key is blocked by the attention mask, row 3 an item that sees a
    # key; batch 1: every row an item, all see the one real key.
    valid_q = torch.tensor([[False, True, True, True], [True, True, True, True]])
    kpm = torch.tensor([[True, True, False, True], [False, True, True, True]])
    attn = torch.zeros(2, 4, 4, dtype=torch.bool)
    attn[0, 1, 2] = True
    attn[0, 2, 2] = True
    rows = probe_rows(valid_q, attn, kpm)
    assert rows.tolist() == [[False, False, False, True], [True, True, True, True]]
    # a shared (1, Lq, Lk) attention mask broadcasts over the batch
    assert probe_rows(valid_q, attn[:1], kpm).tolist() == [[False, False, False, True], [True, True, True, True]]
    # through the pair: an item row of zeros is counted, a padding row of values is not
    torch.manual_seed(4)
    pair = GCAPair(4, backend="eager").eval()
    x_a, x_b = torch.randn(2, 4, 4), torch.randn(2, 4, 4)
    x_a[1, 0] = 0.0
    pair(x_a, x_b, valid_q, ~kpm, (attn, kpm, torch.zeros(2, 4, 4, dtype=torch.bool), ~valid_q))
    assert pair.alignment_sums()["ab"][1] == 5.0


class _Host(models.Recommender):
    """The smallest Recommender with GCA[0]: the probe and the regulariser as a backbone has them."""
    gca_slots = (0,)

    def __init__(self, align_reg=0.0, backend="eager"):
        super().__init__(3, 3, {"hidden": 8, "gca_positions": [0], "align_reg": align_reg,
                                "gca_backend": backend})
        self.gca = models.gca_block.build_gca([0], 8, self.config)


def _probe_inputs():
    x_a, x_b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    valid_a = torch.tensor([[True, True, True, True], [False, True, True, True]])
    valid_b = torch.tensor([[False, True, True, True], [True, True, False, True]])
    return x_a, x_b, valid_a, valid_b, timeline_masks(valid_a, valid_b)


def test_probe_records_only_in_eval_and_matches_manual_means():
    torch.manual_seed(2)
    host = _Host()
    pair = host.gca["gca0"]
    x_a, x_b, valid_a, valid_b, masks = _probe_inputs()
    host.train()
    pair(x_a, x_b, valid_a, valid_b, masks)
    assert host.alignment_stats() == {}
    host.eval()
    pair(x_a, x_b, valid_a, valid_b, masks)
    stats = host.alignment_stats()
    assert set(stats) == {"gca0_ab", "gca0_ba"}
    # manual: A row (b, t) sees B keys at columns <= t that are valid
    _, cos = pair.ab(x_a, x_b, key_padding_mask=masks[1], attn_mask=masks[0], need_alignment=True)
    sees = torch.stack([torch.stack([valid_b[b, :t + 1].any() for t in range(4)]) for b in range(2)])
    rows = valid_a & sees
    assert math.isclose(stats["gca0_ab"]["cos_x_xprime"], float(cos.detach().abs()[rows].mean()), rel_tol=1e-5)
    both = valid_a & valid_b
    manual_xy = torch.nn.functional.cosine_similarity(x_a, x_b, dim=-1).abs()[both].mean()
    assert math.isclose(stats["gca0_ab"]["cos_x_y"], float(manual_xy), rel_tol=1e-5)
    # accumulation over two calls weights by rows; reset clears
    pair(x_a, x_b, valid_a, valid_b, masks)
    assert math.isclose(host.alignment_stats()["gca0_ab"]["cos_x_xprime"], stats["gca0_ab"]["cos_x_xprime"],
                        rel_tol=1e-6)
    counts = host.alignment_counts()["gca0_ab"]
    assert counts[2] == 2 * int(rows.sum())
    host.reset_alignment()
    assert host.alignment_stats() == {}
    # probe can be switched on during training
    host.train()
    host.set_probe_in_training(True)
    pair(x_a, x_b, valid_a, valid_b, masks)
    assert set(host.alignment_stats()) == {"gca0_ab", "gca0_ba"}


def test_probe_means_pool_every_row_of_every_batch():
    """Both probes are pooled means over all rows counted: a batch weighs by its own rows
    (x-x': probe rows; x-y: indices where both streams hold an item), not by the other's."""
    torch.manual_seed(5)
    host = _Host().eval()
    pair = host.gca["gca0"]
    xs, cos_all, xy_all = [], [], []
    for n_items in (4, 1):  # batch 2: one x-y pair but three probe rows
        x_a, x_b = torch.randn(1, 4, 8), torch.randn(1, 4, 8)
        valid_a = torch.ones(1, 4, dtype=torch.bool)
        valid_b = torch.arange(4)[None] < n_items
        masks = (torch.zeros(1, 4, 4, dtype=torch.bool), ~valid_b, torch.zeros(1, 4, 4, dtype=torch.bool), ~valid_a)
        pair(x_a, x_b, valid_a, valid_b, masks)
        _, cos = pair.ab(x_a, x_b, key_padding_mask=masks[1], attn_mask=masks[0], need_alignment=True)
        cos_all.append(cos.detach().abs()[valid_a])
        both = valid_a & valid_b
        xy_all.append(torch.nn.functional.cosine_similarity(x_a, x_b, dim=-1).abs()[both])
    stats = host.alignment_stats()["gca0_ab"]
    assert math.isclose(stats["cos_x_xprime"], float(torch.cat(cos_all).mean()), rel_tol=1e-5)
    assert math.isclose(stats["cos_x_y"], float(torch.cat(xy_all).mean()), rel_tol=1e-5)
    # (weighting each batch's x-y mean by its probe rows instead gives another number here)
    by_rows = float((xy_all[0].mean() * 4 + xy_all[1].mean() * 4) / 8)
    assert not math.isclose(stats["cos_x_y"], by_rows, rel_tol=1e-3)


def _by_hand_penalty(pair, x_a, x_b, valid_a, valid_b, masks, weight):
    """weight * mean over the two directions of mean |cos(x, x')| over the probe rows, with
    the float64 eager reference and the rows counted by loops over the masks."""
    terms = []
    for mod, xq, xk, vq, attn, kpm in ((pair.ab, x_a, x_b, valid_a, masks[0], masks[1]),
                                       (pair.ba, x_b, x_a, valid_b, masks[2], masks[3])):
        cos = _ref(mod, xq, xk, kpm, attn, cos=True)
        attn = attn.expand(vq.shape[0], -1, -1)
        rows = torch.zeros_like(vq)
        for b in range(vq.shape[0]):
            for i in range(vq.shape[1]):
                rows[b, i] = bool(vq[b, i]) and any(not attn[b, i, j] and not kpm[b, j] for j in range(xk.shape[1]))
        terms.append(cos.abs()[rows].sum() / max(int(rows.sum()), 1))
    return weight * torch.stack(terms).mean()


@pytest.mark.parametrize("backend", gca_kernels.available_backends())
def test_regulariser_value_and_gradient_equal_the_reference(backend):
    torch.manual_seed(6)
    host = _Host(align_reg=-0.7, backend=backend).double().train()
    pair = host.gca["gca0"]
    time_a = torch.tensor([[-1, 0, 2, 5, 7], [-1, -1, -1, 1, 3]])
    time_b = torch.tensor([[1, 3, 4, 6], [-1, -1, 0, 2]])
    valid_a, valid_b = time_a >= 0, time_b >= 0
    masks = time_masks(time_a, time_b)  # keyless item rows: A at time 0, B at time 0
    x_a = torch.randn(2, 5, 8, dtype=torch.float64, requires_grad=True)
    x_b = torch.randn(2, 4, 8, dtype=torch.float64, requires_grad=True)
    host.gca.begin_penalty()
    pair(x_a, x_b, valid_a, valid_b, masks)
    term = host.gca.end_penalty()
    params = [x_a, x_b, *pair.parameters()]

    def grads(value):
        # the gate and LayerNorm do not enter cos(x, x'): no gradient (None) means zero
        gs = torch.autograd.grad(value, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for p, g in zip(params, gs)]

    got = grads(host.gca.align_reg * term)
    want_value = _by_hand_penalty(pair, x_a, x_b, valid_a, valid_b, masks, -0.7)
    want = grads(want_value)
    torch.testing.assert_close(host.gca.align_reg * term, want_value, rtol=1e-10, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-10)
    assert all(float(w.abs().sum()) > 0 for w in want[:2]) and any(float(w.abs().sum()) > 0 for w in want[2:])


def test_forward_adds_the_term_in_training_only():
    torch.manual_seed(7)
    x_a, x_b, valid_a, valid_b, masks = _probe_inputs()

    class Model(_Host):
        def loss(self, batch):
            y_a, y_b = self.gca["gca0"](x_a, x_b, valid_a, valid_b, masks)
            return (y_a.square().mean() + y_b.square().mean()), {}

    m = Model(align_reg=0.5).train()
    plain, _ = m.loss(None)
    total, logs = m(None)
    want = _by_hand_penalty(m.gca["gca0"], x_a, x_b, valid_a, valid_b, masks, 1.0).detach()
    assert logs["align_cos"] == pytest.approx(float(want), rel=1e-5)
    assert float(total.detach()) == pytest.approx(float(plain.detach()) + 0.5 * float(want), rel=1e-5)
    # outside forward (loss called directly) and in evaluation no term is collected
    assert all(p.penalty_terms is None for p in m.gca.values())
    m.eval()
    assert float(m(None)[0].detach()) == pytest.approx(float(plain.detach()), rel=1e-6) and "align_cos" not in m(None)[1]
    with pytest.raises(ValueError, match="align_reg"):
        models.build_model("sasrec", 5, 5, {"align_reg": 1.0})
    with pytest.raises(ValueError, match="align_reg"):
        models.build_model("sasrec", 5, 5, {"align_reg": "x", "gca_positions": [0]})


@pytest.mark.parametrize("name", models.MODEL_NAMES)
def test_every_backbone_runs_its_gca_through_gca_pairs(name):
    slots = models.model_class(name).gca_slots
    cfg = {"hidden": 8, "gca_positions": list(slots), "align_reg": 0.25, "global_dim": 16, "adapter_hidden": 8}
    m = models.build_model(name, 5, 5, cfg)
    assert isinstance(m.gca, GCALayers) and sorted(m.gca) == [f"gca{p}" for p in slots]
    assert m.gca.align_reg == 0.25
    in_pairs = {id(mod) for pair in m.gca.values() for mod in (pair.ab, pair.ba)}
    fused = [n for n, mod in m.named_modules() if isinstance(mod, gca_kernels.FusedGCA)]
    assert len(fused) == 2 * len(slots) and all(id(m.get_submodule(n)) in in_pairs for n in fused)


def test_probe_does_not_change_output_and_keeps_gradients():
    torch.manual_seed(3)
    pair = GCAPair(8, backend="eager")
    x_a = torch.randn(1, 3, 8, requires_grad=True)
    x_b = torch.randn(1, 3, 8)
    valid = torch.ones(1, 3, dtype=torch.bool)
    masks = timeline_masks(valid, valid)
    pair.train()
    y_train = pair(x_a, x_b, valid, valid, masks)[0]
    pair.probe_in_training = True
    y_probe = pair(x_a, x_b, valid, valid, masks)[0]
    torch.testing.assert_close(y_train, y_probe)
    y_probe.sum().backward()
    assert x_a.grad is not None and torch.isfinite(x_a.grad).all()
