"""Compile check of the CUDA backend's sources: ``nvcc -c`` of every ``.cu`` file against the
installed torch's headers. Runs wherever nvcc is on PATH, with or without a GPU (it proves the
kernels compile, not that they are right: that needs a GPU and the shared suite).

A CPU-only torch ships the c10/cuda headers but not the one CMake generates for CUDA builds
(``c10/cuda/impl/cuda_cmake_macros.h``); the check supplies an equivalent stand-in then.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sysconfig

import pytest

CSRC = os.path.join(os.path.dirname(__file__), "..", "..", "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
NVCC = shutil.which("nvcc")


def test_cuda_sources_exist():
    assert {"gca_cuda.cu", "cosine_cuda.cu"} <= set(CU_FILES)


@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: CUDA compile check skipped")
@pytest.mark.parametrize("source", CU_FILES)
def test_nvcc_compiles(source, tmp_path):
    from torch.utils.cpp_extension import include_paths

    includes = include_paths() + [sysconfig.get_paths()["include"]]
    macros = "c10/cuda/impl/cuda_cmake_macros.h"
    if not any(os.path.exists(os.path.join(i, macros)) for i in includes):
        shim = tmp_path / "shim"
        (shim / os.path.dirname(macros)).mkdir(parents=True)
        (shim / macros).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
        includes.append(str(shim))
    cmd = [NVCC, "-c", os.path.join(CSRC, source), "-o", str(tmp_path / (source + ".o")),
           "-std=c++20", "-O1", "--expt-relaxed-constexpr", "-arch=sm_80",
           *(f"-I{i}" for i in includes)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{proc.stderr[-4000:]}"
