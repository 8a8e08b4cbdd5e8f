"""A small cross-domain SASRec: the pipeline's end-to-end test model and the simplest of the
four backbones.

Three one-block post-norm causal transformers (`layers.PostNormBlock`) share one item
embedding: one over the merged sequence, one over the compacted A-only history, one over the
compacted B-only history. A user's state for a domain-d target is merged_state(t) +
d_state(latest d item at or before t); scores are dot products with the item embedding; the
loss is a sampled softmax per domain (L_A + L_B).

GCA slots (`gca_block.GCAPair`): GCA[0] right after the embeddings of the compacted A and B
streams (A attends to B and B to A, in parallel, from the pre-GCA values); GCA[1] after the
domain encoders, before scoring. The cross mask comes from the merged timeline
(`gca_block.time_masks`): an A position sees only the B items that came strictly before it
(and vice versa).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from models.base import Recommender, gather_rows, right_positions, sampled_softmax
from models.gca_block import build_gca, time_masks
from models.layers import Dropout, PostNormBlock
from models.scaling import ScalableMixin, scaled_config


class SASRec(ScalableMixin, Recommender):
    name = "sasrec"
    gca_slots = (0, 1)
    scale_key = "ffn_inner"  # widened by scale_to_match (models/scaling.py)

    @classmethod
    def default_config(cls) -> Dict[str, Any]:
        cfg = super().default_config()
        cfg.update({"n_heads": 1, "ffn_inner": 128, "n_neg": 16, "temperature": 1.0, "init_std": 0.05,
                    "scale_to_match": []})
        return cfg

    def __init__(self, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None):
        config, n_target = scaled_config(type(self), n_items_a, n_items_b, dict(config or {}))
        super().__init__(n_items_a, n_items_b, config)
        c = self.config
        d = c["hidden"]
        self.item_emb = nn.Embedding(n_items_a + n_items_b + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(c["max_len"] + 1, d, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=c["init_std"])
        nn.init.normal_(self.pos_emb.weight, std=c["init_std"])
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()
        self.emb_drop = Dropout(c["dropout"])
        self.encoders = nn.ModuleDict({s: PostNormBlock(d, c["n_heads"], c["ffn_inner"], c["dropout"])
                                       for s in ("m", "a", "b")})
        self.gca = build_gca(c["gca_positions"], d, c)
        self._record_counts(n_target)

    @property
    def n_negatives(self) -> Dict[str, int]:
        return {"A": self.config["n_neg"], "B": self.config["n_neg"]}

    # ---- encoding ------------------------------------------------------------------------
    def _embed(self, seq: Tensor) -> Tensor:
        x = self.item_emb(seq) + self.pos_emb(right_positions(seq))
        return self.emb_drop(x) * (seq > 0).unsqueeze(-1).to(x.dtype)

    def encode(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        seq, seq_a, seq_b = batch["seq"], batch["seq_a"], batch["seq_b"]
        valid_a, valid_b = seq_a > 0, seq_b > 0
        positions = self.config["gca_positions"]
        masks = time_masks(batch["time_a"], batch["time_b"]) if positions else None
        h_m = self.encoders["m"](self._embed(seq), seq > 0)
        x_a, x_b = self._embed(seq_a), self._embed(seq_b)
        if 0 in positions:
            x_a, x_b = self.gca["gca0"](x_a, x_b, valid_a, valid_b, masks)
        h_a = self.encoders["a"](x_a, valid_a)
        h_b = self.encoders["b"](x_b, valid_b)
        if 1 in positions:
            h_a, h_b = self.gca["gca1"](h_a, h_b, valid_a, valid_b, masks)
        return h_m, h_a, h_b

    # ---- training and scoring --------------------------------------------------------------
    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        h_m, h_a, h_b = self.encode(batch)
        total = h_m.new_zeros(())
        logs: Dict[str, float] = {}
        for d, key, h in ((0, "a", h_a), (1, "b", h_b)):
            sel = batch["target_domain"] == d
            if not bool(sel.any()):
                continue
            state = h_m + gather_rows(h, batch[f"last_{key}"])
            rows, cols = sel.nonzero(as_tuple=True)
            user = state[rows, cols]
            pos = self.item_emb(batch["target"][rows, cols])
            neg = self.item_emb(batch[f"neg_{key}"][rows, cols])
            part = sampled_softmax(user, pos, neg, self.config["temperature"])
            logs[f"loss_{'AB'[d]}"] = float(part.detach())
            total = total + part
        return total, logs

    def score(self, batch: Dict[str, Tensor], candidates: Tensor) -> Tensor:
        h_m, h_a, h_b = self.encode(batch)
        is_b = (batch["eval_domain"] == 1).unsqueeze(-1)
        # Last column of a compacted stream is that domain's latest item (zero if none).
        state = h_m[:, -1] + torch.where(is_b, h_b[:, -1], h_a[:, -1])
        return torch.einsum("bd,bcd->bc", state, self.item_emb(candidates))
