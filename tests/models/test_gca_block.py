"""GCA[i] pair: masks, parallel directions, padding rows, the alignment probe."""

import math

import pytest
import torch

from gca_kernels.reference import gated_cross_attention_ref
from models.gca_block import (GCAHost, GCAPair, before_mask, next_time_horizon, time_masks,
                              timeline_masks)


def _ref(mod, xq, xk, kpm, attn):
    n = mod.norm
    return gated_cross_attention_ref(
        xq, xk, mod.q_proj.weight, mod.q_proj.bias, mod.k_proj.weight, mod.k_proj.bias,
        mod.v_proj.weight, mod.v_proj.bias, mod.out_proj.weight, mod.out_proj.bias,
        mod.gate_fc1.weight, mod.gate_fc1.bias, mod.gate_fc2.weight, mod.gate_fc2.bias,
        ln_w=None if n is None else n.weight, ln_b=None if n is None else n.bias,
        key_padding_mask=kpm, attn_mask=attn, n_heads=mod.n_heads, activation=mod.activation)[0]


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


class _Host(GCAHost, torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.gca = torch.nn.ModuleDict({"gca0": GCAPair(8, n_heads=1, backend="eager")})


def test_probe_records_only_in_eval_and_matches_manual_means():
    torch.manual_seed(2)
    host = _Host()
    pair = host.gca["gca0"]
    x_a, x_b = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    valid_a = torch.tensor([[True, True, True, True], [False, True, True, True]])
    valid_b = torch.tensor([[False, True, True, True], [True, True, False, True]])
    masks = timeline_masks(valid_a, valid_b)
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
