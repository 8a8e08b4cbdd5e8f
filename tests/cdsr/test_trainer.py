"""Trainer: results.json contents, seeding, alignment probe, resume checks (in process)."""

import json

import pytest

from cdsr.batching import build_eval_set
from cdsr.config import ConfigError, make_config
from cdsr.trainer import Trainer, evaluate, format_table

TINY = {"data": "synthetic", "epochs": 2, "batch_size": 16, "hidden": 16, "max_len": 20, "threads": 1,
        "progress": "never"}
TINY_SETS = ["synthetic_preset=tiny", "eval_negatives=20", "ffn_inner=32", "n_neg=4"]


def tiny_cfg(**kw):
    return make_config("sasrec", {**TINY, **kw}, TINY_SETS)


def test_results_json_has_everything(tmp_path):
    res = Trainer(tiny_cfg(), tmp_path).fit()
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk["test"] == res["test"]
    for key in ("config", "seed", "n_params", "best_epoch", "valid", "test", "wall_time_s", "alignment"):
        assert key in on_disk, key
    assert on_disk["config"]["hidden"] == 16 and on_disk["config"]["gca_positions"] == []
    names = {f"{m}@{k}" for m in ("hr", "ndcg") for k in (1, 5, 10, 20)} | {"mrr", "auc"}
    for split in ("valid", "test"):
        for d in ("A", "B"):
            assert names <= set(on_disk[split][d])
            assert 0.0 <= on_disk[split][d]["auc"] <= 1.0
    assert on_disk["test"]["A"]["users"] + on_disk["test"]["B"]["users"] == 64
    assert on_disk["alignment"] == {}
    assert 1 <= on_disk["best_epoch"] <= 2 and on_disk["n_params"] > 0
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()
    assert "test   A" in format_table(on_disk)


def test_gca_alignment_recorded(tmp_path):
    res = Trainer(tiny_cfg(gca_positions=[0], gca_heads=2), tmp_path).fit()
    assert set(res["alignment"]) == {"gca0_ab", "gca0_ba"}
    for stats in res["alignment"].values():
        assert 0.0 <= stats["cos_x_xprime"] <= 1.0 and 0.0 <= stats["cos_x_y"] <= 1.0
    bare = Trainer(tiny_cfg(), tmp_path / "bare")
    assert res["n_params"] > bare.n_params


@pytest.mark.parametrize("model,extra", [("sasrec", {}), ("sasrec", {"gca_positions": [0]}),
                                         ("abxi", {"scale_to_match": [0]})])
def test_training_learns_the_planted_structure(tmp_path, model, extra):
    """The synthetic users stay in an interest cluster from step to step, so the next item is
    predictable from the history. After 5 epochs the training loss has fallen and the held-out
    ranking is far better than the same model's before training (AUC 0.5 is a random ranking)."""
    cfg = make_config(model, {**TINY, "epochs": 5, "batch_size": 32, "lr": 0.01, **extra},
                      TINY_SETS + ["syn_users=256", "patience=5"])
    trainer = Trainer(cfg, tmp_path)
    test_set = build_eval_set(trainer.dataset, "test", cfg["eval_negatives"], cfg["eval_seed"])
    untrained = evaluate(trainer.model, trainer.dataset, test_set, cfg, trainer.ctx)
    res = trainer.fit()
    losses = [h["loss"] for h in res["history"]]
    assert len(losses) == 5 and losses[-1] < 0.9 * losses[0], losses
    for d in ("A", "B"):
        before, after = untrained[d], res["test"][d]
        assert after["auc"] > 0.65 and after["auc"] > before["auc"] + 0.08, (d, before["auc"], after["auc"])
        assert after["ndcg@10"] > before["ndcg@10"] + 0.1, (d, before["ndcg@10"], after["ndcg@10"])


def test_same_seed_same_result_other_seed_differs(tmp_path):
    a = Trainer(tiny_cfg(), tmp_path / "a").fit()
    b = Trainer(tiny_cfg(), tmp_path / "b").fit()
    c = Trainer(tiny_cfg(seed=1), tmp_path / "c").fit()
    assert a["test"] == b["test"] and a["history"][-1]["loss"] == b["history"][-1]["loss"]
    assert a["history"][-1]["loss"] != c["history"][-1]["loss"]


def test_resume_continues_and_checks_config(tmp_path):
    full = Trainer(tiny_cfg(epochs=3), tmp_path / "full").fit()
    Trainer(tiny_cfg(epochs=1), tmp_path / "part").fit()
    # asking for more epochs on a finished run continues it to the same place
    more = Trainer(tiny_cfg(epochs=3), tmp_path / "part").fit(resume=True)
    assert more["test"] == full["test"] and more["best_epoch"] == full["best_epoch"]
    assert [h["loss"] for h in more["history"]] == [h["loss"] for h in full["history"]]
    with pytest.raises(ConfigError, match="hidden"):
        Trainer(tiny_cfg(epochs=3, hidden=8), tmp_path / "part").fit(resume=True)


def test_early_stopping(tmp_path):
    res = Trainer(tiny_cfg(epochs=30, patience=1, lr=0.05), tmp_path).fit()
    assert res["epochs_run"] < 30
    assert res["epochs_run"] == res["best_epoch"] + 1


def test_data_derived_models_are_prepared_by_the_trainer(tmp_path, monkeypatch):
    """LLM4CDSR's frozen tables come from the training data: the trainer (hence `cdsr train`,
    torchrun ranks, the experiment runner) prepares them; whether they were cached or just
    built does not change the run."""
    monkeypatch.setenv("CDSR_CACHE_DIR", str(tmp_path / "cache"))
    cfg = make_config("llm4cdsr", {**TINY, "epochs": 1, "gca_positions": [0]},
                      ["synthetic_preset=tiny", "eval_negatives=20", "ffn_inner=32"])
    cold = Trainer(cfg, tmp_path / "cold")
    assert cold.model.frozen_ready and float(cold.model.glob.abs().sum()) > 0
    cold_res = cold.fit()
    assert list((tmp_path / "cache" / "item_embeddings").glob("*.npz")), "the tables were cached"
    warm_res = Trainer(cfg, tmp_path / "warm").fit()
    assert cold_res["test"] == warm_res["test"] and cold_res["history"][0]["loss"] == warm_res["history"][0]["loss"]


def test_a_fresh_run_never_replaces_another_config(tmp_path):
    Trainer(tiny_cfg(epochs=1), tmp_path).fit()
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(ConfigError, match=r"holds a different run \(hidden 16 there vs 8\)"):
        Trainer(tiny_cfg(epochs=1, hidden=8), tmp_path).fit()
    assert (tmp_path / "results.json").read_text() == before
    # the same config (threads aside) may be retrained in place
    Trainer(tiny_cfg(epochs=1, threads=2), tmp_path).fit()
