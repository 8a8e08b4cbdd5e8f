"""GCA[i]: the paper's pair of gated cross-attention modules run in parallel (A attends to B,
B attends to A, both from the pre-GCA values), their masks, and the alignment probe.

Masks (True = blocked, `gca_kernels` convention):
- `timeline_masks`: both streams lie on one merged timeline (same column = same moment); a
  query at column t sees the other stream's non-padding keys at columns <= t. The backbone
  guarantees the stream values at column t only hold items before the target of column t.
- `time_masks`: compacted streams (left-padded, most recent on the right) carry each item's
  merged column (`time_*`, -1 on padding). A query may see the other domain's items whose
  time is strictly before the query's *horizon*; the default horizon is the query's own time
  (a position never sees the other domain's future: no leak of any later target).
  `next_time_horizon` gives the horizon "until the next item of my own domain", used where
  the stream's last position stands for "now" (ABXI evaluation).

Probe (claim 2 of the paper): per direction, the mean over valid query rows that see at
least one key of |cos(x, x')| (FusedGCA's per-row cos; rows without keys have x' = 0 by
definition and are left out so they cannot fake orthogonality), and the mean over indices
where both streams hold an item of |cos(x, y)| (query input vs key/value input at the same
index, `gca_kernels.cosine_alignment`). Sums and counts are Python floats accumulated from
detached tensors, only in eval mode or when `probe_in_training` is set.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from gca_kernels import FusedGCA, cosine_alignment


def timeline_masks(valid_a: Tensor, valid_b: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks for streams sharing one timeline: (attn_mask (1, L, L), kpm_b, attn_mask, kpm_a).

    Returns the A->B pair (attn_mask, key_padding_mask over B) then the B->A pair."""
    length = valid_a.shape[1]
    future = torch.ones(length, length, dtype=torch.bool, device=valid_a.device).triu(1)[None]
    return future, ~valid_b, future, ~valid_a


def before_mask(horizon_q: Tensor, time_k: Tensor) -> Tensor:
    """(B, Lq, Lk) True = blocked: key visible iff it is an item (time >= 0) with
    time_k < horizon_q."""
    visible = (time_k[:, None, :] >= 0) & (time_k[:, None, :] < horizon_q[:, :, None])
    return ~visible


def next_time_horizon(time: Tensor, now: int) -> Tensor:
    """Horizon of each compacted position = merged time of the next item of the same stream,
    `now` for the most recent one (so the last position sees everything before `now`)."""
    nxt = torch.cat([time[:, 1:], torch.full_like(time[:, :1], now)], dim=1)
    # Padding rows precede the first item; their horizon is irrelevant (rows are zeroed).
    return torch.where(time >= 0, nxt, time)


