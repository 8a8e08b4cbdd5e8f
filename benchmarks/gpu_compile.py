"""Compile report of the GPU kernels, made without a GPU: the compiler as the instrument.

Every Triton kernel is compiled ahead of time for one NVIDIA architecture (``triton.compile``
of an ``ASTSource`` for ``GPUTarget("cuda", arch, 32)``) with exactly the arguments, block
sizes and warp counts its launcher chooses for the GPU benchmark shapes: the launchers of
``gca_kernels.ops.triton_gca`` / ``triton_cosine`` run on CPU tensors with every kernel
replaced by a stand-in that records its launch, so the report cannot drift from what the launchers do. The CUDA
extension's sources go through ``nvcc -Xptxas -v``. For each kernel and configuration one JSON
record: ``kernel``, ``backend`` (triton/cuda), ``dtype``, ``shape``, ``config``,
``registers``, ``spill_bytes`` (local memory per thread, where spilled registers go),
``shared_bytes``, ``dot_instructions`` (FMA-unit ``fma.rn.f32`` lines, a proxy for dots
run without tensor cores) and ``tensor_core_instructions`` (``wgmma`` and ``mma`` lines of
its PTX), whose PTX is written to ``--ptx-dir``. Run from the repository root:

    python -m benchmarks.gpu_compile --arch 90 --json sm90.json --ptx-dir ptx90 [--check]

``--check`` exits non-zero and names each record over the architecture's shared-memory limit,
with spills, or computing dots in half precision without a tensor-core instruction: ``.ci/run``
runs it for sm_90 and sm_80 as a gate.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from contextlib import contextmanager
from typing import Callable, Dict, Iterator, List

import torch

# Triton 3.9 warns unless the FP-fusion default is chosen: keep its current default (on).
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

SHAPES = [(256, 50, 64, 2), (256, 50, 128, 2), (256, 50, 256, 2), (128, 200, 128, 1),
          (1024, 50, 256, 2), (256, 200, 128, 4), (64, 50, 512, 4), (16, 50, 1024, 8)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# shared memory a block may use (dynamic + static), bytes
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
_TL_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
             torch.float64: "fp64", torch.uint8: "u8", torch.bool: "i1", torch.int32: "i32",
             torch.int64: "i64"}


class KernelStandIn:
    """Stands in for a JITFunction: ``kernel[grid](*args, **kw)`` hands the call
    ``{"fn", "grid", "args", "kwargs"}`` to ``on_launch`` and runs nothing."""

    def __init__(self, fn, on_launch: Callable[[dict], None]):
        self.fn, self.on_launch = fn, on_launch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.on_launch({"fn": self.fn, "grid": grid, "args": args, "kwargs": kwargs})
        return launch


@contextmanager
def kernels_standing_in(on_launch: Callable[[dict], None], cosine: bool = True) -> Iterator[None]:
    """Within the block, every Triton kernel of the GCA launchers (``triton_gca.KERNELS``) and,
    with ``cosine``, the cosine's is a ``KernelStandIn``: the launchers run on ``meta`` tensors
    and report each launch in order, interleaved with the torch ops between them."""
    from gca_kernels.ops import triton_cosine as C
    from gca_kernels.ops import triton_gca as T

    names = [(T, n) for n in T.KERNELS]
    if cosine:
        names += [(C, "_cos_align_fwd_kernel"), (C, "_cos_align_bwd_kernel")]
    originals = {(m, n): getattr(m, n) for m, n in names}
    try:
        for (m, n), fn in originals.items():
            setattr(m, n, KernelStandIn(fn, on_launch))
        yield
    finally:
        for (m, n), fn in originals.items():
            setattr(m, n, fn)


def _record_launches(shape, dtype) -> List[dict]:
    """Run the Triton launchers (forward, backward, cosine) on ``meta`` tensors of ``shape``:
    the torch products between the kernels cost nothing there."""
    from gca_kernels.ops import triton_cosine as C
    from gca_kernels.ops import triton_gca as T

    calls: List[dict] = []
    with kernels_standing_in(calls.append):
        B, L, d, H = shape
        e = lambda *s: torch.zeros(*s, dtype=dtype, device="meta")  # noqa: E731
        x_a, x_b = e(B, L, d), e(B, L, d)
        w = [e(d, d), e(d)] * 4 + [e(d, 2 * d), e(d), e(d, d), e(d)]
        kpm = torch.zeros(B, L, dtype=torch.bool, device="meta")
        am = torch.ones(L, L, dtype=torch.bool, device="meta").triu(1)[None]
        y, cos, saved = T.gca_forward(x_a, x_b, *w, e(d), e(d), kpm, am, H, "sigmoid", 1e-5)
        T.gca_backward(e(B, L, d), e(B, L), x_a, x_b, w[6], w[8], w[10], e(d), kpm, am, saved,
                       H, "sigmoid", 1e-5)
        C.cosine_alignment_forward(x_a, y, ~kpm, True)
        C.cosine_alignment_backward(torch.ones((), device="meta"), x_a, y, ~kpm, True)
    return calls


def _signature(call) -> tuple:
    fn = call["fn"]
    names = fn.arg_names
    values = dict(zip(names, call["args"]))
    values.update({k: v for k, v in call["kwargs"].items() if k in names})
    sig, consts = {}, {}
    for i, name in enumerate(names):
        v = values[name]
        if i in fn.constexprs or name not in values:
            sig[name] = "constexpr"
            consts[name] = v
        elif isinstance(v, torch.Tensor):
            sig[name] = "*" + _TL_TYPES[v.dtype]
        elif isinstance(v, bool):
            sig[name] = "i1"
        elif isinstance(v, int):
            sig[name] = "i32" if abs(v) < 2**31 else "i64"
        elif isinstance(v, float):
            sig[name] = "fp32"
        else:
            sig[name], consts[name] = "constexpr", v
    opts = {k: v for k, v in call["kwargs"].items() if k in ("num_warps", "num_stages")}
    return sig, consts, opts


def _cuobjdump() -> str:
    import triton.backends.nvidia as nv

    return os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")


def _resources(cubin: bytes) -> Dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True,
                             text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    reg, stack, shared, local = (int(g) for g in m.groups())
    return {"registers": reg, "spill_bytes": local + stack, "static_shared": shared}


def _count_tc(ptx: str) -> int:
    return len(re.findall(r"^\s*(wgmma\.|mma\.)", ptx, flags=re.M))


def _demangle(names: List[str]) -> List[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True).stdout
    return out.splitlines() if len(out.splitlines()) == len(names) else names


def triton_records(arch: int, ptx_dir: str, shapes=SHAPES, dtypes=DTYPES) -> List[dict]:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", arch, 32)
    records, seen = [], {}
    for shape in shapes:
        for dname, dtype in dtypes.items():
            for call in _record_launches(shape, dtype):
                sig, consts, opts = _signature(call)
                name = call["fn"].__name__
                config = {k: (str(v) if isinstance(v, tl.dtype) else v) for k, v in consts.items()}
                config.update(opts)
                key = (name, json.dumps(sig, sort_keys=True), json.dumps(config, sort_keys=True))
                if key not in seen:
                    k = triton.compile(ASTSource(fn=call["fn"], signature=sig, constexprs=consts),
                                       target=target, options=opts)
                    ptx = k.asm["ptx"]
                    res = _resources(k.asm["cubin"])
                    fname = f"{name}-{dname}-" + "-".join(f"{a}{b}" for a, b in sorted(config.items())
                                                          if a.startswith(("BLOCK", "num_")))
                    with open(os.path.join(ptx_dir, fname + ".ptx"), "w") as f:
                        f.write(ptx)
                    seen[key] = {
                        "registers": res["registers"], "spill_bytes": res["spill_bytes"],
                        "shared_bytes": int(k.metadata.shared) + res["static_shared"],
                        "tensor_core_instructions": _count_tc(ptx),
                        "dot_instructions": len(re.findall(r"^\s*fma\.rn\.f32", ptx, flags=re.M)),
                        "computes_dots": "tt.dot" in k.asm["ttir"] or "tt.dot_scaled" in k.asm["ttir"],
                        "ptx": fname + ".ptx",
                    }
                records.append({"kernel": name, "backend": "triton", "dtype": dname,
                                "shape": list(shape), "config": config, **seen[key]})
    return records


def cuda_records(arch: int, ptx_dir: str) -> List[dict]:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return []
    from torch.utils.cpp_extension import include_paths

    csrc = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        includes = include_paths() + [sysconfig.get_paths()["include"]]
        macros = "c10/cuda/impl/cuda_cmake_macros.h"
        if not any(os.path.exists(os.path.join(i, macros)) for i in includes):
            os.makedirs(os.path.join(tmp, os.path.dirname(macros)))
            with open(os.path.join(tmp, macros), "w") as f:
                f.write("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
            includes.append(tmp)
        for src in sorted(f for f in os.listdir(csrc) if f.endswith(".cu")):
            common = ["-std=c++20", "-O3", "--expt-relaxed-constexpr", f"-arch=sm_{arch}",
                      *(f"-I{i}" for i in includes)]
            ptx_path = os.path.join(ptx_dir, src.replace(".cu", f".sm{arch}.ptx"))
            subprocess.run([nvcc, "-ptx", os.path.join(csrc, src), "-o", ptx_path, *common],
                           check=True, capture_output=True, text=True)
            proc = subprocess.run([nvcc, "-c", os.path.join(csrc, src), "-o",
                                   os.path.join(tmp, src + ".o"), "-Xptxas", "-v", *common],
                                  check=True, capture_output=True, text=True)
            ptx = open(ptx_path).read()
            # ptxas -v: "Compiling entry function 'NAME'", then "N bytes spill stores",
            # "Used R registers, ... S bytes smem"
            current = None
            for line in proc.stderr.splitlines():
                m = re.search(r"Compiling entry function '([^']+)'", line)
                if m:
                    current = {"kernel": m.group(1), "backend": "cuda", "dtype": "all",
                               "shape": None, "config": {"source": src}, "spill_bytes": 0,
                               "ptx": os.path.basename(ptx_path)}
                    records.append(current)
                    continue
                if current is None:
                    continue
                m = re.search(r"(\d+) bytes spill stores", line)
                if m:
                    current["spill_bytes"] = int(m.group(1))
                m = re.search(r"Used (\d+) registers", line)
                if m:
                    current["registers"] = int(m.group(1))
                    s = re.search(r"(\d+) bytes smem", line)
                    current["shared_bytes"] = int(s.group(1)) if s else 0
            for r in records:
                if r["config"].get("source") == src:
                    body = _ptx_entry(ptx, r["kernel"])
                    r["tensor_core_instructions"] = _count_tc(body)
                    r["dot_instructions"] = len(re.findall(r"^\s*fma\.rn\.f32", body, flags=re.M))
    for r, name in zip(records, _demangle([r["kernel"] for r in records])):
        r["symbol"], r["kernel"] = r["kernel"], name
    return records


def _ptx_entry(ptx: str, name: str) -> str:
    start = ptx.find(f".entry {name}(")
    if start < 0:
        return ""
    end = ptx.find(".entry ", start + 1)
    return ptx[start:end if end > 0 else len(ptx)]


def violations(records: List[dict], arch: int) -> List[str]:
    limit = SHARED_LIMIT.get(arch, 48 * 1024)
    out = []
    for r in records:
        where = f"{r['backend']} {r['kernel']} {r['dtype']} {r['shape']} {r['config']}"
        if r.get("spill_bytes", 0) > 0:
            out.append(f"{where}: {r['spill_bytes']} bytes of spills")
        if r.get("shared_bytes", 0) > limit:
            out.append(f"{where}: {r['shared_bytes']} bytes of shared memory > {limit}")
        if (r["backend"] == "triton" and r["dtype"] in ("bf16", "fp16") and r.get("computes_dots")
                and r["tensor_core_instructions"] == 0):
            out.append(f"{where}: dots without a tensor-core instruction")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 or 80")
    ap.add_argument("--json", required=True, metavar="FILE", help="where the records go")
    ap.add_argument("--ptx-dir", required=True, metavar="DIR", help="where each kernel's PTX goes")
    ap.add_argument("--no-cuda", action="store_true", help="skip the nvcc part")
    ap.add_argument("--shapes", nargs="+", default=None, metavar="B,L,D,H",
                    help="shapes to compile for (default: the GPU benchmark shapes, d 512 and 1024)")
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--check", action="store_true",
                    help="exit 1 on spills, shared memory over the limit, or half-precision dots "
                         "without tensor cores")
    args = ap.parse_args(argv)
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
        ap.error("run in a process of its own: triton was imported here in interpreter mode")
    # the launchers must choose the GPU configurations, not the interpreter's
    os.environ.pop("TRITON_INTERPRET", None)
    os.makedirs(args.ptx_dir, exist_ok=True)
    shapes = SHAPES if args.shapes is None else [tuple(int(v) for v in s.split(",")) for s in args.shapes]
    records = triton_records(args.arch, args.ptx_dir, shapes, {k: DTYPES[k] for k in args.dtypes})
    if not args.no_cuda:
        records += cuda_records(args.arch, args.ptx_dir)
    with open(args.json, "w") as f:
        json.dump(records, f, indent=1)
    bad = violations(records, args.arch)
    print(f"{len(records)} records ({len({(r['kernel'], r['ptx']) for r in records})} distinct "
          f"compilations) for sm_{args.arch} -> {args.json}; {len(bad)} violations")
    for line in bad[:40]:
        print("  " + line)
    return 1 if (args.check and bad) else 0


if __name__ == "__main__":
    sys.exit(main())
