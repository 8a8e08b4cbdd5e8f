"""The interface every backbone implements, and helpers they share.

A model is built from the two domains' item counts and a plain config dict; the pipeline
passes the whole run config, and each model reads the keys of its `default_config()` (which
also tells the CLI which `--set key=value` overrides are valid). Batches are dicts of
LongTensors laid out as the team brief's "Pipeline <-> models interface" describes.
"""

from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor, nn

from models.gca_block import GCALayers

GCA_ACTIVATIONS = ("sigmoid", "tanh")


class Recommender(nn.Module):
    name = "base"
    # GCA insertion points the model offers (GCA[i] for i in gca_slots).
    gca_slots: Tuple[int, ...] = ()

    @classmethod
    def default_config(cls) -> Dict[str, Any]:
        """Hyper-parameters with their defaults; subclasses extend this dict."""
        return {
            "max_len": 50,
            "hidden": 64,
            "dropout": 0.2,
            "gca_positions": [],
            "gca_activation": "sigmoid",
            "gca_layer_norm": True,
            "gca_heads": 1,
            "gca_backend": "auto",
            # weight L of the alignment regulariser: training minimises loss + L * mean
            # |cos(X, X')| over the GCA modules' probe rows (models/gca_block.py)
            "align_reg": 0.0,
        }

    def __init__(self, n_items_a: int, n_items_b: int, config: Dict[str, Any] | None = None):
        super().__init__()
        for arg, v in (("n_items_a", n_items_a), ("n_items_b", n_items_b)):
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg} must be a positive int, got {v!r}")
        self.n_items_a, self.n_items_b = n_items_a, n_items_b
        self.config = self.resolve_config(config or {})

    @classmethod
    def resolve_config(cls, config: Dict[str, Any]) -> Dict[str, Any]:
        """Defaults updated with the keys of `config` this model knows (others are the
        pipeline's and are ignored here), then checked."""
        cfg = cls.default_config()
        cfg.update({k: v for k, v in config.items() if k in cfg})
        positions = cfg["gca_positions"]
        if isinstance(positions, int):
            positions = [positions]
        positions = sorted(set(int(p) for p in positions))
        bad = [p for p in positions if p not in cls.gca_slots]
        if bad:
            raise ValueError(f"gca_positions {bad} not offered by {cls.name}; valid positions: {list(cls.gca_slots)}")
        cfg["gca_positions"] = positions
        if cfg["gca_activation"] not in GCA_ACTIVATIONS:
            raise ValueError(f"gca_activation must be one of {GCA_ACTIVATIONS}, got {cfg['gca_activation']!r}")
        for key in ("max_len", "hidden", "gca_heads"):
            if not isinstance(cfg[key], int) or cfg[key] < 1:
                raise ValueError(f"{key} must be a positive int, got {cfg[key]!r}")
        if cfg["hidden"] % cfg["gca_heads"]:
            raise ValueError(f"gca_heads ({cfg['gca_heads']}) must divide hidden ({cfg['hidden']})")
        reg = cfg["align_reg"]
        if isinstance(reg, bool) or not isinstance(reg, (int, float)) or reg != reg or abs(reg) == float("inf"):
            raise ValueError(f"align_reg must be a finite number, got {reg!r}")
        cfg["align_reg"] = float(reg)
        if reg and not positions:
            raise ValueError(f"align_reg={reg:g} regularises the GCA modules, but gca_positions is empty")
        return cfg

    # ---- what subclasses implement ----------------------------------------------------
    @property
    def n_negatives(self) -> Dict[str, int]:
        raise NotImplementedError

    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        raise NotImplementedError

    def score(self, batch: Dict[str, Tensor], candidates: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Dict[str, float]]:
        """The training objective: `loss` + align_reg x the GCA modules' mean |cos(X, X')|
        (in training mode with a non-zero `align_reg`; `loss` alone otherwise). Training goes
        through forward so DistributedDataParallel's hooks see the call."""
        gca = self._gca_layers()
        if not (self.training and gca is not None and gca.align_reg):
            return self.loss(batch)
        gca.begin_penalty()
        try:
            loss, logs = self.loss(batch)
        finally:
            term = gca.end_penalty()
        if term is None:
            return loss, logs
        logs = {**logs, "align_cos": float(term.detach())}
        return loss + gca.align_reg * term.to(loss.dtype), logs

    # ---- GCA modules and the alignment probe ------------------------------------------------
    def _gca_layers(self) -> GCALayers | None:
        """The backbone's GCA modules (`self.gca`, built by `gca_block.build_gca`)."""
        gca = self._modules.get("gca")
        return gca if isinstance(gca, GCALayers) else None

    def set_probe_in_training(self, on: bool) -> None:
        gca = self._gca_layers()
        if gca is not None:
            gca.set_probe_in_training(on)

    def reset_alignment(self) -> None:
        gca = self._gca_layers()
        if gca is not None:
            gca.reset_alignment()

    def alignment_counts(self) -> Dict[str, list]:
        """Raw sums per module (for combining across processes): [sum_xx', sum_xy, rows]."""
        gca = self._gca_layers()
        return {} if gca is None else gca.alignment_counts()

    def alignment_stats(self) -> Dict[str, Dict[str, float]]:
        """{module: {"cos_x_xprime", "cos_x_y"}} since the last `reset_alignment`."""
        gca = self._gca_layers()
        return {} if gca is None else gca.alignment_stats()


