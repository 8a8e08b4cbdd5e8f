"""Backend registry and selection.

Each fused backend module calls :func:`register_backend` when imported. The loader below
imports them lazily inside try/except, so a machine without triton or without the compiled
extension still imports ``gca_kernels`` and falls back to ``eager``. Why a backend failed to
load is kept and shown when somebody forces that backend.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional

import torch
from torch import Tensor

BACKEND_NAMES = ("eager", "triton", "cuda", "cpp")
# Preference of backend="auto", per device type: fastest correct first.
AUTO_ORDER = {"cuda": ("triton", "cuda", "eager"), "cpu": ("cpp", "eager")}
# Modules that register the fused backends (imported on first use).
_BACKEND_MODULES = {
    "triton": ("gca_kernels.ops.triton_gca", "gca_kernels.ops.triton_cosine"),
    "cpp": ("gca_kernels.ops.cpp",),
    "cuda": ("gca_kernels.ops.cuda",),
}


class GCAParams(NamedTuple):
    wq: Tensor
    bq: Tensor
    wk: Tensor
    bk: Tensor
    wv: Tensor
    bv: Tensor
    wo: Tensor
    bo: Tensor
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    ln_w: Optional[Tensor]
    ln_b: Optional[Tensor]


@dataclass(frozen=True)
class Backend:
    name: str
    gca_fn: Callable
    cosine_fn: Callable
    supports: Callable[[torch.device, torch.dtype], Optional[str]]
    # The dtype GCA computes in under autocast to a half dtype: None = that half dtype itself
    # (float32 accumulation inside); the cpp backend, which has no half kernels, says float32.
    autocast_compute: Optional[torch.dtype] = None

    def compute_dtype(self, autocast_dtype: torch.dtype) -> torch.dtype:
        return self.autocast_compute or autocast_dtype


class BackendUnavailableError(RuntimeError):
    """A forced backend is not installed or cannot serve the given tensors."""


_REGISTRY: Dict[str, Backend] = {}
_LOAD_ERRORS: Dict[str, str] = {}
_loaded = False


def register_backend(name: str, *, gca_fn: Callable, cosine_fn: Callable, supports: Callable,
                     autocast_compute: Optional[torch.dtype] = None) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend name must be one of {BACKEND_NAMES}, got {name!r}")
    _REGISTRY[name] = Backend(name, gca_fn, cosine_fn, supports, autocast_compute)


def _eager_backend() -> Backend:
    from gca_kernels import reference

    def gca_fn(x_a, x_b, p: GCAParams, key_padding_mask, attn_mask, n_heads, activation, ln_eps):
        return reference.gated_cross_attention_ref(
            x_a, x_b, *p[:12], ln_w=p.ln_w, ln_b=p.ln_b, key_padding_mask=key_padding_mask,
            attn_mask=attn_mask, n_heads=n_heads, activation=activation, ln_eps=ln_eps)

    return Backend("eager", gca_fn, reference.cosine_alignment_ref, lambda device, dtype: None)


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    _REGISTRY["eager"] = _eager_backend()
    for name, modules in _BACKEND_MODULES.items():
        for mod in modules:
            try:
                importlib.import_module(mod)
            except Exception as exc:  # a missing optional dependency must not break import
                _LOAD_ERRORS.setdefault(name, f"{mod}: {type(exc).__name__}: {exc}")
        if name not in _REGISTRY and name not in _LOAD_ERRORS:
            _LOAD_ERRORS[name] = "its module loaded but did not register it (not built for this machine)"


def _devices_here() -> List[torch.device]:
    return [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def available_backends() -> List[str]:
    """Backends installed that can run on this machine, in :data:`BACKEND_NAMES` order.

    A backend counts when it serves float32 on a device present here: ``triton`` needs a CUDA
    GPU (or ``TRITON_INTERPRET=1``), ``cuda`` a CUDA GPU, ``cpp`` the compiled extension.
    """
    _load_all()
    here = _devices_here()
    return [n for n in BACKEND_NAMES if n in _REGISTRY
            and any(_REGISTRY[n].supports(dev, torch.float32) is None for dev in here)]


def release_cpu_workspace() -> int:
    """Free the memory the ``cpp`` backend keeps between calls on the calling thread.

    The C++ backend keeps the temporaries of a call (gathered rows, intermediate gradients) in
    per-thread buffers sized by the largest call so far, and recycles the memory of what it
    hands out (outputs, gradients, saved intermediates) through a per-thread pool, instead of
    fresh allocations that the C library hands back to the OS and page-faults in again on every
    call. Returns the number of bytes held before the call (blocks of the pool still in use by
    live tensors stay with them and are freed when those tensors go; 0 when the extension was
    never loaded).
    """
    ext = sys.modules.get("gca_kernels._C")
    if ext is None:
        return 0
    held = int(ext.workspace_bytes())
    ext.release_workspace()
    return held


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be 'auto' or one of {list(BACKEND_NAMES)}, got {name!r}")
    if name not in _REGISTRY:
        why = _LOAD_ERRORS.get(name, "not registered")
        raise BackendUnavailableError(
            f"GCA backend {name!r} is not available: {why}. Available: {available_backends()}. "
            + _HOW_TO_BUILD.get(name, ""))
    return _REGISTRY[name]


_HOW_TO_BUILD = {
    "triton": "Install triton (pip install triton) on a machine with a CUDA GPU "
              "(or set TRITON_INTERPRET=1 before importing to run it on the CPU, slowly).",
    "cpp": "Rebuild with a C++ compiler present: pip install --no-build-isolation .",
    "cuda": "Rebuild with nvcc and a CUDA-enabled torch present: pip install --no-build-isolation .",
}


def resolve(backend: str, device: torch.device, dtype: torch.dtype,
            autocast_dtype: Optional[torch.dtype] = None) -> Backend:
    """The backend serving tensors on ``device`` of ``dtype``.

    ``"auto"`` (or ``GCA_BACKEND`` when set) picks the first backend of :data:`AUTO_ORDER`
    able to serve; a forced backend that cannot serve raises and says why. Under autocast
    (``autocast_dtype`` given) each backend is asked about the dtype it would compute in
    (:meth:`Backend.compute_dtype`), not about ``dtype``.
    """
    def wanted(b: Backend) -> torch.dtype:
        return dtype if autocast_dtype is None else b.compute_dtype(autocast_dtype)

    if backend == "auto":
        backend = os.environ.get("GCA_BACKEND", "auto") or "auto"
    if backend != "auto":
        b = get_backend(backend)
        why = b.supports(device, wanted(b))
        if why is not None:
            raise BackendUnavailableError(f"GCA backend {backend!r} cannot serve this call: {why}")
        return b
    _load_all()
    for name in AUTO_ORDER.get(device.type, ("eager",)):
        b = _REGISTRY.get(name)
        if b is not None and b.supports(device, wanted(b)) is None:
            return b
    return _REGISTRY["eager"]
