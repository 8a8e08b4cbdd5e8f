"""ABXI (Bian et al., WWW 2025): invariant interest adaptation, with GCA at positions 0, 1, 2.

Re-implemented from the project's description of the backbone (docs/paper-and-backbones.md):
- one item table shared by both domains + positions counted back from the most recent item;
  embedding dropout;
- three streams: merged x, and domain streams a, b. Training lays a and b on the merged
  timeline (column t of stream a holds the latest A item at or before t when the target of t
  is in A, else padding); evaluation uses the compacted A-only / B-only histories;
- one shared post-norm causal self-attention block over the three streams, then a shared
  bias-free SwiGLU feed-forward with a per-stream LoRA (dLoRA) in parallel, residual + LN;
- an invariant SwiGLU projector over x with per-domain LoRAs (iLoRA), and per-domain
  projectors: out_A = LN(x + proj(x) + iLoRA_A(x)) + LN(a + proj_A(a)), likewise B; each
  position uses its target's domain;
- InfoNCE (temperature 0.75) against 128 A + 128 B negatives, L = L_A + L_B (each the
  per-user mean over that user's positions of the domain, averaged over the batch).

Negatives (config `neg_sampling`, the pipeline's key): `per_position` scores every position
against its own 128 A + 128 B (the authors' draw: distinct, none of the user's items, fresh
per position), through `negative_logits.position_nll`, which never holds the (positions,
256, d) gather; `per_user` (the default) scores all of a user's positions against one pool
of 128 + 128 taken from the batch's few per-position draws (`layers.per_user_pool`).

GCA[0]: after the embeddings, between streams a and b. GCA[1]: after the shared attention
block, before the feed-forward. GCA[2]: after the feed-forward, before the projectors.
Masks: training streams share the merged timeline (a query at column t sees the other
stream's items at columns <= t, which hold only items before t's target); evaluation's
compacted streams see the other domain's items before the next item of their own domain
(the latest position sees the whole history): see `gca_block.next_time_horizon`.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Recommender
from models.scaling import ScalableMixin, scaled_config
from models.gca_block import build_gca, next_time_horizon, time_masks, timeline_masks
from models.layers import (Dropout, LoRA, SelfAttention, SwiGLU, causal_valid_mask, check_neg_sampling,
                           negatives_per_position, on_rows, per_user_pool, position_negatives)
from models.negative_logits import position_nll


class ABXI(ScalableMixin, Recommender):
    name = "abxi"
    gca_slots = (0, 1, 2)
    # The width `--scale-to-match` grows (models/scaling.py).
    scale_key = "ffn_inner"

    @classmethod
    def default_config(cls) -> Dict[str, Any]:
        cfg = super().default_config()
        cfg.update({"hidden": 256, "dropout": 0.5, "n_heads": 2, "ffn_inner": 680,
                    "lora_rank_d": 64, "lora_rank_i": 64, "n_neg": 128, "temperature": 0.75,
                    "init_std": 0.02, "scale_to_match": [], "neg_sampling": "per_user",
                    # compute the dense maps on non-padding rows only (False: plain dense
                    # tensors, e.g. for torch.compile without dynamic shapes)
                    "pack_rows": True})
        return cfg

    def __init__(self, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None):
        config, n_target = scaled_config(type(self), n_items_a, n_items_b, dict(config or {}))
        super().__init__(n_items_a, n_items_b, config)
        c = self.config
        check_neg_sampling(c["neg_sampling"])
        d, std = c["hidden"], c["init_std"]
        self.item_emb = nn.Embedding(n_items_a + n_items_b + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(c["max_len"] + 1, d, padding_idx=0)
        self.drop = Dropout(c["dropout"])
        self.attn = SelfAttention(d, c["n_heads"], out_dropout=c["dropout"])
        self.norm_attn = nn.LayerNorm(d)
        self.ffn = SwiGLU(d, c["ffn_inner"])
        self.dlora = nn.ModuleDict({s: LoRA(d, c["lora_rank_d"], std) for s in "xab"})
        self.norm_ffn = nn.ModuleDict({s: nn.LayerNorm(d) for s in "xab"})
        self.proj = nn.ModuleDict({s: SwiGLU(d, c["ffn_inner"]) for s in "iab"})
        self.ilora = nn.ModuleDict({s: LoRA(d, c["lora_rank_i"], std) for s in "ab"})
        self.norm_out = nn.ModuleDict({s: nn.LayerNorm(d) for s in ("i2a", "i2b", "a2a", "b2b")})
        self._init(std)
        self.gca = build_gca(c["gca_positions"], d, c)
        self._record_counts(n_target)

    def _init(self, std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=std, a=-2 * std, b=2 * std)
                with torch.no_grad():
                    m.weight[0].zero_()

    @property
    def n_negatives(self) -> Dict[str, int]:
        """Negatives per position and domain the sampler draws: n_neg each (per_position), or
        enough for one pool of n_neg per user (per_user)."""
        k = self.config["n_neg"]
        if self.config["neg_sampling"] != "per_position":
            k = negatives_per_position(k, self.config["max_len"])
        return {"A": k, "B": k}

    # ---- encoder ---------------------------------------------------------------------------
    def _embed(self, ids: Tensor, pos: Tensor) -> Tensor:
        valid = ids > 0
        x = self.item_emb(ids) + self.pos_emb(torch.where(valid, pos, torch.zeros_like(pos)))
        return self._rows(self.drop, x, valid)

    def _gca(self, slot: int, h_a: Tensor, h_b: Tensor, valid_a: Tensor, valid_b: Tensor,
             masks) -> Tuple[Tensor, Tensor]:
        if slot in self.config["gca_positions"]:
            return self.gca[f"gca{slot}"](h_a, h_b, valid_a, valid_b, masks)
        return h_a, h_b

    def _rows(self, fn, x: Tensor, rows: Tensor) -> Tensor:
        if self.config["pack_rows"]:
            return on_rows(fn, x, rows)
        return fn(x) * rows.unsqueeze(-1).to(x.dtype)

    def _head(self, s: str, xh: Tensor) -> Tensor:
        """Domain-s output from rows [x ; h] (merged-stream state ; domain-stream state)."""
        d = xh.shape[-1] // 2
        x, h = xh[..., :d], xh[..., d:]
        inv = x + self.drop(self.proj["i"](x))
        return (self.norm_out[f"i2{s}"](inv + self.drop(self.ilora[s](x)))
                + self.norm_out[f"{s}2{s}"](h + self.drop(self.proj[s](h))))

    def encode(self, ids_x: Tensor, ids_a: Tensor, ids_b: Tensor, pos: Tensor, masks, need_a: Tensor,
               need_b: Tensor, ffn_rows) -> Tensor:
        """(B, L, d) user state: the domain-A output at the `need_a` columns, the domain-B
        output at the `need_b` columns (disjoint), zero elsewhere. `ffn_rows` (three (B, L)
        bool) says where the feed-forward must run (everywhere valid in training; the last
        column in evaluation unless GCA[2] needs the whole sequence as keys)."""
        valid = [ids_x > 0, ids_a > 0, ids_b > 0]
        bsz = ids_x.shape[0]
        # The three streams go through the shared layers as one batch of 3B sequences (one
        # embedding lookup: one dense gradient of the item table instead of three).
        h = list(self._embed(torch.cat([ids_x, ids_a, ids_b]), pos).split(bsz))
        h[1], h[2] = self._gca(0, h[1], h[2], valid[1], valid[2], masks)
        hs, vs = torch.cat(h), torch.cat(valid)
        att = self.attn(hs, causal_valid_mask(vs), vs if self.config["pack_rows"] else None)
        hs = self.norm_attn(hs + att) * vs.unsqueeze(-1).to(hs.dtype)
        h = list(hs.split(bsz))
        h[1], h[2] = self._gca(1, h[1], h[2], valid[1], valid[2], masks)
        hs, rows = torch.cat(h), torch.cat(ffn_rows)
        f = self._rows(lambda r: self.drop(self.ffn(r)), hs, rows)
        for i, s in enumerate("xab"):
            lora = self._rows(lambda r, s=s: self.drop(self.dlora[s](r)), h[i], ffn_rows[i])
            h[i] = self.norm_ffn[s](h[i] + f[i * bsz:(i + 1) * bsz] + lora) \
                * ffn_rows[i].unsqueeze(-1).to(hs.dtype)
        h[1], h[2] = self._gca(2, h[1], h[2], valid[1], valid[2], masks)
        x, a, b = h
        out = None
        for s, dom, need in (("a", a, need_a), ("b", b, need_b)):
            part = self._rows(lambda r, s=s: self._head(s, r), torch.cat([x, dom], dim=-1), need)
            out = part if out is None else out + part
        return out

    # ---- training ---------------------------------------------------------------------------
    def training_streams(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Streams a, b laid on the merged timeline: at a column whose target is in the
        domain, the latest item of that domain at or before the column."""
        out = []
        for d, key in ((0, "a"), (1, "b")):
            last = batch[f"last_{key}"]
            ids = batch[f"seq_{key}"].gather(1, last.clamp(min=0))
            keep = (batch["target_domain"] == d) & (last >= 0)
            out.append(torch.where(keep, ids, torch.zeros_like(ids)))
        return out[0], out[1]

    def position_states(self, batch: Dict[str, Tensor]) -> Tensor:
        """(B, L, d): the user state at every column with a target, in the target's domain."""
        ids_a, ids_b = self.training_streams(batch)
        masks = timeline_masks(ids_a > 0, ids_b > 0) if self.config["gca_positions"] else None
        tdom, seq = batch["target_domain"], batch["seq"]
        length = seq.shape[1]
        pos = torch.arange(length, 0, -1, device=seq.device).expand(3 * seq.shape[0], length)
        return self.encode(seq, ids_a, ids_b, pos, masks, tdom == 0, tdom == 1,
                           (seq > 0, ids_a > 0, ids_b > 0))

    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        h = self.position_states(batch)
        tdom, target = batch["target_domain"], batch["target"]
        k, temp = self.config["n_neg"], self.config["temperature"]
        if self.config["neg_sampling"] == "per_position":
            neg = torch.cat([position_negatives(batch["neg_a"], k, "neg_a"),
                             position_negatives(batch["neg_b"], k, "neg_b")], dim=-1)
            nll = position_nll(h, self.item_emb.weight, target, neg, temp, self.item_emb.padding_idx)
        else:
            pool = torch.cat([per_user_pool(batch["neg_a"], k), per_user_pool(batch["neg_b"], k)], dim=1)
            vec = self.item_emb(torch.cat([target, pool], dim=1))
            pos = (h * vec[:, :target.shape[1]]).sum(-1, keepdim=True)
            neg = torch.bmm(h, vec[:, target.shape[1]:].transpose(1, 2))
            logits = torch.cat([pos, neg], dim=-1) / temp
            nll = -F.log_softmax(logits, dim=-1)[..., 0]
        total = nll.new_zeros(())
        logs = {}
        for d in (0, 1):
            m = (tdom == d).to(nll.dtype)
            part = ((nll * m).sum(1) / m.sum(1).clamp(min=1)).mean()
            logs[f"loss_{'AB'[d]}"] = float(part.detach())
            total = total + part
        return total, logs

    # ---- evaluation -------------------------------------------------------------------------
    def user_state(self, batch: Dict[str, Tensor]) -> Tensor:
        """(B, d) state after the whole history, in the domain `eval_domain`."""
        seq = batch["seq"]
        length = seq.shape[1]
        horizon_a = next_time_horizon(batch["time_a"], length)
        horizon_b = next_time_horizon(batch["time_b"], length)
        pos_x = torch.arange(length, 0, -1, device=seq.device).expand_as(seq)
        pos = torch.cat([pos_x, length + 1 - horizon_a, length + 1 - horizon_b])
        masks = None
        if self.config["gca_positions"]:
            masks = time_masks(batch["time_a"], batch["time_b"], horizon_a, horizon_b)
        last = torch.zeros_like(seq, dtype=torch.bool)
        last[:, -1] = True
        dom = batch["eval_domain"].unsqueeze(-1)
        streams = (seq, batch["seq_a"], batch["seq_b"])
        deep = 2 in self.config["gca_positions"]
        ffn_rows = tuple(ids > 0 if (deep and i) else last & (ids > 0) for i, ids in enumerate(streams))
        h = self.encode(*streams, pos, masks, last & (dom == 0), last & (dom == 1), ffn_rows)
        return h[:, -1]

    def score(self, batch: Dict[str, Tensor], candidates: Tensor) -> Tensor:
        state = self.user_state(batch)
        return torch.bmm(self.item_emb(candidates), state.unsqueeze(-1)).squeeze(-1)
