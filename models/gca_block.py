"""GCA in a backbone: the paper's pair of gated cross-attention modules run in parallel (A
attends to B, B attends to A, both from the pre-GCA values), their masks, the alignment probe
and the alignment regulariser. Every backbone builds its GCA modules with `build_gca` and calls
a `GCAPair` at each of its positions; nothing else in `models` calls `gca_kernels.FusedGCA`.

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

Probe rows (`probe_rows`, from the masks alone): query rows that hold an item and see at
least one key. Rows without a visible key have x' = 0 by definition (cos(x, x') = 0) and
would fake orthogonality, so the probe and the regulariser leave them out.

Probe (claim 2 of the paper), per direction:
- cos_x_xprime: mean of |cos(x, x')| (FusedGCA's per-row cos) over the probe rows;
- cos_x_y: mean of |cos(x, y)| over the indices where both streams hold an item (query input
  vs key/value input at the same index, `gca_kernels.cosine_alignment`).
Each is a pooled mean over every row counted since `reset_alignment` (a batch weighs by its
own row count). Sums and counts are Python floats from detached tensors, accumulated only in
eval mode or when `probe_in_training` is set.

Regulariser (beyond the paper): with `align_reg = L` (a model config key), the model's
`forward` (its training objective) is loss + L * mean over the GCA modules run in that pass of
each module's mean |cos(x, x')| over its probe rows (a module with no probe row contributes 0).
L > 0 pushes x' toward orthogonality with x, L < 0 away from it. Training mode only; the
term is differentiable through every backend.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from gca_kernels import FusedGCA, cosine_alignment

Masks = Tuple[Tensor, Tensor, Tensor, Tensor]


def timeline_masks(valid_a: Tensor, valid_b: Tensor) -> Masks:
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
               horizon_b: Optional[Tensor] = None) -> Masks:
    """Masks for compacted streams from their merged times: (attn A->B, kpm_b, attn B->A, kpm_a)."""
    horizon_a = time_a if horizon_a is None else horizon_a
    horizon_b = time_b if horizon_b is None else horizon_b
    return before_mask(horizon_a, time_b), time_b < 0, before_mask(horizon_b, time_a), time_a < 0


def probe_rows(valid_q: Tensor, attn_mask: Tensor, key_padding_mask: Tensor) -> Tensor:
    """(B, Lq) bool: the query rows the probe and the regulariser count: items (`valid_q`)
    that see at least one key. attn_mask (B or 1, Lq, Lk), key_padding_mask (B, Lk), True =
    blocked."""
    blocked = attn_mask | key_padding_mask[:, None, :]
    return valid_q & (~blocked).any(-1)


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
        # The regulariser's terms of the current training pass (a list while `GCALayers`
        # collects them, None otherwise).
        self.penalty_terms: Optional[List[Tensor]] = None
        self.reset_alignment()

    # ---- probe ------------------------------------------------------------------------------
    def reset_alignment(self) -> None:
        # direction -> [sum |cos(x,x')|, probe rows, sum |cos(x,y)|, rows holding both items]
        self._sums: Dict[str, List[float]] = {"ab": [0.0, 0.0, 0.0, 0.0], "ba": [0.0, 0.0, 0.0, 0.0]}

    def probing(self) -> bool:
        return (not self.training) or self.probe_in_training

    @torch.no_grad()
    def _record(self, direction: str, xq: Tensor, xk: Tensor, cos: Tensor, rows: Tensor,
                valid_q: Tensor, valid_k: Tensor) -> None:
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
                masks: Masks) -> Tuple[Tensor, Tensor]:
        """x_a (B, La, d), x_b (B, Lb, d), valid_* (B, L*) bool (True = item), masks from
        `timeline_masks`/`time_masks`. Returns (y_a, y_b), zero on padding rows."""
        attn_ab, kpm_b, attn_ba, kpm_a = masks
        probe = self.probing()
        penalise = self.training and self.penalty_terms is not None
        out = []
        for direction, mod, xq, xk, vq, vk, attn, kpm in (
                ("ab", self.ab, x_a, x_b, valid_a, valid_b, attn_ab, kpm_b),
                ("ba", self.ba, x_b, x_a, valid_b, valid_a, attn_ba, kpm_a)):
            if probe or penalise:
                y, cos = mod(xq, xk, key_padding_mask=kpm, attn_mask=attn, need_alignment=True)
                rows = probe_rows(vq, attn, kpm)
                if probe:
                    self._record(direction, xq, xk, cos, rows, vq, vk)
                if penalise:
                    r = rows.to(cos.dtype)
                    self.penalty_terms.append((cos.abs() * r).sum() / r.sum().clamp(min=1.0))
            else:
                y = mod(xq, xk, key_padding_mask=kpm, attn_mask=attn)
            out.append(y * vq.unsqueeze(-1).to(y.dtype))
        return out[0], out[1]


class GCALayers(nn.ModuleDict):
    """A backbone's GCA pairs keyed "gca<i>" (module names in the probe: "gca<i>_ab",
    "gca<i>_ba"), with the probe's reset/read for the trainer and the regulariser's weight
    `align_reg`."""

    def __init__(self, pairs: Dict[str, GCAPair], align_reg: float = 0.0):
        super().__init__(pairs)
        self.align_reg = float(align_reg)

    def pairs(self) -> List[Tuple[str, GCAPair]]:
        return sorted(self.items())

    def set_probe_in_training(self, on: bool) -> None:
        for _, pair in self.pairs():
            pair.probe_in_training = bool(on)

    def reset_alignment(self) -> None:
        for _, pair in self.pairs():
            pair.reset_alignment()

    def alignment_counts(self) -> Dict[str, list]:
        """{module: [sum_xx', sum_xy (rescaled to the x-x' row count), rows]}, the layout the
        pipeline sums across processes; the x-y mean is kept exact per process."""
        out = {}
        for name, pair in self.pairs():
            for direction, (sx, nx, sy, ny) in pair.alignment_sums().items():
                if nx:
                    out[f"{name}_{direction}"] = [sx, (sy / ny) * nx if ny else 0.0, nx]
        return out

    def alignment_stats(self) -> Dict[str, Dict[str, float]]:
        out = {}
        for name, pair in self.pairs():
            for direction, (sx, nx, sy, ny) in pair.alignment_sums().items():
                if nx:
                    out[f"{name}_{direction}"] = {"cos_x_xprime": sx / nx,
                                                  "cos_x_y": sy / ny if ny else float("nan")}
        return out

    # ---- regulariser -------------------------------------------------------------------------
    def begin_penalty(self) -> None:
        """Start collecting the modules' terms (one per direction per call)."""
        terms: List[Tensor] = []
        for _, pair in self.pairs():
            pair.penalty_terms = terms

    def end_penalty(self) -> Optional[Tensor]:
        """Stop collecting; the mean term of the modules run since `begin_penalty` (None if
        none ran)."""
        terms = None
        for _, pair in self.pairs():
            terms, pair.penalty_terms = pair.penalty_terms, None
        return torch.stack(terms).mean() if terms else None


def build_gca(positions, d_model: int, config: dict) -> GCALayers:
    """One GCAPair per position, keyed "gca<i>", from the config's gca_* keys and align_reg."""
    return GCALayers({
        f"gca{p}": GCAPair(d_model, n_heads=config["gca_heads"], activation=config["gca_activation"],
                           layer_norm=config["gca_layer_norm"], backend=config["gca_backend"])
        for p in positions}, align_reg=config["align_reg"])
