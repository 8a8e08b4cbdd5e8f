"""The alignment regulariser (beyond the paper): training loss + L * mean |cos(X, X')|.

L > 0 pushes every GCA module's output x' toward orthogonality with its query input x,
L < 0 away from it; the paper imposes no such term and observes orthogonality emerging.

How, without touching the backbones: each `gca_kernels.FusedGCA` of the model gets a
forward pre-hook that asks it for its per-row cosine (`need_alignment=True`, differentiable
through every backend) and a forward hook that hands the caller the output alone, as it asked,
and keeps the cosine. The mean |cos| is taken over the rows the alignment probe counts (query
rows that hold an item and see at least one key; rows with no visible key have x' = 0 and
would fake orthogonality), averaged over the modules, and added to the loss by
`RegularisedModel`. Only in training mode: evaluation and the probe are left as they are.
"""

from __future__ import annotations

import inspect
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from gca_kernels import FusedGCA

_SIGNATURE = inspect.signature(FusedGCA.forward)


def probe_rows(x_a: Tensor, key_padding_mask, attn_mask) -> Tensor:
    """(B, La) bool: rows holding an item (non-zero query) that see at least one key."""
    rows = (x_a != 0).any(-1)
    if attn_mask is None and key_padding_mask is None:
        return rows
    blocked = torch.zeros(1, 1, 1, dtype=torch.bool, device=x_a.device)
    if attn_mask is not None:
        blocked = blocked | (attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0))
    if key_padding_mask is not None:
        blocked = blocked | key_padding_mask[:, None, :]
    return rows & (~blocked).any(-1)


class AlignmentRegulariser:
    def __init__(self, model: nn.Module, weight: float):
        self.weight = float(weight)
        self.terms: List[Tensor] = []
        self._forced: Dict[int, bool] = {}
        self._handles = []
        for mod in model.modules():
            if isinstance(mod, FusedGCA):
                self._handles.append(mod.register_forward_pre_hook(self._pre, with_kwargs=True))
                self._handles.append(mod.register_forward_hook(self._post, with_kwargs=True))
        if not self._handles:
            raise ValueError("align_reg: the model has no GCA module (gca_positions is empty): nothing to regularise")

    def _pre(self, mod: nn.Module, args: Tuple, kwargs: Dict):
        bound = _SIGNATURE.bind(mod, *args, **kwargs)
        forced = mod.training and not bound.arguments.get("need_alignment", False)
        self._forced[id(mod)] = forced
        if not forced:
            return None
        return args, {**kwargs, "need_alignment": True}

    def _post(self, mod: nn.Module, args: Tuple, kwargs: Dict, output):
        if not self._forced.pop(id(mod), False):
            return None
        y, cos = output
        bound = _SIGNATURE.bind(mod, *args, **kwargs)
        a = bound.arguments
        rows = probe_rows(a["x_a"], a.get("key_padding_mask"), a.get("attn_mask")).to(cos.dtype)
        self.terms.append((cos.abs() * rows).sum() / rows.sum().clamp(min=1.0))
        return y

    def take(self) -> Tensor | None:
        """Mean |cos(X, X')| over the modules run since the last call (None if none ran)."""
        if not self.terms:
            return None
        term = torch.stack(self.terms).mean()
        self.terms = []
        return term

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


class RegularisedModel(nn.Module):
    """What the trainer calls in training: the model's loss + weight * mean |cos(X, X')|."""

    def __init__(self, model: nn.Module, weight: float):
        super().__init__()
        self.model = model
        self.reg = AlignmentRegulariser(model, weight)

    def forward(self, batch):
        self.reg.terms = []
        loss, logs = self.model(batch)
        term = self.reg.take()
        if term is not None:
            loss = loss + self.reg.weight * term.to(loss.dtype)
            logs = {**logs, "align_cos": float(term.detach())}
        return loss, logs
