"""Parameter-matched baselines: widened bare backbone == backbone + GCA modules within 2%."""

import numpy as np
import pytest
import torch

import models
from models.scaling import count_trainable
from tests.models.helpers import N_A, N_B, random_timelines, train_batch

TINY = {
    "abxi": {"hidden": 16, "n_heads": 2, "ffn_inner": 24, "lora_rank_d": 4, "lora_rank_i": 4, "max_len": 8,
             "n_neg": 8},
    "llm4cdsr": {"hidden": 16, "ffn_inner": 16, "global_dim": 24, "adapter_hidden": 20, "max_len": 8},
    "cdsrnp": {"hidden": 16, "ffn_inner": 16, "latent": 4, "set_hidden": 12, "n_neg": 6, "max_len": 8},
}
CASES = [("abxi", [0]), ("abxi", [0, 1, 2]), ("llm4cdsr", [0]), ("llm4cdsr", [0, 2]), ("cdsrnp", [0]),
         ("cdsrnp", [0, 1])]


def _n(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


@pytest.mark.parametrize("name,positions", CASES)
def test_scaled_bare_backbone_matches_gca_count(name, positions):
    cfg = dict(TINY[name], gca_backend="eager")
    with_gca = models.build_model(name, N_A, N_B, dict(cfg, gca_positions=positions))
    bare = models.build_model(name, N_A, N_B, cfg)
    scaled = models.build_model(name, N_A, N_B, dict(cfg, scale_to_match=positions))
    assert not scaled.config["gca_positions"] and not list(scaled.gca)
    key = type(scaled).scale_key
    assert scaled.config[key] > bare.config[key]
    assert abs(_n(scaled) - _n(with_gca)) <= 0.02 * _n(with_gca)
    assert scaled.n_params == _n(scaled) and scaled.n_params_target == _n(with_gca)
    assert bare.n_params == bare.n_params_target == _n(bare)
    assert count_trainable(type(bare), N_A, N_B, dict(cfg, gca_positions=positions)) == _n(with_gca)


@pytest.mark.parametrize("name", ["abxi", "cdsrnp"])
def test_widened_parameters_all_receive_gradient(name):
    """The widened feed-forward really is part of the model: every trainable parameter of the
    parameter-matched backbone gets a gradient from the loss (learning itself is checked end to
    end in tests/cdsr/test_trainer.py)."""
    rng = np.random.default_rng(0)
    m = models.build_model(name, N_A, N_B, dict(TINY[name], scale_to_match=[0]))
    torch.manual_seed(0)
    loss, _ = m.loss(train_batch(random_timelines(8, 9, rng), m.n_negatives, rng))
    loss.backward()
    assert torch.isfinite(loss)
    # (a LoRA's down-projection gets no gradient at the first step: its up-projection starts
    # at zero, as LoRA intends)
    dead = [k for k, p in m.named_parameters()
            if p.requires_grad and not k.endswith("mat_a")
            and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead, dead


def test_scale_to_match_with_gca_positions_is_an_error():
    with pytest.raises(ValueError, match="bare backbone"):
        models.build_model("abxi", N_A, N_B, dict(TINY["abxi"], gca_positions=[0], scale_to_match=[0]))


def test_scale_to_match_rejects_bad_positions():
    with pytest.raises(ValueError, match="gca_positions"):
        models.build_model("cdsrnp", N_A, N_B, dict(TINY["cdsrnp"], scale_to_match=[2]))
