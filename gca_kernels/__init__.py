"""gca-kernels: fused Gated Cross-Attention (GCA) and cosine-alignment operators.

``import gca_kernels`` works everywhere: the fused backends (Triton, the C++/CUDA extension)
load lazily and the eager PyTorch reference serves wherever they are missing.
"""

from gca_kernels.backends import (
    BACKEND_NAMES,
    BackendUnavailableError,
    GCAParams,
    available_backends,
    register_backend,
    release_cpu_workspace,
)
from gca_kernels.functional import cosine_alignment, gated_cross_attention
from gca_kernels.module import FusedGCA
from gca_kernels.reference import COS_EPS

__version__ = "0.1.0"

__all__ = [
    "FusedGCA",
    "gated_cross_attention",
    "cosine_alignment",
    "available_backends",
    "register_backend",
    "release_cpu_workspace",
    "GCAParams",
    "BackendUnavailableError",
    "BACKEND_NAMES",
    "COS_EPS",
]
