"""Fused backends. Each module registers itself with ``gca_kernels.backends`` on import."""

from typing import Optional, Tuple

from torch import Tensor


def output_grads(x_a: Tensor, dy: Optional[Tensor], dcos: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The GCA backward's incoming gradients, a missing one (y or cos not in the loss) as zeros."""
    if dy is None:
        dy = x_a.new_zeros(x_a.shape)
    if dcos is None:
        dcos = x_a.new_zeros(x_a.shape[:2])
    return dy, dcos
