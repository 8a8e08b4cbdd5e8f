"""The ABXI authors' protocol pieces: per-position negatives, per-epoch warm-up, plateau decay
(and its resume), the `paper` preset's settings, `cdsr train --preset`."""

import numpy as np
import pytest
import torch

import cdsr.trainer as trainer_mod
from cdsr.batching import TrainSampler, draw_distinct
from cdsr.config import ConfigError, make_config
from cdsr.dataset import DataError
from cdsr.experiments.common import preset_settings, run_config
from cdsr.loaders import load_dataset
from cdsr.trainer import Trainer

TINY = {"data": "synthetic", "epochs": 2, "batch_size": 16, "hidden": 16, "max_len": 20, "threads": 1,
        "progress": "never"}
TINY_SETS = ["synthetic_preset=tiny", "eval_negatives=20", "ffn_inner=32", "n_neg=4"]


def tiny_cfg(**kw):
    return make_config("sasrec", {**TINY, **kw}, TINY_SETS)


def test_draw_distinct_rows_are_uniform_subsets():
    rng = np.random.default_rng(0)
    n_free = np.array([5, 9, 300, 7] * 500)
    vals = draw_distinct(rng, n_free, 5)
    assert vals.shape == (2000, 5)
    assert (vals >= 0).all() and (vals < n_free[:, None]).all()
    assert all(len(set(r)) == 5 for r in vals.tolist())
    # k = n_free: a permutation; every value equally often in every column
    perm = vals[n_free == 5]
    assert (np.sort(perm, axis=1) == np.arange(5)).all()
    # rows of 9: each value in 5/9 of the rows (500 rows: sd ~11); column 0 uniform too
    rows9 = vals[n_free == 9]
    counts = np.bincount(rows9.ravel(), minlength=9)
    assert np.abs(counts - 500 * 5 / 9).max() < 50, counts
    first = np.bincount(rows9[:, 0], minlength=9)
    assert np.abs(first - 500 / 9).max() < 25, first
    with pytest.raises(ValueError, match="cannot draw 8 distinct values from 5"):
        draw_distinct(rng, n_free, 8)


def _tiny_data():
    return load_dataset(tiny_cfg())


def test_per_position_negatives_are_distinct_unseen_and_in_domain():
    ds = _tiny_data()
    s = TrainSampler(ds, 20, 16, {"A": 1, "B": 1}, seed=3, neg_sampling="per_position", per_position_k=6)
    batch = next(iter(s.epoch(1)))
    users = batch["user"].numpy()
    na, nb = batch["neg_a"].numpy(), batch["neg_b"].numpy()
    assert na.shape == (len(users), 20, 6) and nb.shape == (len(users), 20, 6)
    for r, u in enumerate(users):
        train = set(ds.items[ds.offsets[u - 1]:ds.offsets[u - 1] + s.train_end[u - 1]].tolist())
        for pos in range(20):
            for negs, lo, hi in ((na[r, pos], 1, ds.n_items_a), (nb[r, pos], ds.n_items_a + 1, ds.n_items)):
                assert len(set(negs.tolist())) == 6
                assert lo <= negs.min() and negs.max() <= hi
                assert not set(negs.tolist()) & train
    # positions draw afresh (not one set per user)
    assert any(set(na[0, 0]) != set(na[0, p]) for p in range(1, 20))
    # seeded by (seed, epoch, rank): the same epoch replays, another differs
    again = next(iter(s.epoch(1)))
    assert torch.equal(again["neg_a"], batch["neg_a"]) and torch.equal(again["neg_b"], batch["neg_b"])
    assert not torch.equal(next(iter(s.epoch(2)))["neg_a"], batch["neg_a"])


def test_per_position_needs_enough_unseen_items():
    ds = _tiny_data()  # 40 A items
    with pytest.raises(DataError, match="fewer than train_negatives=39"):
        TrainSampler(ds, 20, 16, {"A": 1, "B": 1}, seed=0, neg_sampling="per_position", per_position_k=39)
    with pytest.raises(ValueError, match="fewer than the model's 4"):
        TrainSampler(ds, 20, 16, {"A": 4, "B": 4}, seed=0, neg_sampling="per_position", per_position_k=2)
    with pytest.raises(ConfigError, match="neg_sampling must be one of per_user, per_position"):
        tiny_cfg(neg_sampling="fresh")


