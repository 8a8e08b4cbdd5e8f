"""Parameter-matched "scaled" baselines (the paper's claim 3).

`scale_to_match = [0]` (config; CLI `--set scale_to_match=[0]`) builds the *bare* backbone
widened so that its trainable parameter count equals that of the backbone + the GCA modules
at those positions, within 2%. The widened size is the model's `scale_key` (the feed-forward
inner size of every backbone here): the count is affine in it, so two counts give the exact
width (rounded to an integer: the error is at most half a unit's parameters, far below 2%).
Counts are taken on the meta device (no memory, no initialisation cost).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch

TOLERANCE = 0.02


def count_trainable(cls, n_items_a: int, n_items_b: int, config: Dict[str, Any]) -> int:
    cfg = dict(config, scale_to_match=[])
    # Frozen tables loaded from files are buffers, never counted: skip reading them.
    for key in ("emb_global_npy", "emb_a_npy", "emb_b_npy"):
        if key in cfg:
            cfg[key] = None
    with torch.device("meta"):
        model = cls(n_items_a, n_items_b, cfg)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _positions(value) -> list:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"scale_to_match must be a list of GCA positions, got {value!r}")
    return sorted(set(int(v) for v in value))


def scaled_config(cls, n_items_a: int, n_items_b: int, config: Dict[str, Any]
                  ) -> Tuple[Dict[str, Any], Optional[int]]:
    """(config with the widened `cls.scale_key`, target parameter count), or (config, None)
    when `scale_to_match` is empty."""
    targets = _positions(config.get("scale_to_match"))
    if not targets:
        return config, None
    base = cls.resolve_config(dict(config, scale_to_match=[]))
    if base["gca_positions"]:
        raise ValueError(f"scale_to_match={targets} widens the bare backbone: leave gca_positions empty "
                         f"(got {base['gca_positions']})")
    key = cls.scale_key
    target = count_trainable(cls, n_items_a, n_items_b, dict(base, gca_positions=targets))
    width = base[key]
    n0 = count_trainable(cls, n_items_a, n_items_b, base)
    n1 = count_trainable(cls, n_items_a, n_items_b, dict(base, **{key: width + 1}))
    slope = n1 - n0
    if slope <= 0:
        raise ValueError(f"{cls.name}: {key} does not change the parameter count; cannot scale")
    new_width = max(1, int(round(width + (target - n0) / slope)))
    out = dict(config, **{key: new_width})
    got = count_trainable(cls, n_items_a, n_items_b, dict(base, **{key: new_width}))
    if abs(got - target) > TOLERANCE * target:
        raise ValueError(f"{cls.name}: widening {key} to {new_width} gives {got:,} parameters, "
                         f"more than {TOLERANCE:.0%} away from the target {target:,}")
    return out, target


class ScalableMixin:
    """For Recommender subclasses with a `scale_key`: call `scaled_config` first in __init__,
    `_record_counts` last. Records `n_params` (trainable parameters of this model)
    and `n_params_target` (backbone + GCA at `scale_to_match`; equals n_params otherwise)."""

    def _record_counts(self, target: Optional[int]) -> None:
        self.n_params = sum(p.numel() for p in self.parameters() if p.requires_grad)
        self.n_params_target = self.n_params if target is None else target
