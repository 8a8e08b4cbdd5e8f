"""Random problem instances shared by the kernel tests.

Each case fixes a shape and a masking pattern; :func:`make_problem` draws the tensors.
The list crosses every dimension the contract names (La != Lb, odd lengths, d not a power of
two, 1..8 heads, both activations, LayerNorm on/off, padding, causal masks, fully masked
query rows, fully padded batch rows) without the full cross product, which the Triton
interpreter could not afford.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch

from gca_kernels.backends import GCAParams


@dataclass(frozen=True)
class Case:
    B: int
    La: int
    Lb: int
    d: int
    heads: int
    activation: str = "sigmoid"
    layer_norm: bool = True
    padding: bool = True          # random key padding
    causal: Optional[str] = None  # None | "2d" | "3d": causal cross mask, shared or per batch
    gate_hidden: Optional[int] = None
    full_pad_row: bool = False    # one batch row with every key padded
    masked_query: bool = False    # some query rows with no visible key (via attn_mask)

    def __str__(self) -> str:
        bits = [f"B{self.B}", f"La{self.La}", f"Lb{self.Lb}", f"d{self.d}", f"h{self.heads}",
                self.activation, "ln" if self.layer_norm else "noln"]
        if self.padding:
            bits.append("pad")
        if self.causal:
            bits.append(f"causal{self.causal}")
        if self.gate_hidden:
            bits.append(f"gh{self.gate_hidden}")
        if self.full_pad_row:
            bits.append("fullpad")
        if self.masked_query:
            bits.append("maskedq")
        return "-".join(bits)


CASES = [
    Case(2, 7, 5, 16, 1),
    Case(2, 5, 7, 16, 2, "tanh", padding=False),
    Case(2, 1, 1, 16, 1, full_pad_row=False),
    Case(2, 33, 7, 48, 4, layer_norm=False, causal="2d"),
    Case(3, 7, 33, 80, 8, "tanh", causal="3d", full_pad_row=True),
    Case(2, 9, 9, 128, 2, gate_hidden=40, masked_query=True),
    Case(2, 7, 7, 48, 1, "sigmoid", layer_norm=False, full_pad_row=True, masked_query=True),
    Case(2, 16, 12, 80, 4, "tanh", causal="2d", gate_hidden=24),
    Case(1, 33, 33, 16, 8, causal="3d"),
    Case(2, 1, 33, 128, 8, "tanh", layer_norm=True, full_pad_row=True),
]

# Cases small enough for gradcheck's finite differences in float64.
GRADCHECK_CASES = [
    Case(2, 3, 4, 8, 2, "sigmoid", causal="2d", full_pad_row=True),
    Case(1, 4, 3, 6, 3, "tanh", layer_norm=False, masked_query=True, gate_hidden=5),
]


def make_problem(case: Case, dtype=torch.float64, device="cpu", seed: int = 0) -> Dict:
    """Inputs, parameters and masks for ``case`` (all leaves require grad)."""
    g = torch.Generator().manual_seed(seed)
    B, La, Lb, d = case.B, case.La, case.Lb, case.d
    hidden = case.gate_hidden or d

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    w = 1.0 / math.sqrt(d)
    params = dict(
        wq=rnd(d, d, scale=w), bq=rnd(d, scale=0.1), wk=rnd(d, d, scale=w), bk=rnd(d, scale=0.1),
        wv=rnd(d, d, scale=w), bv=rnd(d, scale=0.1), wo=rnd(d, d, scale=w), bo=rnd(d, scale=0.1),
        w1=rnd(hidden, 2 * d, scale=1.0 / math.sqrt(2 * d)), b1=rnd(hidden, scale=0.1),
        w2=rnd(d, hidden, scale=1.0 / math.sqrt(hidden)), b2=rnd(d, scale=0.1),
        ln_w=(1.0 + rnd(d, scale=0.1)) if case.layer_norm else None,
        ln_b=rnd(d, scale=0.1) if case.layer_norm else None,
    )
    x_a, x_b = rnd(B, La, d), rnd(B, Lb, d)

    kpm = None
    if case.padding or case.full_pad_row:
        kpm = torch.rand(B, Lb, generator=g) < 0.3
        if case.full_pad_row:
            kpm[0] = True
    attn_mask = None
    if case.causal or case.masked_query:
        # query i sees key j only if j <= i * Lb / La: a causal cross mask on a shared clock
        qi = torch.arange(La)[:, None].double() * Lb / La
        kj = torch.arange(Lb)[None, :].double()
        am = kj > qi if case.causal else torch.zeros(La, Lb, dtype=torch.bool)
        if case.causal == "3d" or case.masked_query:
            am = am[None].repeat(B, 1, 1)
            if case.causal == "3d":  # a per-row shift makes the 3-D mask differ across the batch
                am[-1] = torch.roll(am[-1], shifts=1, dims=1)
        if case.masked_query:
            am[:, 0, :] = True                  # first query row sees nothing
            am[-1, La // 2, :] = True
        attn_mask = am
    leaves = {"x_a": x_a, "x_b": x_b, **{k: v for k, v in params.items() if v is not None}}
    for t in leaves.values():
        t.requires_grad_(True)
    return {
        "x_a": x_a.to(device), "x_b": x_b.to(device),
        "params": GCAParams(**params),
        "key_padding_mask": None if kpm is None else kpm.to(device),
        "attn_mask": None if attn_mask is None else attn_mask.to(device),
        "n_heads": case.heads, "activation": case.activation, "leaves": leaves,
    }


def leaf_names(problem: Dict):
    return list(problem["leaves"].keys())


def cast_problem(problem: Dict, dtype) -> Dict:
    """The same problem in another dtype, with fresh leaves."""
    leaves = {k: v.detach().to(dtype).requires_grad_(True) for k, v in problem["leaves"].items()}
    pd = problem["params"]._asdict()
    params = GCAParams(**{k: (leaves[k] if pd[k] is not None else None) for k in pd})
    out = dict(problem)
    out.update(x_a=leaves["x_a"], x_b=leaves["x_b"], params=params, leaves=leaves)
    return out
