"""``FusedGCA``: the drop-in module. Parameters are plain ``nn.Linear``/``nn.LayerNorm`` so
state dicts interchange with an eager implementation; the forward is one fused call."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from gca_kernels.backends import BACKEND_NAMES
from gca_kernels.functional import ACTIVATIONS, gated_cross_attention


class FusedGCA(nn.Module):
    """Gated Cross-Attention: domain A queries (x_a) attend to domain B keys/values (x_b).

    ``y = LayerNorm(x_a + act(gate_fc2(relu(gate_fc1([x_a ; x'])))) * x')``,
    ``x' = out_proj(MHA(q_proj(x_a), k_proj(x_b), v_proj(x_b)))``.
    """

    def __init__(self, d_model: int, n_heads: int = 1, gate_hidden: Optional[int] = None,
                 activation: str = "sigmoid", layer_norm: bool = True, ln_eps: float = 1e-5,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        if not isinstance(n_heads, int) or n_heads < 1 or d_model % n_heads != 0:
            raise ValueError(f"n_heads must be a positive int dividing d_model={d_model}, got {n_heads!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if backend != "auto" and backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {backend!r}")
        gate_hidden = d_model if gate_hidden is None else gate_hidden
        if not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ValueError(f"gate_hidden must be a positive int, got {gate_hidden!r}")
        self.d_model, self.n_heads, self.gate_hidden = d_model, n_heads, gate_hidden
        self.activation, self.ln_eps, self.backend = activation, ln_eps, backend
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)
        self.gate_fc1 = nn.Linear(2 * d_model, gate_hidden)
        self.gate_fc2 = nn.Linear(gate_hidden, d_model)
        self.norm = nn.LayerNorm(d_model, eps=ln_eps) if layer_norm else None

    def forward(self, x_a: Tensor, x_b: Tensor, key_padding_mask: Optional[Tensor] = None,
                attn_mask: Optional[Tensor] = None, need_alignment: bool = False):
        norm = self.norm
        return gated_cross_attention(
            x_a, x_b,
            self.q_proj.weight, self.q_proj.bias, self.k_proj.weight, self.k_proj.bias,
            self.v_proj.weight, self.v_proj.bias, self.out_proj.weight, self.out_proj.bias,
            self.gate_fc1.weight, self.gate_fc1.bias, self.gate_fc2.weight, self.gate_fc2.bias,
            ln_w=None if norm is None else norm.weight, ln_b=None if norm is None else norm.bias,
            key_padding_mask=key_padding_mask, attn_mask=attn_mask, n_heads=self.n_heads,
            activation=self.activation, ln_eps=self.ln_eps, need_alignment=need_alignment,
            backend=self.backend)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, gate_hidden={self.gate_hidden}, "
                f"activation={self.activation!r}, layer_norm={self.norm is not None}, backend={self.backend!r}")
