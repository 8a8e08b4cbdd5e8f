"""CDSRNP (Li et al.): cross-domain sequential recommendation via neural processes, with GCA at
positions 0 and 1. No public code exists; this is built from the project's description
(docs/paper-and-backbones.md):

- one trainable item table, positions counted back over merged columns (`time_positions`);
  per-domain causal transformer encoders (pre-norm blocks + final LayerNorm) over the
  compacted A-only and B-only histories;
- fine-grained interest adaptive layer: for a domain-d target at merged column t, with r_d the
  d-encoder state at the latest d item <= t and r_o the other domain's, the user state is
  u = r_d + g * W r_o, g = sigmoid(W_g [r_d ; r_o]) deciding, per feature, which of the
  other domain's interests to transfer;
- neural process over the cross-domain correlation (one latent Gaussian per domain): a set
  encoder maps (user state, next-item embedding) pairs to a mean-pooled representation and
  then to (mu, log sigma). The support set of a user is the other users of the batch (all
  of them seen in both domains on the provided data); the prior is the support set's
  Gaussian, the posterior adds the user's own pairs. The decoder conditions the next-item
  scores on a latent sample: u' = u + MLP([u ; z]); score = <u', item>;
- loss: sampled softmax against n_neg negatives of the target's domain,
  L_A + L_B + kl_weight x KL(posterior || prior). The negatives (config `neg_sampling`, the
  pipeline's key): `per_position` = each position's own n_neg (scored by
  `negative_logits.position_nll` without the (positions, n_neg, d) gather); `per_user` (the
  default) = one pool per user shared by its positions (`layers.per_user_pool`).

Leak-freeness (a design choice, documented as such): the decoder uses a sample of the
*prior* (reparameterised in training, its mean in evaluation), so a user's scores never see
its own later targets; the posterior, which contains them, enters only the KL term that
aligns the two distributions. Evaluation builds each user's support from the other users of
the evaluation batch and their histories only (never an evaluated target).

GCA[0]: after the embeddings of the A and B sequences. GCA[1]: after the sequence encoders,
before the latent encoder. Compacted streams: the cross mask comes from the merged timeline
(an A item sees the B items strictly before it, and vice versa).
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.base import Recommender, gather_rows
from models.scaling import ScalableMixin, scaled_config
from models.gca_block import build_gca, time_masks
from models.layers import (Dropout, PreNormBlock, causal_valid_mask, check_neg_sampling, negatives_per_position,
                           per_user_pool, position_negatives, time_positions)
from models.negative_logits import position_nll


class SetEncoder(nn.Module):
    """Mean-pooled encoder of a set of (user state, item) pairs -> Gaussian (mu, log sigma).

    Pooling is leave-one-user-out for the prior: user b's support excludes b's own pairs."""

    def __init__(self, d: int, hidden: int, latent: int):
        super().__init__()
        self.pair = nn.Sequential(nn.Linear(2 * d, hidden), nn.ReLU(), nn.Linear(hidden, hidden))
        self.mu = nn.Linear(hidden, latent)
        self.log_sigma = nn.Linear(hidden, latent)

    def gaussian(self, pooled: Tensor) -> Tuple[Tensor, Tensor]:
        # sigma bounded below so the KL stays finite
        return self.mu(pooled), self.log_sigma(pooled).clamp(min=-6.0, max=3.0)

    def forward(self, user: Tensor, item: Tensor, mask: Tensor) -> Tuple[Tuple[Tensor, Tensor], Tuple[Tensor, Tensor]]:
        """user, item (B, L, d); mask (B, L) bool = pair present. Returns (prior, posterior),
        each (mu, log_sigma) of shape (B, latent)."""
        enc = self.pair(torch.cat([user, item], dim=-1)) * mask.unsqueeze(-1).to(user.dtype)
        own_sum, own_n = enc.sum(1), mask.sum(1, keepdim=True).to(user.dtype)
        all_sum, all_n = own_sum.sum(0, keepdim=True), own_n.sum(0, keepdim=True)
        prior = (all_sum - own_sum) / (all_n - own_n).clamp(min=1)
        posterior = all_sum.expand_as(own_sum) / all_n.clamp(min=1)
        return self.gaussian(prior), self.gaussian(posterior)


def gaussian_kl(q: Tuple[Tensor, Tensor], p: Tuple[Tensor, Tensor]) -> Tensor:
    """KL(q || p) of diagonal Gaussians given (mu, log sigma), summed over the latent: (B,)."""
    (mq, lq), (mp, lp) = q, p
    return (lp - lq + (torch.exp(2 * lq) + (mq - mp) ** 2) / (2 * torch.exp(2 * lp)) - 0.5).sum(-1)


class CDSRNP(ScalableMixin, Recommender):
    name = "cdsrnp"
    gca_slots = (0, 1)
    scale_key = "ffn_inner"

    @classmethod
    def default_config(cls) -> Dict[str, Any]:
        cfg = super().default_config()
        cfg.update({"hidden": 128, "dropout": 0.2, "n_blocks": 2, "n_heads": 2, "ffn_inner": 256,
                    "latent": 64, "set_hidden": 128, "kl_weight": 0.1, "n_neg": 128,
                    "temperature": 1.0, "init_std": 0.02, "scale_to_match": [], "neg_sampling": "per_user"})
        return cfg

    def __init__(self, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None):
        config, n_target = scaled_config(type(self), n_items_a, n_items_b, dict(config or {}))
        super().__init__(n_items_a, n_items_b, config)
        c = self.config
        check_neg_sampling(c["neg_sampling"])
        d = c["hidden"]
        self.item_emb = nn.Embedding(n_items_a + n_items_b + 1, d, padding_idx=0)
        self.pos_emb = nn.ModuleDict({s: nn.Embedding(c["max_len"] + 1, d, padding_idx=0) for s in "ab"})
        self.drop = Dropout(c["dropout"])
        self.enc = nn.ModuleDict({s: nn.ModuleList(PreNormBlock(d, c["n_heads"], c["ffn_inner"], c["dropout"])
                                                   for _ in range(c["n_blocks"])) for s in "ab"})
        self.final = nn.ModuleDict({s: nn.LayerNorm(d, eps=1e-8) for s in "ab"})
        # interest adaptive layer, per target domain: transfer map and per-feature gate
        self.transfer = nn.ModuleDict({s: nn.Linear(d, d) for s in "ab"})
        self.gate = nn.ModuleDict({s: nn.Linear(2 * d, d) for s in "ab"})
        self.set_enc = nn.ModuleDict({s: SetEncoder(d, c["set_hidden"], c["latent"]) for s in "ab"})
        self.decoder = nn.ModuleDict({s: nn.Sequential(nn.Linear(d + c["latent"], d), nn.ReLU(), nn.Linear(d, d))
                                      for s in "ab"})
        for m in self.modules():
            if isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, std=c["init_std"])
                with torch.no_grad():
                    m.weight[0].zero_()
        self.gca = build_gca(c["gca_positions"], d, c)
        self._record_counts(n_target)

    @property
    def n_negatives(self) -> Dict[str, int]:
        """Negatives per position and domain the sampler draws: n_neg each (per_position), or
        enough for one pool of n_neg per user (per_user)."""
        k = self.config["n_neg"]
        if self.config["neg_sampling"] != "per_position":
            k = negatives_per_position(k, self.config["max_len"])
        return {"A": k, "B": k}

    # ---- encoders -------------------------------------------------------------------------------
    def encode(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """Compacted per-domain states (B, L, d) after the encoders (and GCA)."""
        c = self.config
        h, valid = {}, {}
        for s in "ab":
            ids, time = batch[f"seq_{s}"], batch[f"time_{s}"]
            valid[s] = ids > 0
            x = self.item_emb(ids) + self.pos_emb[s](time_positions(time, ids.shape[1]))
            h[s] = self.drop(x) * valid[s].unsqueeze(-1).to(x.dtype)
        masks = time_masks(batch["time_a"], batch["time_b"]) if c["gca_positions"] else None
        if 0 in c["gca_positions"]:
            h["a"], h["b"] = self.gca["gca0"](h["a"], h["b"], valid["a"], valid["b"], masks)
        for s in "ab":
            allowed = causal_valid_mask(valid[s])
            for block in self.enc[s]:
                h[s] = block(h[s], valid[s], allowed)
            h[s] = self.final[s](h[s]) * valid[s].unsqueeze(-1).to(h[s].dtype)
        if 1 in c["gca_positions"]:
            h["a"], h["b"] = self.gca["gca1"](h["a"], h["b"], valid["a"], valid["b"], masks)
        return h["a"], h["b"]

    def _adapt(self, s: str, own: Tensor, other: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate[s](torch.cat([own, other], dim=-1)))
        return own + g * self.transfer[s](other)

    def user_states(self, batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Interest-adapted user state per target domain at every merged column: {"a", "b"}
        -> (B, L, d)."""
        h_a, h_b = self.encode(batch)
        st_a, st_b = gather_rows(h_a, batch["last_a"]), gather_rows(h_b, batch["last_b"])
        return {"a": self._adapt("a", st_a, st_b), "b": self._adapt("b", st_b, st_a)}

    def _next_items(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        """(next item, its domain) at every merged column: the training targets, or inside an
        evaluation history the following history item (the last column has none)."""
        if "target" in batch:
            return batch["target"], batch["target_domain"]
        seq = batch["seq"]
        nxt = torch.cat([seq[:, 1:], torch.zeros_like(seq[:, :1])], dim=1)
        nxt = torch.where(seq > 0, nxt, torch.zeros_like(nxt))
        dom = torch.where(nxt == 0, -1, (nxt > self.n_items_a).long())
        return nxt, dom

    def latent_states(self, batch: Dict[str, Tensor]) -> Tuple[Dict[str, Tensor], Tensor]:
        """Decoded states {"a", "b"} (B, L, d) and the KL term (B,) summed over domains."""
        users = self.user_states(batch)
        nxt, dom = self._next_items(batch)
        item = self.item_emb(nxt)
        out, kl = {}, None
        for i, s in enumerate("ab"):
            prior, post = self.set_enc[s](users[s], item, dom == i)
            mu, log_sigma = prior
            z = mu + torch.exp(log_sigma) * torch.randn_like(mu) if self.training else mu
            u = users[s]
            zz = z.unsqueeze(1).expand(-1, u.shape[1], -1)
            out[s] = u + self.decoder[s](torch.cat([u, zz], dim=-1))
            k = gaussian_kl(post, prior)
            kl = k if kl is None else kl + k
        return out, kl

    def position_states(self, batch: Dict[str, Tensor]) -> Tensor:
        """(B, L, d) decoded state at each column, in the domain of that column's target."""
        out, _ = self.latent_states(batch)
        return torch.where((batch["target_domain"] == 1).unsqueeze(-1), out["b"], out["a"])

    # ---- training ---------------------------------------------------------------------------------
    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        c = self.config
        out, kl = self.latent_states(batch)
        tdom, target = batch["target_domain"], batch["target"]
        h = torch.where((tdom == 1).unsqueeze(-1), out["b"], out["a"])
        k = c["n_neg"]
        if c["neg_sampling"] == "per_position":
            neg_ids = torch.where((tdom == 1).unsqueeze(-1), position_negatives(batch["neg_b"], k, "neg_b"),
                                  position_negatives(batch["neg_a"], k, "neg_a"))
            nll = position_nll(h, self.item_emb.weight, target, neg_ids, c["temperature"],
                               self.item_emb.padding_idx)
        else:
            pool_a = self.item_emb(per_user_pool(batch["neg_a"], k))
            pool_b = self.item_emb(per_user_pool(batch["neg_b"], k))
            pos = (h * self.item_emb(target)).sum(-1, keepdim=True)
            neg = torch.where((tdom == 1).unsqueeze(-1), torch.bmm(h, pool_b.transpose(1, 2)),
                              torch.bmm(h, pool_a.transpose(1, 2)))
            nll = -F.log_softmax(torch.cat([pos, neg], dim=-1) / c["temperature"], dim=-1)[..., 0]
        total = nll.new_zeros(())
        logs: Dict[str, float] = {}
        for d in (0, 1):
            m = (tdom == d).to(nll.dtype)
            part = (nll * m).sum() / m.sum().clamp(min=1)
            logs[f"loss_{'AB'[d]}"] = float(part.detach())
            total = total + part
        kl_mean = kl.mean()
        logs["kl"] = float(kl_mean.detach())
        return total + c["kl_weight"] * kl_mean, logs

    # ---- evaluation -------------------------------------------------------------------------------
    def score(self, batch: Dict[str, Tensor], candidates: Tensor) -> Tensor:
        out, _ = self.latent_states(batch)
        is_b = (batch["eval_domain"] == 1).unsqueeze(-1)
        state = torch.where(is_b, out["b"][:, -1], out["a"][:, -1])
        return torch.bmm(self.item_emb(candidates), state.unsqueeze(-1)).squeeze(-1)
