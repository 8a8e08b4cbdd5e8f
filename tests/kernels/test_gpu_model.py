"""The GPU roofline model (benchmarks/gpu_model.py) traces real launch sequences on meta
tensors: its byte counts must follow from the shapes, and the fused plan must count every
Triton kernel the launchers issue."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from benchmarks import gpu_model as M  # noqa: E402


def test_fused_plan_counts_each_kernel_and_its_tensors():
    shape = (8, 16, 32, 2)
    kernels = M.trace_fused(shape, torch.bfloat16)
    names = [k.name for k in kernels]
    from gca_kernels.ops.triton_gca import KERNELS

    for n in KERNELS:
        assert n in names, n
    assert names.count("_gate_hidden_kernel") == 2  # forward and backward
    # dWo comes back transposed: autograd's copy into the parameter's layout is counted
    assert names.count("clone") == 1
    # the forward row pass reads x_a, x' and g_pre and writes y: four (rows, d) bf16 tensors
    row = next(k for k in kernels if k.name == "_gate_out_fwd_kernel")
    rows_d = 8 * 16 * 32 * 2
    assert 4 * rows_d <= row.nbytes < 5 * rows_d


def test_model_orders_plans_and_placeholders_are_not_traffic():
    res = M.model((64, 50, 64, 2), torch.bfloat16)
    assert res["fused"]["gbytes"] < res["compile"]["gbytes"] < res["eager"]["gbytes"]
    assert res["fused"]["saved_mb"] < res["eager"]["saved_mb"]
    assert res["floor"]["ms"] < res["fused"]["ms"]
    # the forward hidden-layer product has no mask: its HMASK placeholder is not counted
    fwd = next(k for k in M.trace_fused((64, 50, 64, 2), torch.bfloat16) if k.name == "_gate_hidden_kernel")
    rows_d = 64 * 50 * 64 * 2
    assert fwd.nbytes < 3.1 * rows_d  # reads x_a and x', writes h (+ the small weights)
