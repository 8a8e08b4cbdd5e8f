"""The experiments' analyses on hand-made results (no training): grouping, deltas,
correlations, per-epoch tracks, efficiency ratios, and the Markdown they produce."""

import math

import pytest

from cdsr.experiments import alignment, scaling, table
from cdsr.experiments.common import module_domain, module_slot


def fake_results(ndcg_a, ndcg_b, alignment_=None, n_params=1000, history=None, auc=0.7):
    test = {}
    for d, v in (("A", ndcg_a), ("B", ndcg_b)):
        test[d] = {"ndcg@1": v / 2, "ndcg@10": v, "auc": auc, "hr@5": v, "hr@10": v, "hr@20": v, "mrr": v / 3}
    return {"test": test, "alignment": alignment_ or {}, "n_params": n_params, "epochs_run": 3, "best_epoch": 2,
            "wall_time_s": 1.0, "history": history or []}


def test_module_names_map_to_query_domain():
    assert module_domain("gca0_ab") == "A" and module_domain("gca2_ba") == "B"
    assert module_domain("gca1") is None
    assert module_slot("gca2_ba") == 2


def test_table_groups_and_deltas_against_bare_and_paper():
    rows = []
    for variant, pos, vals in (("bare", [], (0.10, 0.12)), ("GCA_early", [0], (0.20, 0.22)),
                               ("GCA_stack", [0, 1], (0.15, 0.16))):
        for seed, jitter in ((0, -0.01), (1, 0.01)):
            rows.append({"labels": {"model": "abxi", "data": "abe", "variant": variant, "positions": pos, "seed": seed},
                         "results": fake_results(vals[0] + jitter, vals[1] + jitter)})
    groups = table.aggregate(rows)
    assert [g["variant"] for g in groups] == ["bare", "GCA_early", "GCA_stack"]
    early = groups[1]["metrics"]["A"]["ndcg@10"]
    assert early["mean"] == pytest.approx(0.20) and early["std"] == pytest.approx(0.02 / math.sqrt(2)) and early["n"] == 2
    comp = table.compare(groups)
    d = comp[0]["deltas"]["ndcg@10_A"]
    assert comp[0]["variant"] == "GCA_early" and d["ours"] == pytest.approx(0.10) and d["beyond_1_std"]
    # Paper: ABXI Beauty-Elec GCA_early minus bare on NDCG@10 A = 0.1793 - 0.1724.
    assert d["paper"] == pytest.approx(0.1793 - 0.1724) and d["same_sign"]
    md = table.markdown(groups, comp)
    assert "| abxi | Beauty-Elec | 1,000 | 2 | 0.0500 ± 0.0071 | 0.1000 ± 0.0141 |" in md
    assert "+0.1000*" in md and "+0.0069" in md


def test_alignment_correlation_per_backbone_and_domain():
    rows = []
    for i, (cos_a, cos_b) in enumerate([(0.1, 0.3), (0.2, 0.2), (0.3, 0.1), (0.4, 0.05)]):
        al = {"gca0_ab": {"cos_x_xprime": cos_a, "cos_x_y": 0.3}, "gca0_ba": {"cos_x_xprime": cos_b, "cos_x_y": 0.3}}
        # NDCG of A falls linearly with A's alignment; NDCG of B rises as B's alignment falls.
        rows.append({"id": str(i), "labels": {"model": "m", "data": "abe", "positions": [0]},
                     "results": fake_results(0.5 - cos_a, 0.2 + (0.3 - cos_b), al)})
    corr = alignment.correlations(rows)
    by_dom = {p["domain"]: p for p in corr["panels"]}
    assert by_dom["A"]["r"] == pytest.approx(-1.0) and by_dom["A"]["n"] == 4
    assert by_dom["B"]["r"] == pytest.approx(-1.0)
    dists = alignment.distributions(rows)
    assert len(dists["abe"]["x_xprime"]) == 8 and set(dists["abe"]["x_y"]) == {0.3}


def test_alignment_epoch_tracks_and_reg_effect():
    hist = [{"epoch": e, "alignment": {"gca0_ab": {"cos_x_xprime": c, "cos_x_y": 0.2}},
             "valid": {"A": {"ndcg@10": v}, "B": {"ndcg@10": 0.1}}}
            for e, c, v in ((1, 0.3, 0.10), (2, 0.2, 0.15), (3, 0.1, 0.22))]
    labels = {"model": "m", "data": "afk", "positions": [0], "hidden": 64, "heads": 4, "activation": "sigmoid",
              "layer_norm": True, "seed": 0}
    rows = [{"id": "r0", "labels": {**labels, "align_reg": 0.0}, "results": fake_results(0.2, 0.1, history=hist,
             alignment_={"gca0_ab": {"cos_x_xprime": 0.2, "cos_x_y": 0.2}})},
            {"id": "r1", "labels": {**labels, "align_reg": 1.0}, "results": fake_results(
                0.1, 0.1, alignment_={"gca0_ab": {"cos_x_xprime": 0.05, "cos_x_y": 0.2}})}]
    tracks = alignment.epoch_tracks(rows)
    assert len(tracks) == 1 and list(tracks[0]["cos"]) == ["A"]  # no B-query module: no B curve
    assert tracks[0]["r"]["A"]["r"] < -0.9
    reg = alignment.align_reg_effect(rows)
    assert [r["align_reg"] for r in reg] == [0.0, 1.0]
    assert reg[1]["cos"]["mean"] == pytest.approx(0.05)
    md = alignment.markdown(alignment.correlations(rows), alignment.distributions(rows), tracks, reg)
    assert "1 of 1 tracked (run, domain) curves have a negative correlation" in md
    assert "Alignment regulariser" in md


def test_scaling_efficiency_from_points():
    rows = []
    for variant, width, params, score in (("bare", 8, 1000, 0.10), ("bare", 16, 4000, 0.20), ("bare", 32, 16000, 0.30),
                                          ("GCA_early", 8, 1200, 0.15), ("GCA_early", 32, 17000, 0.40),
                                          ("bare_matched", 8, 1200, 0.11), ("bare_matched", 32, 16000, 0.3)):
        rows.append({"labels": {"model": "m", "data": "abe", "variant": variant, "width": width, "seed": 0},
                     "results": fake_results(score, score, n_params=params)})
    points = scaling.aggregate(rows)
    assert [p["variant"] for p in points[:3]] == ["bare"] * 3
    eff_list = scaling.efficiency(points)
    eff = {e["width"]: e for e in eff_list}
    assert eff[8]["mean"]["relation"] == "=" and eff[8]["mean"]["ratio"] == pytest.approx(2000 / 1200)
    assert eff[32]["mean"]["relation"] == ">"
    assert eff[8]["matched"]["delta_gca_minus_matched"] == pytest.approx(0.04)
    md = scaling.markdown(points, eff_list)
    assert "1.67x" in md and "> 0.94x" in md and "+0.0400 (1,200 params) |" in md
    # A "matched" baseline whose count is off by more than 2% is called out.
    assert "(16,000 params, -5.9% vs GCA: NOT matched)" in md