def time_masks(time_a: Tensor, time_b: Tensor, horizon_a: Optional[Tensor] = None,
               horizon_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Masks for compacted streams from their merged times: (attn A->B, kpm_b, attn B->A, kpm_a)."""
    horizon_a = time_a if horizon_a is None else horizon_a
    horizon_b = time_b if horizon_b is None else horizon_b
    return before_mask(horizon_a, time_b), time_b < 0, before_mask(horizon_b, time_a), time_a < 0


class GCAPair(nn.Module):
    """GCA[i]: `ab` (A queries, B keys/values) and `ba` (B queries, A keys/values)."""

    def __init__(self, d_model: int, n_heads: int = 1, activation: str = "sigmoid",
                 layer_norm: bool = True, backend: str = "auto"):
        super().__init__()
        self.ab = FusedGCA(d_model, n_heads=n_heads, activation=activation, layer_norm=layer_norm,
                           backend=backend)
        self.ba = FusedGCA(d_model, n_heads=n_heads, activation=activation, layer_norm=layer_norm,
                           backend=backend)
        self.probe_in_training = False
        self.reset_alignment()

    # ---- probe ------------------------------------------------------------------------------
    def reset_alignment(self) -> None:
        # direction -> [sum |cos(x,x')|, rows, sum |cos(x,y)|, rows]
        self._sums: Dict[str, List[float]] = {"ab": [0.0, 0.0, 0.0, 0.0], "ba": [0.0, 0.0, 0.0, 0.0]}

    def probing(self) -> bool:
        return (not self.training) or self.probe_in_training

    @torch.no_grad()
    def _record(self, direction: str, xq: Tensor, xk: Tensor, cos: Tensor, valid_q: Tensor,
                valid_k: Tensor, attn_mask: Tensor, kpm: Tensor) -> None:
        blocked = attn_mask | kpm[:, None, :]
        rows = valid_q & (~blocked).any(-1)
        s = self._sums[direction]
        n = float(rows.sum())
        if n:
            s[0] += float((cos.detach().abs() * rows).sum())
            s[1] += n
        both = valid_q & valid_k
        m = float(both.sum())
        if m:
            s[2] += float(cosine_alignment(xq.detach(), xk.detach(), mask=both)) * m
            s[3] += m

    def alignment_sums(self) -> Dict[str, List[float]]:
        return {k: list(v) for k, v in self._sums.items()}

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x_a: Tensor, x_b: Tensor, valid_a: Tensor, valid_b: Tensor,
                masks: Tuple[Tensor, Tensor, Tensor, Tensor]) -> Tuple[Tensor, Tensor]:
        """x_a (B, La, d), x_b (B, Lb, d), valid_* (B, L*) bool (True = item), masks from
        `timeline_masks`/`time_masks`. Returns (y_a, y_b), zero on padding rows."""
        attn_ab, kpm_b, attn_ba, kpm_a = masks
        probe = self.probing()
        out = []
        for direction, mod, xq, xk, vq, vk, attn, kpm in (
                ("ab", self.ab, x_a, x_b, valid_a, valid_b, attn_ab, kpm_b),
                ("ba", self.ba, x_b, x_a, valid_b, valid_a, attn_ba, kpm_a)):
            if probe:
                y, cos = mod(xq, xk, key_padding_mask=kpm, attn_mask=attn, need_alignment=True)
                if attn.shape[0] != xq.shape[0]:
                    attn = attn.expand(xq.shape[0], -1, -1)
                self._record(direction, xq, xk, cos, vq, vk, attn, kpm)
            else:
                y = mod(xq, xk, key_padding_mask=kpm, attn_mask=attn)
            out.append(y * vq.unsqueeze(-1).to(y.dtype))
        return out[0], out[1]


class GCAHost:
    """Mixin for a `Recommender` holding `GCAPair`s in `self.gca` (an nn.ModuleDict keyed
    "gca<i>"): the probe's reset/read for the trainer. Module names: "gca<i>_ab", "gca<i>_ba"."""

    def _gca_pairs(self) -> Iterator[Tuple[str, GCAPair]]:
        gca = getattr(self, "gca", None)
        if gca is None:
            return iter(())
        return iter(sorted(gca.items()))

    def set_probe_in_training(self, on: bool) -> None:
        for _, pair in self._gca_pairs():
            pair.probe_in_training = bool(on)

    def reset_alignment(self) -> None:
        for _, pair in self._gca_pairs():
            pair.reset_alignment()

    def alignment_counts(self) -> Dict[str, list]:
        """{module: [sum_xx', sum_xy (rescaled to the x-x' row count), rows]}, the layout the
        pipeline sums across processes; the x-y mean is kept exact per process."""
        out = {}
        for name, pair in self._gca_pairs():
            for direction, (sx, nx, sy, ny) in pair.alignment_sums().items():
                if nx:
                    out[f"{name}_{direction}"] = [sx, (sy / ny) * nx if ny else 0.0, nx]
        return out

    def alignment_stats(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name, pair in self._gca_pairs():
            for direction, (sx, nx, sy, ny) in pair.alignment_sums().items():
                if nx:
                    out[f"{name}_{direction}"] = {"cos_x_xprime": sx / nx,
                                                  "cos_x_y": sy / ny if ny else float("nan")}
        return out


def build_gca(positions, d_model: int, config: dict) -> nn.ModuleDict:
    """One GCAPair per position, keyed "gca<i>", from the config's gca_* keys."""
    return nn.ModuleDict({
        f"gca{p}": GCAPair(d_model, n_heads=config["gca_heads"], activation=config["gca_activation"],
                           layer_norm=config["gca_layer_norm"], backend=config["gca_backend"])
        for p in positions})
