"""Build of gca-kernels: the pure-Python package plus two optional compiled extensions.

- ``gca_kernels._C``: the C++ (CPU) backend, built wherever torch and a C++ compiler exist.
- ``gca_kernels._C_cuda``: the CUDA backend, built only where torch was built with CUDA
  (``torch.version.cuda``) AND a CUDA toolkit (``CUDA_HOME``/``CUDA_PATH`` or ``nvcc`` on PATH)
  is found. Set ``GCA_NO_EXTENSIONS=1`` to skip both, ``GCA_NO_CUDA=1`` to skip the CUDA one.

The extensions compile against the installed torch, so install with torch already present:

    pip install --no-build-isolation .          # or, for the source tree:
    python setup.py build_ext --inplace

A failed or skipped extension never fails the install: the package then runs on its other
backends (eager at least) and ``gca_kernels.available_backends()`` shows what was built.

Rebuilds compile only what changed: torch's BuildExtension drives ninja (``pip install ninja``
where it is missing), whose dependency files track every header, and the object files live in
``build/temp/<extension>/`` in the source tree whatever command builds (``build_ext
--inplace``, ``pip install -e .``, ``pip install .``), so they survive between builds. ``MAX_JOBS``
sets ninja's parallel compile jobs (default: ninja's own, about the CPU count). ninja prints
``[k/n]`` and the command of each file it compiles (with pip, add ``-v`` to see them).
"""

from __future__ import annotations

import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.join("csrc")
# object files and ninja's state, one folder per extension (they share sources compiled with
# different flags), kept between builds
BUILD_TEMP = os.path.join(HERE, "build", "temp")
# Sources shared by both extensions: argument checks, CPU memory reuse, row compaction and the
# orchestration of the products (each a no-op or the dense path on CUDA).
CPU_SOURCES = ["bindings.cpp", "arg_checks.cpp", "cpu_memory.cpp", "row_compaction.cpp",
               "gca_orchestration.cpp", "gca_cpu.cpp", "attention_cpu.cpp", "row_epilogue_cpu.cpp",
               "cosine_cpu.cpp"]
CUDA_SOURCES = ["bindings_cuda.cpp", "arg_checks.cpp", "cpu_memory.cpp", "row_compaction.cpp",
                "gca_orchestration.cpp", "gca_cuda.cu", "attention_cuda.cu", "row_epilogue_cuda.cu",
                "cosine_cuda.cu"]
# -O3 and OpenMP; no -march=native: the wheel may run on another CPU than the one building it.
# -fno-math-errno: sqrt may then be a vector instruction (with errno to set, GCC keeps it a scalar
# call guarded by a branch); nothing here reads errno.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-math-errno"]
NVCC_FLAGS = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]


def _log(msg: str) -> None:
    print(f"[gca-kernels setup] {msg}", file=sys.stderr)


def _truthy(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _cuda_toolkit() -> str | None:
    """The CUDA toolkit root, found without calling any torch CUDA helper."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root
    nvcc = shutil.which("nvcc")
    if nvcc:
        return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    return None


def _extensions_and_cmdclass():
    if _truthy("GCA_NO_EXTENSIONS"):
        _log("GCA_NO_EXTENSIONS is set: building the pure-Python package only (eager backend).")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except Exception as exc:  # torch missing at build time (e.g. build isolation)
        _log(f"torch is not importable ({type(exc).__name__}: {exc}); the C++/CUDA backends are "
             "NOT built. Install torch first, then: pip install --no-build-isolation .")
        return [], {}

    src = lambda names: [os.path.join(CSRC, n) for n in names]  # noqa: E731
    exts = [CppExtension("gca_kernels._C", src(CPU_SOURCES),
                         extra_compile_args={"cxx": CXX_FLAGS}, extra_link_args=["-fopenmp"])]

    toolkit = None if _truthy("GCA_NO_CUDA") else _cuda_toolkit()
    if _truthy("GCA_NO_CUDA"):
        _log("GCA_NO_CUDA is set: skipping the CUDA extension.")
    elif torch.version.cuda is None:
        _log(f"torch {torch.__version__} has no CUDA support: skipping the CUDA extension.")
    elif toolkit is None:
        _log("no CUDA toolkit found (CUDA_HOME/CUDA_PATH unset and no nvcc on PATH): "
             "skipping the CUDA extension.")
    else:
        os.environ.setdefault("CUDA_HOME", toolkit)
        from torch.utils.cpp_extension import CUDAExtension  # needs a toolkit: imported only now

        exts.append(CUDAExtension("gca_kernels._C_cuda", src(CUDA_SOURCES),
                                  extra_compile_args={"cxx": ["-O3"], "nvcc": NVCC_FLAGS}))

    class TolerantBuildExtension(BuildExtension):
        """Builds each extension on its own; a failure is logged and the install goes on."""

        def build_extensions(self):
            self.failed = []
            self.built = []
            try:
                super().build_extensions()
            except Exception as exc:  # torch's toolchain checks (compiler missing/unusable)
                self.failed += [e.name for e in self.extensions
                                if e.name not in self.built and e.name not in self.failed]
                _log(f"FAILED before compiling ({type(exc).__name__}: {exc}): {self.failed} not built. "
                     "The package still installs; gca_kernels.available_backends() shows what is usable.")
            if self.failed:
                self.extensions = [e for e in self.extensions if e.name not in self.failed]

        def build_extension(self, ext):
            self.build_temp = os.path.join(BUILD_TEMP, ext.name)
            _log(f"building {ext.name}: {len(ext.sources)} sources, objects in "
                 f"{os.path.relpath(self.build_temp, HERE)}, MAX_JOBS={os.environ.get('MAX_JOBS', 'unset')}"
                 f"{'' if self.use_ninja else ' (no ninja: every file recompiles)'}")
            try:
                super().build_extension(ext)
                self.built.append(ext.name)
                _log(f"built {ext.name}")
            except Exception as exc:  # compiler missing or compile error: keep the package usable
                self.failed.append(ext.name)
                _log(f"FAILED to build {ext.name} ({type(exc).__name__}: {exc}). The package still "
                     "installs; that backend is unavailable (see gca_kernels.available_backends()).")

        def copy_extensions_to_source(self):
            # --inplace: copy only what was built
            failed = set(getattr(self, "failed", []))
            self.extensions = [e for e in self.extensions if e.name not in failed]
            super().copy_extensions_to_source()

    return exts, {"build_ext": TolerantBuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions_and_cmdclass()

setup(
    packages=find_packages(where=HERE, include=["gca_kernels*", "models*", "cdsr*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
