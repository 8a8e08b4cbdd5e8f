"""The alignment regulariser: the hooked term is exactly the alignment probe's |cos(X, X')|,
leaves the model's outputs alone, and moves |cos(X, X')| the way its sign says."""

import json

import pytest
import torch

import models
from cdsr.batching import TrainSampler
from cdsr.experiments.align_reg import AlignmentRegulariser, RegularisedModel
from cdsr.experiments.common import run_config
from cdsr.experiments.runner import RESULTS, RUNS_DIR, RunSpec, execute
from cdsr.loaders import load_dataset


def _setup(positions=(0, 1)):
    cfg = run_config("sasrec", "synthetic", 0, preset_name="tiny", epochs=1, device="cpu", threads=1, sets=[],
                     controlled={"gca_positions": list(positions), "dropout": 0.0, "gca_heads": 2})
    ds = load_dataset(cfg)
    model = models.build_model("sasrec", ds.n_items_a, ds.n_items_b, cfg)
    batch = next(iter(TrainSampler(ds, cfg["max_len"], 16, model.n_negatives, 0).epoch(1)))
    return model, batch


def test_term_equals_the_probe_and_outputs_are_unchanged():
    model, batch = _setup()
    # Without dropout, eval and train forwards agree; in eval the model's own probe records.
    model.eval()
    model.reset_alignment()
    with torch.no_grad():
        plain_loss, _ = model.loss(batch)
    stats = model.alignment_stats()
    assert set(stats) == {"gca0_ab", "gca0_ba", "gca1_ab", "gca1_ba"}
    probe = sum(s["cos_x_xprime"] for s in stats.values()) / len(stats)
    model.train()
    wrapped = RegularisedModel(model, 0.5)
    loss, logs = wrapped(batch)
    assert logs["align_cos"] == pytest.approx(probe, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(plain_loss) + 0.5 * probe, rel=1e-5)
    # The hooks are transparent in evaluation: same scores with and without them.
    model.eval()
    with torch.no_grad():
        again, _ = model.loss(batch)
    assert float(again) == pytest.approx(float(plain_loss), rel=1e-6)
    assert wrapped.reg.take() is None, "no term is collected in evaluation"


def test_gradient_reaches_the_gca_parameters():
    model, batch = _setup(positions=(0,))
    model.train()
    reg = AlignmentRegulariser(model, 1.0)
    model.loss(batch)
    term = reg.take()
    term.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("gca.")]
    assert grads and any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    reg.remove()


def test_a_model_without_gca_is_refused():
    model, _ = _setup(positions=())
    with pytest.raises(ValueError, match="no GCA module"):
        AlignmentRegulariser(model, 1.0)


def test_sign_of_the_weight_moves_the_alignment(tmp_path):
    specs = []
    for reg in (-20.0, 20.0):
        cfg = run_config("sasrec", "synthetic", 0, preset_name="tiny", epochs=3, device="cpu", threads=1, sets=[],
                         controlled={"gca_positions": [0]})
        specs.append(RunSpec({"align_reg": reg}, cfg, align_reg=reg))
    assert specs[0].run_id != specs[1].run_id
    manifest = execute("reg", specs, tmp_path)
    assert all(r["status"] == "done" for r in manifest["runs"])
    cos = {}
    for s in specs:
        res = json.loads((tmp_path / RUNS_DIR / s.run_id / RESULTS).read_text())
        assert res["align_reg"] == s.align_reg
        cos[s.align_reg] = sum(a["cos_x_xprime"] for a in res["alignment"].values()) / len(res["alignment"])
    assert cos[20.0] < cos[-20.0], cos