def n_trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def right_positions(seq: Tensor) -> Tensor:
    """Position ids counted back from the most recent item (1 = last column), 0 on padding,
    so compacted and merged layouts of the same item mean the same thing."""
    length = seq.shape[1]
    pos = torch.arange(length, 0, -1, device=seq.device).expand_as(seq)
    return torch.where(seq > 0, pos, torch.zeros_like(pos))


# Batch keys laid out along the sequence, (B, L) or (B, L, K), and among them the ones whose
# values are column indices into the window (-1 = none): merged columns (time_*) and compacted
# positions (last_*).
SEQUENCE_KEYS = ("seq", "seq_domain", "target", "target_domain", "seq_a", "seq_b", "time_a", "time_b",
                 "last_a", "last_b", "target_a", "target_b", "neg_a", "neg_b")
INDEX_KEYS = ("time_a", "time_b", "last_a", "last_b")


def drop_padding_columns(batch: Dict[str, Tensor]) -> Dict[str, Tensor]:
    """The batch without its leading columns that are padding in every row of seq, seq_a and
    seq_b (at least one column stays), index keys shifted to match. Why: a model whose max_len
    exceeds the longest history pays for columns that hold nothing (LLM4CDSR's L = 200 over
    histories of at most 48 training items on abe and afk: 4x the dense work, 17x the
    attention). Nothing changes for a model whose positions count back from the latest column
    and whose masks come from the items (every backbone here): left padding is inert."""
    occupied = (batch["seq"] > 0).any(0)
    for key in ("seq_a", "seq_b"):
        if key in batch:
            occupied = occupied | (batch[key] > 0).any(0)
    first = occupied.nonzero()
    start = int(first[0]) if len(first) else occupied.shape[0] - 1
    if start == 0:
        return batch
    out = dict(batch)
    for key in SEQUENCE_KEYS:
        if key in out:
            v = out[key][:, start:]
            out[key] = torch.where(v >= 0, v - start, v) if key in INDEX_KEYS else v
    return out


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """x (B, L, d) gathered at index (B, M) along L; index -1 gives a zero row."""
    safe = index.clamp(min=0)
    out = torch.gather(x, 1, safe.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return out * (index >= 0).unsqueeze(-1).to(x.dtype)


def sampled_softmax(user: Tensor, pos_emb: Tensor, neg_emb: Tensor, temperature: float = 1.0) -> Tensor:
    """Mean cross-entropy of the positive against its negatives: user (N, d), pos_emb (N, d),
    neg_emb (N, K, d)."""
    pos = (user * pos_emb).sum(-1, keepdim=True)
    neg = torch.einsum("nd,nkd->nk", user, neg_emb)
    logits = torch.cat([pos, neg], dim=1) / temperature
    return -torch.log_softmax(logits, dim=1)[:, 0].mean()

