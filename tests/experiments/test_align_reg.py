"""The alignment regulariser as the experiments use it: the models' `align_reg` option (their
GCA modules' term, `models/gca_block.py`) equals the alignment probe's |cos(X, X')| on the same
batch, leaves evaluation alone, is what the experiment trainer's `align_reg` sets, and moves
|cos(X, X')| the way its sign says."""

import json

import pytest
import torch

import models
from cdsr.batching import TrainSampler
from cdsr.experiments.common import run_config
from cdsr.experiments.probe import ProbedTrainer
from cdsr.experiments.runner import RESULTS, RUNS_DIR, RunSpec, execute
from cdsr.loaders import load_dataset


def _config(positions=(0, 1), **controlled):
    return run_config("sasrec", "synthetic", 0, preset_name="tiny", epochs=1, device="cpu", threads=1, sets=[],
                      controlled={"gca_positions": list(positions), "dropout": 0.0, "gca_heads": 2, **controlled})


def _setup(positions=(0, 1), align_reg=0.0):
    cfg = _config(positions, align_reg=align_reg)
    ds = load_dataset(cfg)
    model = models.build_model("sasrec", ds.n_items_a, ds.n_items_b, cfg)
    batch = next(iter(TrainSampler(ds, cfg["max_len"], 16, model.n_negatives, 0).epoch(1)))
    return model, batch


def test_term_equals_the_probe_and_evaluation_is_unchanged():
    model, batch = _setup(align_reg=0.5)
    # Without dropout, eval and train forwards agree; in eval the model's own probe records.
    model.eval()
    model.reset_alignment()
    with torch.no_grad():
        plain_loss, logs = model(batch)
    assert "align_cos" not in logs
    stats = model.alignment_stats()
    assert set(stats) == {"gca0_ab", "gca0_ba", "gca1_ab", "gca1_ba"}
    probe = sum(s["cos_x_xprime"] for s in stats.values()) / len(stats)
    model.train()
    loss, logs = model(batch)
    assert logs["align_cos"] == pytest.approx(probe, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(plain_loss) + 0.5 * probe, rel=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("gca.")]
    assert grads and all(g is not None for g in grads)


def test_experiment_weight_sets_the_models_option(tmp_path):
    trainer = ProbedTrainer(_config(), tmp_path / "a", align_reg=-2.0)
    assert trainer.model.gca.align_reg == -2.0 and trainer.cfg["align_reg"] == 0.0
    with pytest.raises(ValueError, match="align_reg given twice"):
        ProbedTrainer(_config(align_reg=1.0), tmp_path / "b", align_reg=-2.0)
    with pytest.raises(ValueError, match="gca_positions is empty"):
        ProbedTrainer(_config(positions=()), tmp_path / "c", align_reg=-2.0)


def test_sign_of_the_weight_moves_the_alignment(tmp_path):
    specs = []
    for reg in (-20.0, 20.0):
        cfg = run_config("sasrec", "synthetic", 0, preset_name="tiny", epochs=3, device="cpu", threads=1, sets=[],
                         controlled={"gca_positions": [0], "align_reg": reg})
        specs.append(RunSpec({"align_reg": reg}, cfg))
    assert specs[0].run_id != specs[1].run_id
    manifest = execute("reg", specs, tmp_path)
    assert all(r["status"] == "done" for r in manifest["runs"])
    cos = {}
    for s in specs:
        res = json.loads((tmp_path / RUNS_DIR / s.run_id / RESULTS).read_text())
        assert res["config"]["align_reg"] == s.labels["align_reg"]
        cos[s.labels["align_reg"]] = sum(a["cos_x_xprime"] for a in res["alignment"].values()) / len(res["alignment"])
    assert cos[20.0] < cos[-20.0], cos
