"""What the usage tests share: a model written the way users write one around ``FusedGCA``, the
float64 reference it is checked against, and the tolerance rule.

The rule is FlashAttention's: a fused backend's error against the float64 reference may be at
most twice the error of the eager PyTorch reference run in the same dtype, plus a small floor
scaled to the tensor; it adapts to every shape and dtype without hand-tuned constants.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor, nn

import gca_kernels

N_ITEMS = 97

# The backends a user of this machine can run, and the devices they run on. Triton on the CPU
# runs only in its interpreter (seconds per call at these sizes): it gets the small cases only.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def fused_backends(device: str, small: bool = False):
    out = []
    for name in gca_kernels.available_backends():
        if name == "eager":
            continue
        if name == "triton" and device == "cpu" and not small:
            continue
        b = gca_kernels.backends.get_backend(name)
        if b.supports(torch.device(device), torch.float32) is None:
            out.append(name)
    return out


class CrossDomainModel(nn.Module):
    """Item ids of two domains -> embeddings (-> a shared Linear) -> FusedGCA -> a score head.

    The loss uses both outputs (y and the alignment cos), so every gradient path is exercised.
    ``inputs``: "embedding" (x_a, x_b straight from nn.Embedding: non-leaf, requiring grad),
    "linear" (after an nn.Linear), "leaf" (given tensors that require grad), "no_grad" (given
    tensors that do not; only the parameters learn).
    """

    def __init__(self, d: int, heads: int, backend: str, inputs: str = "embedding",
                 activation: str = "sigmoid", layer_norm: bool = True):
        super().__init__()
        self.inputs = inputs
        self.emb_a = nn.Embedding(N_ITEMS, d, padding_idx=0)
        self.emb_b = nn.Embedding(N_ITEMS, d, padding_idx=0)
        self.proj = nn.Linear(d, d)
        self.gca = gca_kernels.FusedGCA(d, heads, activation=activation, layer_norm=layer_norm,
                                        backend=backend)
        self.head = nn.Linear(d, 1)

    def forward(self, ids_a: Tensor, ids_b: Tensor, kpm: Optional[Tensor], am: Optional[Tensor],
                x_a: Optional[Tensor] = None, x_b: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        if self.inputs in ("embedding", "linear"):
            x_a, x_b = self.emb_a(ids_a), self.emb_b(ids_b)
            if self.inputs == "linear":
                x_a, x_b = self.proj(x_a), self.proj(x_b)
        y, cos = self.gca(x_a, x_b, key_padding_mask=kpm, attn_mask=am, need_alignment=True)
        score = self.head(y).squeeze(-1)
        loss = (score * torch.linspace(-1, 1, score.shape[-1], dtype=score.dtype)).mean() \
            + 0.1 * (score ** 2).mean() + 0.5 * (cos * cos).mean()
        return loss, y


def make_batch(B: int, La: int, Lb: int, d: int, mask: str, device: str = "cpu",
               seed: int = 0) -> Dict[str, Optional[Tensor]]:
    """Item ids and masks of one batch. ``mask``:
    - "dense": full-length sequences, no mask (every query row sees every key);
    - "padded": random key padding (about half), one batch row with every key padded;
    - "causal": a shared causal cross mask (query i sees keys j < i: row 0 sees none);
    - "left_causal": left-padded histories of random lengths under the causal mask (what the
      backbones feed: about half the keys padded, many query rows keyless);
    - "few_keyless" / "many_keyless": a dense batch except for 2 / 5 of every 32 batch rows
      whose keys are all padded (active query fraction ~0.94 / ~0.84: either side of the
      C++ backend's 0.9 compaction cutoff).
    """
    g = torch.Generator().manual_seed(seed)
    ids_a = torch.randint(1, N_ITEMS, (B, La), generator=g)
    ids_b = torch.randint(1, N_ITEMS, (B, Lb), generator=g)
    kpm = am = None
    if mask == "padded":
        kpm = torch.rand(B, Lb, generator=g) < 0.5
        if B > 1:
            kpm[0] = True
    elif mask == "causal":
        am = torch.ones(La, Lb, dtype=torch.bool).triu(0)
    elif mask == "left_causal":
        lens = torch.randint(0, Lb + 1, (B,), generator=g)
        kpm = torch.arange(Lb)[None, :] < (Lb - lens)[:, None]
        am = torch.ones(La, Lb, dtype=torch.bool).triu(0)
    elif mask in ("few_keyless", "many_keyless"):
        kpm = torch.zeros(B, Lb, dtype=torch.bool)
        per32 = 2 if mask == "few_keyless" else 5
        kpm[torch.arange(B) % 32 < per32] = True
    elif mask != "dense":
        raise ValueError(mask)
    if kpm is not None:
        ids_b = ids_b.masked_fill(kpm, 0)
    to = (lambda t: None if t is None else t.to(device))  # noqa: E731
    return {"ids_a": to(ids_a), "ids_b": to(ids_b), "kpm": to(kpm), "am": to(am)}


def clone_as(model: nn.Module, backend: str, dtype: torch.dtype) -> nn.Module:
    m = copy.deepcopy(model).to(dtype)
    m.gca.backend = backend
    return m


def run(model: nn.Module, batch, leaf_inputs: Optional[Tuple[Tensor, Tensor]] = None):
    """Loss, y and every gradient (parameters, and the leaf inputs when given)."""
    model.zero_grad(set_to_none=True)
    x_a = x_b = None
    dtype = next(model.parameters()).dtype
    if leaf_inputs is not None:
        x_a, x_b = (t.detach().to(dtype).requires_grad_(model.inputs == "leaf") for t in leaf_inputs)
    loss, y = model(batch["ids_a"], batch["ids_b"], batch["kpm"], batch["am"], x_a, x_b)
    loss.backward()
    grads = {k: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
             for k, p in model.named_parameters()}
    if leaf_inputs is not None and model.inputs == "leaf":
        grads["x_a"], grads["x_b"] = x_a.grad.clone(), x_b.grad.clone()
    return {"loss": loss.detach(), "y": y.detach(), **grads}


def leaf_tensors(batch, d: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(5)
    B, La = batch["ids_a"].shape
    Lb = batch["ids_b"].shape[1]
    return (torch.randn(B, La, d, generator=g).to(device), torch.randn(B, Lb, d, generator=g).to(device))


def assert_within_rule(fused: Dict[str, Tensor], eager: Dict[str, Tensor], ref: Dict[str, Tensor],
                       what: str = "", factor: float = 2.0, floor: float = 5e-6) -> None:
    """Every entry: |fused - ref| <= factor * |eager - ref| + floor * max(1, |ref|) elementwise max."""
    assert fused.keys() == ref.keys(), (sorted(fused), sorted(ref))
    for k, r in ref.items():
        r = r.double()
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        err_f = (fused[k].double() - r).abs().max().item() if r.numel() else 0.0
        err_e = (eager[k].double() - r).abs().max().item() if r.numel() else 0.0
        assert torch.isfinite(fused[k]).all(), f"{what} {k}: non-finite values"
        assert err_f <= factor * err_e + floor * scale, (
            f"{what} {k}: fused error {err_f:.3g} > {factor} x eager error {err_e:.3g} + floor "
            f"{floor * scale:.3g}")


def check_against_reference(model: nn.Module, backend: str, batch, leaf=None, what: str = ""):
    """Run ``model`` with ``backend`` in float32, eager float32 and eager float64; compare."""
    fused = run(clone_as(model, backend, torch.float32), batch, leaf)
    eager = run(clone_as(model, "eager", torch.float32), batch, leaf)
    ref = run(clone_as(model, "eager", torch.float64), batch, leaf)
    assert_within_rule(fused, eager, ref, what=what)
    return fused


@contextmanager
def num_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)