def test_epoch_warmup_steps_once_per_epoch(tmp_path):
    res = Trainer(tiny_cfg(epochs=4, lr=1e-2, warmup_unit="epoch", warmup_epochs=2), tmp_path).fit()
    lrs = [h["lr"] for h in res["history"]]
    assert lrs == pytest.approx([1e-2 * 1e-5, 1e-2 * (1e-5 + (1 - 1e-5) / 2), 1e-2, 1e-2])


def _never_improves(monkeypatch):
    """Validation score 1.0 at epoch 1 and 0.0 after: every later epoch is a bad one."""
    calls = {"n": 0}

    def score(valid, metric):
        calls["n"] += 1
        return 1.0 if calls["n"] == 1 else 0.0

    monkeypatch.setattr(trainer_mod, "selection_score", score)


def test_plateau_decay_and_early_stop(tmp_path, monkeypatch):
    _never_improves(monkeypatch)
    res = Trainer(tiny_cfg(epochs=10, lr=1e-2, warmup_epochs=0, lr_plateau_patience=1, lr_plateau_factor=0.5,
                           patience=5), tmp_path).fit()
    # bad epochs 2, 3 -> decay after epoch 3; 4, 5 -> after epoch 5; early stop at 5 bad (epoch 6)
    assert [h["lr"] for h in res["history"]] == pytest.approx([1e-2] * 3 + [5e-3] * 2 + [2.5e-3])
    assert res["epochs_run"] == 6 and res["best_epoch"] == 1 and res["early_stopped"]
    capped = Trainer(tiny_cfg(epochs=2), tmp_path / "capped").fit()
    assert capped["early_stopped"] is False


def test_plateau_state_resumes_exactly(tmp_path, monkeypatch):
    cfg = dict(lr=1e-2, warmup_epochs=0, lr_plateau_patience=1, lr_plateau_factor=0.5, patience=50,
               neg_sampling="per_position", train_negatives=5)
    _never_improves(monkeypatch)
    full = Trainer(tiny_cfg(epochs=5, **cfg), tmp_path / "full").fit()
    _never_improves(monkeypatch)
    Trainer(tiny_cfg(epochs=3, **cfg), tmp_path / "part").fit()
    part = Trainer(tiny_cfg(epochs=5, **cfg), tmp_path / "part")
    part.fit(resume=True)
    assert [h["lr"] for h in part.history] == [h["lr"] for h in full["history"]]
    assert [h["loss"] for h in part.history] == [h["loss"] for h in full["history"]]
    assert part.plateau_scale == 0.25
    ck = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert ck["plateau"] == {"scale": 0.25, "bad": 0}


def test_paper_preset_is_the_authors_protocol():
    abe = run_config("abxi", "abe", 0, preset_name="paper", epochs=500, device="cpu", threads=1, sets=[],
                     controlled={"gca_positions": []})
    afk = preset_settings("paper", "abxi", "afk")
    want = {"lr": 1e-4, "weight_decay": 2.0, "batch_size": 256, "warmup_unit": "epoch", "warmup_epochs": 10,
            "lr_plateau_patience": 30, "lr_plateau_factor": 0.3162, "patience": 62, "grad_clip": 0.0,
            "neg_sampling": "per_position", "train_negatives": 128, "lora_rank_d": 64, "lora_rank_i": 64,
            "epochs": 500, "early_stop_metric": "mrr"}
    assert {k: abe[k] for k in want} == want
    assert (afk["lora_rank_d"], afk["lora_rank_i"], afk["weight_decay"]) == (16, 64, 3.0)
    llm = preset_settings("paper", "llm4cdsr", "abe")
    assert (llm["lr"], llm["train_negatives"], llm["patience"]) == (1e-3, 1, 20)


def test_cdsr_train_takes_model_and_data_from_set_and_a_preset():
    from cdsr.cli import build_parser, train_config

    args = build_parser().parse_args(["train", "--set", "model=abxi", "--set", "data=afk", "--preset", "paper",
                                      "--set", "lr=3e-4"])
    cfg = train_config(args)
    assert (cfg["model"], cfg["data"], cfg["lora_rank_d"], cfg["lr"], cfg["epochs"]) == ("abxi", "afk", 16, 3e-4, 500)
    plain = train_config(build_parser().parse_args(["train", "--set", "model=abxi"]))
    assert plain["model"] == "abxi" and plain["lr"] != 3e-4 and plain["neg_sampling"] == "per_user"
