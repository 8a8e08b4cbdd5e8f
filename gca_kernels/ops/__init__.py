"""Fused backends. Each module registers itself with ``gca_kernels.backends`` on import."""
