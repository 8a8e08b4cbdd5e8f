"""A small cross-domain SASRec: the pipeline's end-to-end test model and the simplest of the
four backbones.

Three one-block causal transformers share one item embedding: one over the merged sequence,
one over the compacted A-only history, one over the compacted B-only history. A user's state
for a domain-d target is merged_state(t) + d_state(latest d item at or before t); scores are
dot products with the item embedding; the loss is a sampled softmax per domain (L_A + L_B).

GCA slots: GCA[0] right after the embeddings of the compacted A and B streams (A attends to
B and B to A, in parallel, from the pre-GCA values); GCA[1] after the domain encoders, before
scoring. The cross mask comes from the merged timeline: an A position sees only the B items
that came strictly before it (and vice versa).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gca_kernels import FusedGCA, cosine_alignment
from models.base import Recommender, causal_cross_mask, gather_rows, right_positions, sampled_softmax
from models.scaling import ScalableMixin, scaled_config


class CausalBlock(nn.Module):
    """Post-norm self-attention + feed-forward block with a causal, padding-aware mask."""

    def __init__(self, d: int, n_heads: int, inner: int, dropout: float):
        super().__init__()
        if d % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide hidden ({d})")
        self.h = n_heads
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln1 = nn.LayerNorm(d)
        self.ff = nn.Sequential(nn.Linear(d, inner), nn.GELU(), nn.Dropout(dropout), nn.Linear(inner, d))
        self.ln2 = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, valid: Tensor) -> Tensor:
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        causal = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()
        # Keys: real items at or before the query; the diagonal stays open so left-padding
        # rows (which see no real key) never produce NaN; they are zeroed below anyway.
        allowed = (causal & valid[:, None, :]) | torch.eye(length, dtype=torch.bool, device=x.device)
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None],
                                             dropout_p=self.drop.p if self.training else 0.0)
        x = self.ln1(x + self.drop(self.out(att.transpose(1, 2).reshape(b, length, d))))
        x = self.ln2(x + self.drop(self.ff(x)))
        return x * valid.unsqueeze(-1).to(x.dtype)


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
        self.emb_drop = nn.Dropout(c["dropout"])
        self.encoders = nn.ModuleDict({s: CausalBlock(d, c["n_heads"], c["ffn_inner"], c["dropout"])
                                       for s in ("m", "a", "b")})
        self.gca = nn.ModuleDict()
        for p in c["gca_positions"]:
            for direction in ("ab", "ba"):
                self.gca[f"gca{p}_{direction}"] = FusedGCA(
                    d, n_heads=c["gca_heads"], activation=c["gca_activation"],
                    layer_norm=c["gca_layer_norm"], backend=c["gca_backend"])
        self._record_counts(n_target)

    @property
    def n_negatives(self) -> Dict[str, int]:
        return {"A": self.config["n_neg"], "B": self.config["n_neg"]}

    # ---- encoding ------------------------------------------------------------------------
    def _embed(self, seq: Tensor) -> Tensor:
        x = self.item_emb(seq) + self.pos_emb(right_positions(seq))
        return self.emb_drop(x) * (seq > 0).unsqueeze(-1).to(x.dtype)

    def _cross(self, slot: int, x_a: Tensor, x_b: Tensor, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """GCA[slot]: both directions from the pre-GCA values (parallel, not sequential)."""
        valid_a, valid_b = batch["seq_a"] > 0, batch["seq_b"] > 0
        mask_ab = causal_cross_mask(batch["time_a"], batch["time_b"])
        mask_ba = causal_cross_mask(batch["time_b"], batch["time_a"])
        probe = not self.training
        outs = []
        for direction, xq, xk, kpm, mask, vq, vk in (("ab", x_a, x_b, ~valid_b, mask_ab, valid_a, valid_b),
                                                     ("ba", x_b, x_a, ~valid_a, mask_ba, valid_b, valid_a)):
            name = f"gca{slot}_{direction}"
            res = self.gca[name](xq, xk, key_padding_mask=kpm, attn_mask=mask, need_alignment=probe)
            if probe:
                y, cos = res
                # Rows with no visible key have x' = 0 exactly: no direction to measure.
                rows = vq & (~mask & ~kpm[:, None, :]).any(-1)
                n_rows = int(rows.sum())
                if n_rows:
                    cos_xp = (cos.abs() * rows).sum() / n_rows
                    # X vs Y pairs the k-th most recent query with the k-th most recent key.
                    both = vq & vk
                    cos_xy = cosine_alignment(xq, xk, mask=both)
                    self.record_alignment(name, cos_xp, cos_xy, n_rows)
            else:
                y = res
            outs.append(y * vq.unsqueeze(-1).to(y.dtype))
        return outs[0], outs[1]

    def encode(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor, Tensor]:
        seq, seq_a, seq_b = batch["seq"], batch["seq_a"], batch["seq_b"]
        h_m = self.encoders["m"](self._embed(seq), seq > 0)
        x_a, x_b = self._embed(seq_a), self._embed(seq_b)
        if 0 in self.config["gca_positions"]:
            x_a, x_b = self._cross(0, x_a, x_b, batch)
        h_a = self.encoders["a"](x_a, seq_a > 0)
        h_b = self.encoders["b"](x_b, seq_b > 0)
        if 1 in self.config["gca_positions"]:
            h_a, h_b = self._cross(1, h_a, h_b, batch)
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
