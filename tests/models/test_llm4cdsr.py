"""LLM4CDSR: frozen tables (.npy and co-occurrence substitute), shapes, GCA on/off, no leak."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import models
from models.embeddings import cooccurrence_embeddings, load_item_matrix, training_prefixes
from tests.models.helpers import N_A, N_B, eval_batch, random_timelines, train_batch

TINY = {"hidden": 16, "ffn_inner": 16, "global_dim": 24, "adapter_hidden": 20, "max_len": 8,
        "gca_heads": 2, "gca_backend": "eager", "dropout": 0.1}


def _dataset(rng, n_users=12):
    tl = random_timelines(n_users, 10, rng, min_len=5)
    rows = [r[r > 0] for r in tl]
    offsets = np.concatenate([[0], np.cumsum([len(r) for r in rows])])
    return SimpleNamespace(offsets=offsets, items=np.concatenate(rows), n_items_a=N_A, n_items_b=N_B)


def _model(gca, tmp_path, **kw):
    m = models.build_model("llm4cdsr", N_A, N_B, dict(TINY, gca_positions=gca, emb_cache_dir=str(tmp_path), **kw))
    m.prepare_data(_dataset(np.random.default_rng(0)))
    return m


def test_training_prefixes_drop_the_last_two_items():
    users, items = training_prefixes(np.array([0, 4, 6, 11]), np.arange(1, 12))
    assert users.tolist() == [0, 0, 2, 2, 2] and items.tolist() == [1, 2, 7, 8, 9]


def test_cooccurrence_embeddings_shapes_cache_and_no_heldout_items(tmp_path):
    ds = _dataset(np.random.default_rng(1))
    g, a, b = cooccurrence_embeddings(ds.offsets, ds.items, N_A, N_B, global_dim=24, domain_dim=16,
                                      cache_dir=str(tmp_path))
    assert g.shape == (N_A + N_B + 1, 24) and a.shape == (N_A + 1, 16) and b.shape == (N_B + 1, 16)
    assert (g[0] == 0).all() and (a[0] == 0).all() and np.isfinite(g).all()
    assert len(list(tmp_path.glob("*.npz"))) == 1
    g2, _, _ = cooccurrence_embeddings(ds.offsets, ds.items, N_A, N_B, global_dim=24, domain_dim=16,
                                       cache_dir=str(tmp_path))
    np.testing.assert_array_equal(g, g2)
    # the validation/test items (last two of each timeline) do not influence the tables
    items = ds.items.copy()
    ends = ds.offsets[1:]
    items[ends - 1] = np.where(items[ends - 1] > N_A, N_A + 1, 1)
    items[ends - 2] = np.where(items[ends - 2] > N_A, N_A + 2, 2)
    g3, _, _ = cooccurrence_embeddings(ds.offsets, items, N_A, N_B, global_dim=24, domain_dim=16,
                                       cache_dir=str(tmp_path / "other"))
    np.testing.assert_allclose(g3, g, atol=1e-5)


def test_load_item_matrix_accepts_with_and_without_padding_row(tmp_path):
    m = np.random.default_rng(0).normal(size=(N_A, 16)).astype(np.float32)
    np.save(tmp_path / "a.npy", m)
    out = load_item_matrix(str(tmp_path / "a.npy"), N_A, "emb_a_npy", 16)
    assert out.shape == (N_A + 1, 16) and (out[0] == 0).all()
    np.testing.assert_array_equal(out[1:], m)
    np.save(tmp_path / "a1.npy", np.concatenate([np.ones((1, 16), np.float32), m]))
    np.testing.assert_array_equal(load_item_matrix(str(tmp_path / "a1.npy"), N_A, "emb_a_npy", 16), out)
    with pytest.raises(ValueError, match="emb_a_npy.*rows"):
        load_item_matrix(str(tmp_path / "a.npy"), N_A + 3, "emb_a_npy", 16)
    with pytest.raises(ValueError, match="columns"):
        load_item_matrix(str(tmp_path / "a.npy"), N_A, "emb_a_npy", 8)


def test_npy_tables_through_config(tmp_path):
    rng = np.random.default_rng(2)
    paths = {}
    for key, rows, dim in (("emb_global_npy", N_A + N_B, 24), ("emb_a_npy", N_A, 16), ("emb_b_npy", N_B, 16)):
        np.save(tmp_path / f"{key}.npy", rng.normal(size=(rows, dim)).astype(np.float32))
        paths[key] = str(tmp_path / f"{key}.npy")
    m = models.build_model("llm4cdsr", N_A, N_B, dict(TINY, **paths))
    assert m.frozen_ready
    np.testing.assert_allclose(m.emb_b[1:].numpy(), np.load(paths["emb_b_npy"]))
    with pytest.raises(ValueError, match="missing emb_b_npy"):
        models.build_model("llm4cdsr", N_A, N_B, dict(TINY, emb_global_npy=paths["emb_global_npy"],
                                                       emb_a_npy=paths["emb_a_npy"]))


def test_unprepared_model_says_what_to_do():
    m = models.build_model("llm4cdsr", N_A, N_B, dict(TINY))
    rng = np.random.default_rng(3)
    with pytest.raises(RuntimeError, match="prepare_data"):
        m.loss(train_batch(random_timelines(3, 9, rng), m.n_negatives, rng))


@pytest.mark.parametrize("gca", [[], [0], [1], [2], [0, 1, 2]])
def test_forward_backward_score(gca, tmp_path):
    rng = np.random.default_rng(4)
    m = _model(gca, tmp_path)
    frozen = {n for n, _ in m.named_buffers()}
    assert {"glob", "emb_a", "emb_b"} <= frozen
    assert all(not n.startswith(("glob", "emb_")) for n, _ in m.named_parameters())
    batch = train_batch(random_timelines(6, 9, rng), m.n_negatives, rng)
    loss, logs = m.loss(batch)
    assert torch.isfinite(loss) and {"loss_A", "loss_B"} <= set(logs)
    loss.backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    m.eval()
    eb = eval_batch(random_timelines(6, 8, rng), np.array([0, 1, 1, 0, 1, 0]), 5, rng)
    s = m.score(eb, eb["candidates"])
    assert s.shape == (6, 5) and torch.isfinite(s).all()
    assert set(m.alignment_stats()) == {f"gca{p}_{d}" for p in gca for d in ("ab", "ba")}


@pytest.mark.parametrize("gca", [[], [0, 1, 2]])
def test_no_leak_scores_at_t_ignore_later_items(gca, tmp_path):
    rng = np.random.default_rng(5)
    m = _model(gca, tmp_path).eval()
    tl = random_timelines(5, 9, rng, min_len=9)
    cand = torch.from_numpy(rng.integers(1, N_A + N_B + 1, size=(5, 8, 4)))
    base = m.position_scores(train_batch(tl, m.n_negatives, rng), cand)
    for t in range(7):
        other = tl.copy()
        # anything may change after column t: identities and domains
        other[:, t + 1:] = rng.integers(1, N_A + N_B + 1, size=other[:, t + 1:].shape)
        s = m.position_scores(train_batch(other, m.n_negatives, rng), cand)
        torch.testing.assert_close(s[:, :t + 1], base[:, :t + 1], rtol=1e-5, atol=1e-5)


def test_eval_score_matches_last_training_column(tmp_path):
    rng = np.random.default_rng(6)
    m = _model([0, 2], tmp_path).eval()
    tl = random_timelines(4, 9, rng, min_len=4)
    tb = train_batch(tl, m.n_negatives, rng)
    dom = tb["target_domain"][:, -1].numpy()
    eb = eval_batch(tl[:, :-1], dom, 5, rng)
    s_eval = m.score(eb, eb["candidates"])
    s_train = m.position_scores(tb, eb["candidates"][:, None, :].expand(-1, 8, -1).contiguous())[:, -1]
    torch.testing.assert_close(s_eval, s_train, rtol=1e-5, atol=1e-5)


def test_folded_adapter_is_the_two_layer_adapter(tmp_path):
    m = _model([], tmp_path)
    ids = torch.tensor([[1, 5, N_A + 2], [0, 3, N_A + N_B]])
    torch.testing.assert_close(m.adapt(ids), m.adapter2(m.adapter1(m.glob[ids])), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sqrt_scale", [True, False])
def test_thread_inputs_are_scaled_by_the_root_of_their_table_width(tmp_path, sqrt_scale):
    """Encoder inputs: adapted global embedding x sqrt(global_dim) (mixed thread), frozen
    domain embedding x sqrt(hidden) (domain threads), plus positions; zero on padding."""
    torch.manual_seed(0)
    m = _model([], tmp_path, sqrt_scale=sqrt_scale).eval()
    rng = np.random.default_rng(4)
    batch = train_batch(random_timelines(4, 9, rng), m.n_negatives, rng)
    seen = {}
    for s in "mab":
        m.enc[s].blocks[0].register_forward_pre_hook(lambda mod, args, s=s: seen.__setitem__(s, args[0]))
    m.loss(batch)
    f_m, f_d = (24 ** 0.5, 16 ** 0.5) if sqrt_scale else (1.0, 1.0)
    seq, length = batch["seq"], batch["seq"].shape[1]
    cols = torch.arange(length).expand_as(seq)
    pos_m = m.pos["m"](torch.where(seq > 0, length - cols, 0))
    want_m = (m.adapt(seq) * f_m + pos_m) * (seq > 0).unsqueeze(-1)
    torch.testing.assert_close(seen["m"], want_m)
    ids_a, time_a = batch["seq_a"], batch["time_a"]
    pos_a = m.pos["a"](torch.where(time_a >= 0, length - time_a, 0))
    torch.testing.assert_close(seen["a"], (m.emb_a[ids_a] * f_d + pos_a) * (ids_a > 0).unsqueeze(-1))
    ids_b = (batch["seq_b"] - N_A).clamp(min=0)
    pos_b = m.pos["b"](torch.where(batch["time_b"] >= 0, length - batch["time_b"], 0))
    torch.testing.assert_close(seen["b"], (m.emb_b[ids_b] * f_d + pos_b) * (batch["seq_b"] > 0).unsqueeze(-1))


@pytest.mark.parametrize("gca", [[], [0, 1, 2]])
def test_dropping_leading_padding_columns_changes_nothing(gca, tmp_path, monkeypatch):
    """loss and score drop the columns that are padding in every row (LLM4CDSR's max_len 200
    over histories of at most 48): same loss, gradients and scores as on the full width."""
    import models.llm4cdsr as mod
    from models.base import drop_padding_columns

    rng = np.random.default_rng(7)
    # alpha = 0: the alignment term picks one random item per user with torch.multinomial,
    # whose draws depend on the row width (same distribution, different picks).
    m = _model(gca, tmp_path, max_len=12, alpha=0.0, dropout=0.0).double().train()
    tl = np.zeros((5, 13), np.int64)
    tl[:, 6:] = random_timelines(5, 7, rng, min_len=3)  # at least 6 leading padding columns
    tb = train_batch(tl, m.n_negatives, rng)
    eb = eval_batch(tl[:, 1:], np.array([0, 1, 1, 0, 1]), 5, rng)
    assert drop_padding_columns(tb)["seq"].shape[1] < tb["seq"].shape[1]

    def run():
        loss, _ = m.loss(tb)
        grads = torch.autograd.grad(loss, [p for p in m.parameters() if p.requires_grad], allow_unused=True)
        return loss.detach(), grads, m.score(eb, eb["candidates"]).detach()

    trimmed = run()
    monkeypatch.setattr(mod, "drop_padding_columns", lambda batch: batch)
    full = run()
    torch.testing.assert_close(trimmed[0], full[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(trimmed[1], full[1]):
        if a is None or b is None:
            assert a is None and b is None
        else:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(trimmed[2], full[2], rtol=1e-10, atol=1e-12)


def test_drop_padding_columns_shifts_index_keys():
    from models.base import drop_padding_columns

    rng = np.random.default_rng(8)
    tl = np.zeros((3, 10), np.int64)
    tl[:, 4:] = random_timelines(3, 6, rng, min_len=6)  # exactly 4 leading padding columns
    tb = train_batch(tl, {"A": 2, "B": 2}, rng)
    out = drop_padding_columns(tb)
    assert out["seq"].shape == (3, 5) and out["neg_a"].shape == (3, 5, 2)
    for key in ("time_a", "time_b", "last_a", "last_b"):
        v = tb[key][:, 4:]
        want = torch.where(v >= 0, v - 4, v)
        assert torch.equal(out[key], want), key
    assert torch.equal(out["user"], tb["user"])
    # the trimmed time_* still index the trimmed merged sequence's items
    for d, key in ((0, "a"), (1, "b")):
        t = out[f"time_{key}"]
        rows, pos = (t >= 0).nonzero(as_tuple=True)
        assert torch.equal(out["seq"][rows, t[rows, pos]], out[f"seq_{key}"][rows, pos])
    # nothing to drop: the same dict; nothing at all: one column stays
    full = train_batch(random_timelines(3, 6, rng, min_len=6), {"A": 1, "B": 1}, rng)
    assert drop_padding_columns(full) is full
    empty = {k: torch.zeros_like(v) for k, v in full.items()}
    assert drop_padding_columns(empty)["seq"].shape[1] == 1
