"""The GPU compile report (benchmarks/gpu_compile.py) runs on a machine without a GPU: it
compiles every Triton kernel for sm_90 exactly as its launcher configures it, and reads
registers, spills, shared memory and tensor-core instructions off the compiler's output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

from benchmarks.gpu_compile import violations  # noqa: E402
from gca_kernels.ops.triton_gca import KERNELS as GCA_KERNELS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KERNELS = set(GCA_KERNELS) | {"_cos_align_fwd_kernel", "_cos_align_bwd_kernel"}


def test_report_compiles_every_triton_kernel_for_sm90(tmp_path):
    out, ptx = tmp_path / "r.json", tmp_path / "ptx"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_compile", "--arch", "90", "--json", str(out),
                           "--ptx-dir", str(ptx), "--shapes", "2,5,16,2", "--dtypes", "bf16", "fp32",
                           "--no-cuda"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = json.loads(out.read_text())
    assert {r["kernel"] for r in records} == KERNELS
    assert {r["dtype"] for r in records} == {"bf16", "fp32"}
    for r in records:
        for key in ("backend", "shape", "config", "registers", "spill_bytes", "shared_bytes",
                    "tensor_core_instructions"):
            assert key in r, (r["kernel"], key)
        assert 0 < r["registers"] <= 255 and r["shared_bytes"] >= 0
        assert ".entry " + r["kernel"] in (ptx / r["ptx"]).read_text()
        if r["dtype"] == "fp32" and r["kernel"].startswith("_attn"):
            # float32 stays exact (ieee): FMA units, never tensor cores
            assert r["tensor_core_instructions"] == 0 and r["dot_instructions"] > 0
        if r["dtype"] == "bf16" and r["computes_dots"]:
            # half precision: every kernel with dots runs them on tensor cores
            assert r["tensor_core_instructions"] > 0, r["kernel"]


def test_violations_name_spills_shared_memory_and_half_dots_without_tensor_cores():
    ok = {"backend": "triton", "kernel": "k", "dtype": "bf16", "shape": [1, 1, 16, 1], "config": {},
          "registers": 100, "spill_bytes": 0, "shared_bytes": 1024, "tensor_core_instructions": 4,
          "computes_dots": True}
    assert violations([ok], 90) == []
    bad = [dict(ok, spill_bytes=8), dict(ok, shared_bytes=300 * 1024), dict(ok, tensor_core_instructions=0)]
    got = violations(bad, 90)
    assert len(got) == 3
    assert "spills" in got[0] and "shared memory" in got[1] and "tensor-core" in got[2]
    # float32 dots on FMA units are allowed (exact paths for tests)
    assert violations([dict(ok, dtype="fp32", tensor_core_instructions=0)], 90) == []
    # sm_80's limit is lower than sm_90's
    assert violations([dict(ok, shared_bytes=200 * 1024)], 90) == []
    assert len(violations([dict(ok, shared_bytes=200 * 1024)], 80)) == 1
