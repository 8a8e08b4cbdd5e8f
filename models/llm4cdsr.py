"""LLM4CDSR (Liu et al., SIGIR 2025): LLM-enhanced cross-domain sequential recommendation, with
GCA at positions 0, 1, 2.

Re-implemented from the project's description (docs/paper-and-backbones.md) and read against
the authors' code:
- positions: learned per thread, counted back over merged columns from the window's latest
  column (`layers.time_positions`), so no position depends on later items;
- mixed thread: a frozen global item table (1024-d) through a two-layer linear adapter
  (1024 -> 512 -> hidden, no nonlinearity), times sqrt(global_dim), plus positions, into a
  SASRec encoder (2 pre-norm blocks, 1 head, point-wise feed-forward, dropout 0.5), causal;
- domain threads: frozen hidden-d per-domain item tables times sqrt(hidden), plus positions,
  each into its own SASRec over the compacted A-only / B-only history;
- the sqrt factors are the authors' (each thread's input scaled by the square root of its
  item table's width: the global table's for the mixed thread, although the adapter has
  already mapped it to `hidden`); `sqrt_scale=False` leaves the inputs unscaled. They scale
  the sequence inputs only: candidates are scored against the unscaled tables;
- score of a domain-A candidate at merged column t = <mixed state(t), adapted global(item)>
  + <A-thread state at the latest A item at or before t, frozen A(item)>; likewise B;
- loss: BCE with one sampled negative per position, L_A + L_B, + alpha x InfoNCE aligning
  the adapted embeddings of a random A item and a random B item of each user (in-batch
  negatives), + beta x InfoNCE between a user-profile embedding and the user's sequence
  representation (mixed state at the latest column).

Where this differs from the authors' code, and why:
- causal encoders: their SASRec's causal mask is commented out, so a position sees its own
  target (a leak); here every encoder is causal;
- coherent negative scoring: their loss adds the mixed thread's logit of the mixed
  sequence's negative to the domain thread's logit of the domain sequence's negative, two
  negatives the model receives as separate inputs, so a "negative score" need not belong to
  one item; here the mixed state at merged column t and the domain state at the latest item
  <= t score the same target and the same negative, as they do at evaluation;
- the frozen tables and the user profile are substitutes (below).

Substitutes (the original's inputs are LLM outputs that cannot be fetched here):
- frozen item tables: a user's `.npy` files (`emb_global_npy`, `emb_a_npy`, `emb_b_npy`), or,
  when none is given, the co-occurrence SVD of the training interactions
  (`models.embeddings.cooccurrence_embeddings`, unit-variance entries), built by
  `prepare_data(dataset)`;
- user profile: the original embeds an LLM-written profile text; here it is a trainable
  linear map of the mean frozen global embedding of the user's input history.

GCA[0]: after the scaled embedding + positions of the A and B threads, before their
encoders. GCA[1]: between the two SASRec blocks. GCA[2]: after the encoders, before scoring.
The A and B threads are compacted: the cross mask comes from the merged timeline (an A item
sees the B items strictly before it, and vice versa).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Recommender, drop_padding_columns, gather_rows
from models.embeddings import cooccurrence_embeddings, load_item_matrix
from models.scaling import ScalableMixin, scaled_config
from models.gca_block import build_gca, time_masks
from models.layers import Dropout, PreNormBlock, causal_valid_mask, time_positions


def info_nce(x: Tensor, y: Tensor, temperature: float) -> Tensor:
    """Symmetric in-batch InfoNCE between paired rows of x and y (N, d)."""
    if x.shape[0] < 2:
        return x.new_zeros(())
    x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    logits = x @ y.t() / temperature
    labels = torch.arange(x.shape[0], device=x.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))


class SASRecEncoder(nn.Module):
    """Stack of pre-norm causal blocks with a final LayerNorm; GCA can run between blocks."""

    def __init__(self, d: int, n_blocks: int, n_heads: int, inner: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList(PreNormBlock(d, n_heads, inner, dropout) for _ in range(n_blocks))
        self.final = nn.LayerNorm(d, eps=1e-8)

    def block(self, i: int, x: Tensor, valid: Tensor, allowed: Tensor) -> Tensor:
        return self.blocks[i](x, valid, allowed)

    def finish(self, x: Tensor, valid: Tensor) -> Tensor:
        return self.final(x) * valid.unsqueeze(-1).to(x.dtype)


class LLM4CDSR(ScalableMixin, Recommender):
    name = "llm4cdsr"
    gca_slots = (0, 1, 2)
    scale_key = "ffn_inner"

    @classmethod
    def default_config(cls) -> Dict[str, Any]:
        cfg = super().default_config()
        cfg.update({"hidden": 128, "max_len": 200, "dropout": 0.5, "n_blocks": 2, "n_heads": 1,
                    "ffn_inner": 128, "global_dim": 1024, "adapter_hidden": 512,
                    "alpha": 0.1, "beta": 0.1, "cl_temperature": 0.2, "init_std": 0.02,
                    "emb_global_npy": None, "emb_a_npy": None, "emb_b_npy": None,
                    "emb_cache_dir": None, "emb_seed": 0, "scale_to_match": [],
                    # thread inputs times sqrt(width of their item table), as the authors do
                    "sqrt_scale": True})
        return cfg

    def __init__(self, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None):
        config, n_target = scaled_config(type(self), n_items_a, n_items_b, dict(config or {}))
        super().__init__(n_items_a, n_items_b, config)
        c = self.config
        if c["n_blocks"] < 2 and 1 in c["gca_positions"]:
            raise ValueError("gca_positions contains 1 (between the SASRec blocks) but n_blocks < 2")
        d = c["hidden"]
        n = n_items_a + n_items_b
        # Frozen tables: buffers, not parameters (not trained, not counted); not saved in
        # checkpoints either (100 MB at abe's size): they are rebuilt from the .npy files or the
        # training data, deterministically.
        self.register_buffer("glob", torch.zeros(n + 1, c["global_dim"]), persistent=False)
        self.register_buffer("emb_a", torch.zeros(n_items_a + 1, d), persistent=False)
        self.register_buffer("emb_b", torch.zeros(n_items_b + 1, d), persistent=False)
        self.frozen_ready = False
        self.adapter1 = nn.Linear(c["global_dim"], c["adapter_hidden"])
        self.adapter2 = nn.Linear(c["adapter_hidden"], d)
        self.profile = nn.Linear(c["global_dim"], d)
        self.pos = nn.ModuleDict({s: nn.Embedding(c["max_len"] + 1, d, padding_idx=0) for s in "mab"})
        self.drop = Dropout(c["dropout"])
        self.enc = nn.ModuleDict({s: SASRecEncoder(d, c["n_blocks"], c["n_heads"], c["ffn_inner"], c["dropout"])
                                  for s in "mab"})
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=c["init_std"])
                with torch.no_grad():
                    m.weight[0].zero_()
        self.gca = build_gca(c["gca_positions"], d, c)
        self._record_counts(n_target)
        self._eval_table: Optional[Tensor] = None
        if c["emb_global_npy"] or c["emb_a_npy"] or c["emb_b_npy"]:
            self._load_npy()

    # ---- frozen tables -------------------------------------------------------------------------
    def _load_npy(self) -> None:
        c = self.config
        missing = [k for k in ("emb_global_npy", "emb_a_npy", "emb_b_npy") if not c[k]]
        if missing:
            raise ValueError(f"give all three frozen tables or none; missing {', '.join(missing)}")
        n = self.n_items_a + self.n_items_b
        self.set_frozen(load_item_matrix(c["emb_global_npy"], n, "emb_global_npy", c["global_dim"]),
                        load_item_matrix(c["emb_a_npy"], self.n_items_a, "emb_a_npy", c["hidden"]),
                        load_item_matrix(c["emb_b_npy"], self.n_items_b, "emb_b_npy", c["hidden"]))

    def set_frozen(self, glob: np.ndarray, emb_a: np.ndarray, emb_b: np.ndarray) -> None:
        for name, arr in (("glob", glob), ("emb_a", emb_a), ("emb_b", emb_b)):
            buf = getattr(self, name)
            if tuple(arr.shape) != tuple(buf.shape):
                raise ValueError(f"frozen table {name} must have shape {tuple(buf.shape)}, got {arr.shape}")
            buf.copy_(torch.as_tensor(arr, dtype=buf.dtype))
        self.frozen_ready = True
        self._eval_table = None

    def prepare_data(self, dataset) -> None:
        """Build the substitute frozen tables from the dataset's training interactions (each
        timeline minus its validation and test items) unless `.npy` tables were given.
        `dataset` needs `offsets` and `items` (the pipeline's CDSRDataset)."""
        if self.frozen_ready:
            return
        c = self.config
        glob, a, b = cooccurrence_embeddings(dataset.offsets, dataset.items, self.n_items_a, self.n_items_b,
                                             global_dim=c["global_dim"], domain_dim=c["hidden"],
                                             seed=c["emb_seed"], cache_dir=c["emb_cache_dir"])
        self.set_frozen(glob, a, b)

    def _check_ready(self) -> None:
        if not self.frozen_ready:
            raise RuntimeError("llm4cdsr: frozen item tables not loaded: pass emb_global_npy, emb_a_npy and "
                               "emb_b_npy (--set), or call model.prepare_data(dataset) before training")

    def train(self, mode: bool = True):
        self._eval_table = None  # the adapted table is cached for evaluation only
        return super().train(mode)

    def _adapter_map(self) -> Tuple[Tensor, Tensor]:
        """The two-layer linear adapter folded into one map (W2 W1, W2 b1 + b2): the same
        function and gradients for W1, W2, at a quarter of the cost per item row."""
        w = self.adapter2.weight @ self.adapter1.weight
        b = self.adapter2.weight @ self.adapter1.bias + self.adapter2.bias
        return w, b

    def adapt(self, ids: Tensor, table: Optional[Tensor] = None) -> Tensor:
        """Adapted global embeddings of item ids (any shape) -> (..., hidden): rows of `table`
        (this step's `adapted_table()`, computed here when not given)."""
        return (self.adapted_table() if table is None else table)[ids]

    def adapted_table(self) -> Tensor:
        """The adapter applied to the whole frozen global table, (n_items + 1, hidden): once
        per training step (every adapted row of a step is gathered from it), cached for
        evaluation (in eval mode without autograd, so that no graph outlives its step). Why
        not adapt the gathered rows: a training step of batch 128 and L 200 adapts
        128 x 200 x 3 rows (sequence, targets, negatives; abe has 24.6k items), and gathering
        1024-d rows moves 8x the bytes of gathering adapted 128-d ones."""
        cache = not self.training and not torch.is_grad_enabled()
        if cache and self._eval_table is not None:
            return self._eval_table
        w, b = self._adapter_map()
        table = F.linear(self.glob, w, b)
        if cache:
            self._eval_table = table
        return table

    @property
    def n_negatives(self) -> Dict[str, int]:
        return {"A": 1, "B": 1}

    # ---- encoders -------------------------------------------------------------------------------
    def _thread_input(self, s: str, x: Tensor, valid: Tensor, time: Tensor) -> Tensor:
        """Thread s's encoder input: item embeddings x (B, L, hidden) times sqrt(width of s's
        item table) when `sqrt_scale`, plus positions, dropout, zero on padding."""
        if self.config["sqrt_scale"]:
            x = x * (self.config["global_dim"] if s == "m" else self.config["hidden"]) ** 0.5
        pos = self.pos[s](time_positions(time, time.shape[1]))
        return self.drop(x + pos) * valid.unsqueeze(-1).to(x.dtype)

    def encode(self, batch: Dict[str, Tensor], table: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
        """(mixed (B, L, d) on merged columns, A-thread and B-thread (B, L, d) on compacted
        positions); `table`: this step's `adapted_table()`, if the caller has it."""
        self._check_ready()
        c = self.config
        seq, seq_a, seq_b = batch["seq"], batch["seq_a"], batch["seq_b"]
        vm, va, vb = seq > 0, seq_a > 0, seq_b > 0
        cols = torch.arange(seq.shape[1], device=seq.device).expand_as(seq)
        h_m = self._thread_input("m", self.adapt(seq, table), vm, torch.where(vm, cols, -1))
        h_a = self._thread_input("a", self.emb_a[seq_a], va, batch["time_a"])
        h_b = self._thread_input("b", self.emb_b[(seq_b - self.n_items_a).clamp(min=0)], vb, batch["time_b"])
        positions = c["gca_positions"]
        masks = time_masks(batch["time_a"], batch["time_b"]) if positions else None
        if 0 in positions:
            h_a, h_b = self.gca["gca0"](h_a, h_b, va, vb, masks)
        allowed = {s: causal_valid_mask(v) for s, v in (("m", vm), ("a", va), ("b", vb))}
        for i in range(c["n_blocks"]):
            h_m = self.enc["m"].block(i, h_m, vm, allowed["m"])
            h_a = self.enc["a"].block(i, h_a, va, allowed["a"])
            h_b = self.enc["b"].block(i, h_b, vb, allowed["b"])
            if i == 0 and 1 in positions:
                h_a, h_b = self.gca["gca1"](h_a, h_b, va, vb, masks)
        h_m, h_a, h_b = self.enc["m"].finish(h_m, vm), self.enc["a"].finish(h_a, va), self.enc["b"].finish(h_b, vb)
        if 2 in positions:
            h_a, h_b = self.gca["gca2"](h_a, h_b, va, vb, masks)
        return h_m, h_a, h_b

    def _scores(self, states: Tuple[Tensor, Tensor, Tensor], batch: Dict[str, Tensor], items: Tensor,
                table: Tensor) -> Tensor:
        """Scores (B, L, K) of items (B, L, K) at every merged column, each item scored in its
        own domain (mixed thread + that domain's thread at its latest item <= the column);
        `table` = `adapted_table()`."""
        h_m, h_a, h_b = states
        st_a, st_b = gather_rows(h_a, batch["last_a"]), gather_rows(h_b, batch["last_b"])
        is_b = items > self.n_items_a
        mixed = torch.einsum("bld,blkd->blk", h_m, table[items])
        dom_a = torch.einsum("bld,blkd->blk", st_a, self.emb_a[torch.where(is_b, 0, items)])
        dom_b = torch.einsum("bld,blkd->blk", st_b,
                             self.emb_b[torch.where(is_b, items - self.n_items_a, 0)])
        return mixed + torch.where(is_b, dom_b, dom_a)

    def position_scores(self, batch: Dict[str, Tensor], items: Tensor) -> Tensor:
        table = self.adapted_table()
        return self._scores(self.encode(batch, table), batch, items, table)

    # ---- training -------------------------------------------------------------------------------
    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        c = self.config
        batch = drop_padding_columns(batch)
        tdom, target = batch["target_domain"], batch["target"]
        neg = torch.where((tdom == 1).unsqueeze(-1), batch["neg_b"][..., :1], batch["neg_a"][..., :1])
        table = self.adapted_table()
        states = self.encode(batch, table)
        h_m = states[0]
        s = self._scores(states, batch, torch.cat([target.unsqueeze(-1), neg], dim=-1), table)
        bce = F.softplus(-s[..., 0]) + F.softplus(s[..., 1])
        total = bce.new_zeros(())
        logs: Dict[str, float] = {}
        for d in (0, 1):
            m = (tdom == d).to(bce.dtype)
            part = (bce * m).sum() / m.sum().clamp(min=1)
            logs[f"loss_{'AB'[d]}"] = float(part.detach())
            total = total + part
        seq = batch["seq"]
        if c["alpha"]:
            # One random A item and one random B item of each user's input (users with both).
            both = (batch["seq_a"] > 0).any(1) & (batch["seq_b"] > 0).any(1)
            if int(both.sum()) >= 2:
                pick_a = torch.multinomial((batch["seq_a"][both] > 0).float(), 1)
                pick_b = torch.multinomial((batch["seq_b"][both] > 0).float(), 1)
                ia = batch["seq_a"][both].gather(1, pick_a).squeeze(1)
                ib = batch["seq_b"][both].gather(1, pick_b).squeeze(1)
                cl = info_nce(table[ia], table[ib], c["cl_temperature"])
                logs["loss_align"] = float(cl.detach())
                total = total + c["alpha"] * cl
        if c["beta"]:
            # Mean frozen global row of the input's items (padding id 0 excluded; zero when
            # none), without materialising the (B, L, 1024) gather.
            mean_glob = F.embedding_bag(seq, self.glob, mode="mean", padding_idx=0)
            has = seq[:, -1] > 0
            cl = info_nce(self.profile(mean_glob[has]), h_m[has, -1], c["cl_temperature"])
            logs["loss_profile"] = float(cl.detach())
            total = total + c["beta"] * cl
        return total, logs

    # ---- evaluation -------------------------------------------------------------------------------
    def score(self, batch: Dict[str, Tensor], candidates: Tensor) -> Tensor:
        batch = drop_padding_columns(batch)
        table = self.adapted_table()
        h_m, h_a, h_b = self.encode(batch, table)
        mixed = torch.bmm(table[candidates], h_m[:, -1].unsqueeze(-1)).squeeze(-1)
        is_b = (batch["eval_domain"] == 1).unsqueeze(-1)
        dom_a = torch.bmm(self.emb_a[torch.where(is_b, 0, candidates)], h_a[:, -1].unsqueeze(-1)).squeeze(-1)
        idx_b = torch.where(is_b, candidates - self.n_items_a, 0).clamp(min=0)
        dom_b = torch.bmm(self.emb_b[idx_b], h_b[:, -1].unsqueeze(-1)).squeeze(-1)
        return mixed + torch.where(is_b, dom_b, dom_a)
