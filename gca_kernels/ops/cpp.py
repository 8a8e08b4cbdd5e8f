"""The ``cpp`` backend: the compiled CPU extension ``gca_kernels._C`` (float32/float64).

GCA and cosine alignment run as the custom ops of :mod:`gca_kernels.ops.extension_ops`
(``gca_kernels::cpp_gca_fwd``/``_bwd``, ``cpp_cos_fwd``/``_bwd``). The products go to ATen
(MKL/oneDNN), the row kernels are OpenMP loops (csrc/). Under autocast the CPU kernels compute
in float32: they have no half-precision paths.

Importing this module raises ImportError when the extension was not built (the backend loader
keeps the reason and shows it when somebody forces ``backend="cpp"``).
"""

from __future__ import annotations

from typing import Optional

import torch

from gca_kernels import _C  # noqa: F401  (ImportError here: the extension is not built)
from gca_kernels.backends import register_backend
from gca_kernels.ops.extension_ops import define_ops


def supports(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    if device.type != "cpu":
        return f"the cpp backend runs on the CPU only, got tensors on {device}"
    if dtype not in (torch.float32, torch.float64):
        return f"the cpp backend supports float32 and float64 on the CPU, got {dtype}"
    return None


gca_cpp, cosine_alignment_cpp = define_ops("cpp", _C)
register_backend("cpp", gca_fn=gca_cpp, cosine_fn=cosine_alignment_cpp, supports=supports,
                 autocast_compute=torch.float32)
