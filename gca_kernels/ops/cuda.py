"""The ``cuda`` backend: the compiled CUDA extension ``gca_kernels._C_cuda`` (float16,
bfloat16, float32, float64), the fallback on GPUs where Triton is missing.

GCA and cosine alignment run as the custom ops of :mod:`gca_kernels.ops.extension_ops`
(``gca_kernels::cuda_gca_fwd``/``_bwd``, ``cuda_cos_fwd``/``_bwd``). The products go to cuBLAS
through ATen; the attention, the row epilogues and the LayerNorm-parameter reduction are the
CUDA kernels of csrc/.

Importing this module raises ImportError when the extension was not built (built only where
torch has CUDA and a CUDA toolkit was found at install time).
"""

from __future__ import annotations

from typing import Optional

import torch

from gca_kernels import _C_cuda  # noqa: F401  (ImportError here: the extension is not built)
from gca_kernels.backends import register_backend
from gca_kernels.ops.extension_ops import define_ops


def supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA devices only, got tensors on {device}"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return f"the cuda backend supports float16/bfloat16/float32/float64, got {dtype}"
    return None


gca_cuda, cosine_alignment_cuda = define_ops("cuda", _C_cuda)
register_backend("cuda", gca_fn=gca_cuda, cosine_fn=cosine_alignment_cuda, supports=supports)
