"""FusedGCA inside a model, as users train it: inputs from nn.Embedding (or nn.Linear, or given
tensors), output and every gradient against the float64 eager reference, at batch sizes on both
sides of every internal size threshold of every backend present, at 1 and 2 threads.

Thresholds, read from the code (a shape is named after the one it sits next to):

- ``csrc/row_compaction.cpp``, ``csrc/gca_orchestration.cpp``, ``csrc/cpu_memory.cpp``
  - ``kCompactMinRows = 128``: fewer rows (B*La queries, B*Lb keys) always take the dense path.
  - ``kCompactMaxFraction = 0.9``: above this active fraction the dense path runs, below it the
    products run on the active rows only ("few_keyless" / "many_keyless" batches).
  - ``kSplitSumMinRows = 1024``: from this many rows the weight-gradient products split the
    rows in two halves computed on two threads (the parallel region that crashed dense
    batches of 1,024+ rows when its workers did not run with the caller's autograd state).
  - ``kPoolMinBytes = 64 KiB``: smaller tensors bypass the recycled-block pool.
- ``csrc/attention_tiles_cpu.h``, ``csrc/row_epilogue_cpu.cpp``
  - ``kKeyBlock = 16`` keys per score block, ``kQueryGroup = 4`` query rows per group: Lb and La
    around them.
  - 16-wide transposes of k/v (d around multiples of 16); ``kRowsPerChunk = 64`` rows per
    partial sum of the bias/LayerNorm reductions; 4 row partials in the gate backward.
- ``csrc/cosine_cpu.cpp``: 16 rows per vector group, ``kRowsPerChunk = 256`` rows per partial
  sum, ``kBwdGroupMaxD = 64`` (grouped backward up to d = 64).
- ``gca_kernels/functional.py``: B = 0 or Lb = 0 goes to the reference (tested in
  test_edge_cases.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.usage.common import (CrossDomainModel, check_against_reference, fused_backends,
                                leaf_tensors, make_batch, num_threads)

# (B, La, Lb, d, heads), each named for the threshold it sits next to
SIZES = {
    "rows127_below_compact_min": (1, 127, 9, 16, 2),
    "rows128_compact_min": (16, 8, 8, 16, 2),
    "rows1023_below_split": (31, 33, 17, 16, 2),
    "rows1024_split": (32, 32, 16, 16, 2),
    "issue_B32_L50_d64": (32, 50, 50, 64, 2),
    "La3_Lb15_d8": (4, 3, 15, 8, 1),
    "La5_Lb17_d24_h3": (4, 5, 17, 24, 3),
    "rows260_d72_cos_wide": (4, 65, 33, 72, 1),
}
MASKS = ("dense", "padded", "causal", "left_causal")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("size", sorted(SIZES))
def test_embedding_model_matches_reference(size, mask, threads):
    B, La, Lb, d, heads = SIZES[size]
    backends = fused_backends("cpu")
    if not backends:
        pytest.skip("no fused backend runs on this machine's CPU")
    torch.manual_seed(0)
    model = CrossDomainModel(d, heads, backend="eager")
    batch = make_batch(B, La, Lb, d, mask, seed=hash((size, mask)) % 1000)
    with num_threads(threads):
        for backend in backends:
            check_against_reference(model, backend, batch, what=f"{backend} {size} {mask} t{threads}")


@pytest.mark.parametrize("mask", ["few_keyless", "many_keyless"])
@pytest.mark.parametrize("B", [8, 64])
def test_either_side_of_the_compaction_cutoff(mask, B):
    """Active query fraction ~0.94 (dense path) and ~0.84 (compact path), B*La below and above
    the 1,024 rows of the weight-gradient split."""
    torch.manual_seed(0)
    model = CrossDomainModel(32, 2, backend="eager")
    batch = make_batch(B, 20, 20, 32, mask, seed=B)
    with num_threads(2):
        for backend in fused_backends("cpu"):
            check_against_reference(model, backend, batch, what=f"{backend} {mask} B{B}")


@pytest.mark.parametrize("inputs", ["embedding", "linear", "leaf", "no_grad"])
@pytest.mark.parametrize("mask", ["dense", "left_causal"])
def test_input_kinds(inputs, mask):
    """Non-leaf inputs requiring grad (nn.Embedding, nn.Linear), leaf inputs, inputs without
    grad, on 1,600-row batches at 2 threads."""
    torch.manual_seed(0)
    model = CrossDomainModel(64, 2, backend="eager", inputs=inputs)
    batch = make_batch(32, 50, 50, 64, mask, seed=3)
    leaf = leaf_tensors(batch, 64) if inputs in ("leaf", "no_grad") else None
    with num_threads(2):
        for backend in fused_backends("cpu"):
            out = check_against_reference(model, backend, batch, leaf, what=f"{backend} {inputs} {mask}")
            if inputs == "leaf":
                assert out["x_a"].abs().sum() > 0 and out["x_b"].abs().sum() > 0


@pytest.mark.parametrize("activation,layer_norm", [("tanh", False), ("sigmoid", False), ("tanh", True)])
def test_gate_variants_on_dense_batches(activation, layer_norm):
    torch.manual_seed(0)
    model = CrossDomainModel(32, 4, backend="eager", activation=activation, layer_norm=layer_norm)
    batch = make_batch(40, 30, 30, 32, "dense", seed=4)
    with num_threads(2):
        for backend in fused_backends("cpu"):
            check_against_reference(model, backend, batch, what=f"{backend} {activation} ln={layer_norm}")


@pytest.mark.parametrize("mask", ["dense", "padded"])
def test_float64_dense_batches(mask):
    """float64 through the fused backend: the same code paths at the oracle's precision."""
    torch.manual_seed(0)
    model = CrossDomainModel(64, 2, backend="eager").double()
    batch = make_batch(32, 50, 50, 64, mask, seed=6)
    from tests.usage.common import clone_as, run
    ref = run(clone_as(model, "eager", torch.float64), batch)
    with num_threads(2):
        for backend in fused_backends("cpu"):
            got = run(clone_as(model, backend, torch.float64), batch)
            for k, r in ref.items():
                torch.testing.assert_close(got[k], r, rtol=1e-9, atol=1e-11, msg=lambda m, k=k: f"{backend} {k}: {m}")


@pytest.mark.parametrize("mask", MASKS[:2])
def test_triton_interpreter_small(mask):
    """Triton runs on the CPU only in its interpreter: a small batch of each kind."""
    backends = [b for b in fused_backends("cpu", small=True) if b == "triton"]
    if not backends:
        pytest.skip("triton does not run on this machine (no GPU, no TRITON_INTERPRET=1)")
    torch.manual_seed(0)
    model = CrossDomainModel(16, 2, backend="eager")
    batch = make_batch(3, 5, 6, 16, mask, seed=7)
    check_against_reference(model, "triton", batch, what=f"triton {mask}")
