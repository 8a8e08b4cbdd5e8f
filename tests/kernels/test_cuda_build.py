"""Compile check of the CUDA backend's sources: ``nvcc -c`` of every ``.cu`` file against the
installed torch's headers. Runs wherever nvcc is on PATH, with or without a GPU (it proves the
kernels compile, not that they are right: that needs a GPU and the shared suite).

A CPU-only torch ships the c10/cuda headers but not the one CMake generates for CUDA builds
(``c10/cuda/impl/cuda_cmake_macros.h``); the check supplies an equivalent stand-in then.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
CSRC = os.path.join(ROOT, "csrc")
CU_FILES = sorted(f for f in os.listdir(CSRC) if f.endswith(".cu"))
NVCC = shutil.which("nvcc")


def _setup_list(name):
    """A list literal assigned at the top level of setup.py (read, not run: running it builds)."""
    tree = ast.parse(open(os.path.join(ROOT, "setup.py")).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"setup.py has no {name} list")


def _read(name):
    with open(os.path.join(CSRC, name)) as f:
        return f.read()


def test_cuda_extension_compiles_every_kernel_and_binds_what_python_calls():
    """The CUDA extension's source list, its bindings and the Python wrapper agree: no .cu
    file is left out of the build (its kernels would silently be missing), every bound
    function is defined in a compiled source, and every op the wrapper calls is bound."""
    sources = _setup_list("CUDA_SOURCES")
    assert CU_FILES, "no .cu sources in csrc/"
    missing = [s for s in sources if not os.path.isfile(os.path.join(CSRC, s))]
    assert not missing, f"setup.py CUDA_SOURCES lists files that do not exist: {missing}"
    assert set(CU_FILES) <= set(sources), f"not compiled into _C_cuda: {set(CU_FILES) - set(sources)}"
    bindings = [s for s in sources if "PYBIND11_MODULE" in _read(s)]
    assert len(bindings) == 1, f"expected one PYBIND11_MODULE among {sources}, found {bindings}"
    bound = dict(re.findall(r'm\.def\(\s*"(\w+)"\s*,\s*&(?:\w+::)*(\w+)', _read(bindings[0])))
    compiled = "\n".join(_read(s) for s in sources if s != bindings[0])
    for op, fn in bound.items():
        assert re.search(rf"\b{fn}\s*\([^;{{]*\)\s*{{", compiled), f"{op} binds {fn}, defined in no CUDA source"
    with open(os.path.join(ROOT, "gca_kernels", "ops", "extension_ops.py")) as f:
        called = set(re.findall(r"\bext\.(\w+)\(", f.read()))
    assert called and called <= set(bound), f"called by gca_kernels/ops/extension_ops.py but not bound: {called - set(bound)}"


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
