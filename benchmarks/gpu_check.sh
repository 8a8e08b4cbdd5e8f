#!/usr/bin/env bash
# The GPU check, one command for a machine with an NVIDIA GPU and a CUDA build of torch and
# triton already installed (nothing is downloaded). About 10 minutes:
#   1. the CUDA extension, built in place;
#   2. tests/gpu: compiled Triton and the CUDA extension against the float64 reference in
#      float32/bf16/fp16 (the flash-attention tolerance rule), and CUDA-graph capture;
#   3. the GPU benchmarks in bf16 at the two target shapes (eager, torch.compile, triton,
#      cuda side by side), written with the device name into benchmarks/RESULTS.md's
#      "Measured on a GPU" section.
# Usage: bash benchmarks/gpu_check.sh   (BENCH_FILTER overrides the benchmark selection)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
export TRITON_DEFAULT_FP_FUSION=1

python - <<'PY' | tee "$OUT/device.txt"
import torch, triton
assert torch.cuda.is_available(), "no CUDA device: this script is for a GPU machine"
p = torch.cuda.get_device_properties(0)
print(f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB; "
      f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton.__version__}")
PY

echo "== 1. CUDA extension"
MAX_JOBS="${MAX_JOBS:-8}" timeout 300 python setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
    || { tail -30 "$OUT/build.log"; exit 1; }
python -c "import gca_kernels; print('backends:', gca_kernels.available_backends())"

echo "== 2. tests on the GPU"
timeout 240 python -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -5

echo "== 3. benchmarks"
FILTER="${BENCH_FILTER:-cuda-bfloat16 and (B1024-L50-d256-h2 or B256-L200-d128-h4)}"
GCA_BENCH_TABLE="$OUT/bench.md" timeout 300 python -m pytest benchmarks/ --benchmark-only -q \
    -p no:cacheprovider -k "$FILTER" > "$OUT/bench.log" 2>&1 || { tail -30 "$OUT/bench.log"; exit 1; }

python - "$OUT" <<'PY'
import datetime, pathlib, subprocess, sys
out = pathlib.Path(sys.argv[1])
device = (out / "device.txt").read_text().strip()
commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
section = (f"### Measured on a GPU\n\n{device}; commit {commit or 'unknown'}, "
           f"{datetime.date.today()}; `bash benchmarks/gpu_check.sh`.\n\n"
           + (out / "bench.md").read_text() + "\n")
path = pathlib.Path("benchmarks/RESULTS.md")
text = path.read_text()
start = text.find("### Measured on a GPU")
if start < 0:
    text = text.rstrip("\n") + "\n\n" + section
else:
    end = text.find("\n### ", start + 1)
    text = text[:start] + section + ("" if end < 0 else text[end + 1:])
path.write_text(text)
print(section)
PY
echo "results in $OUT; benchmarks/RESULTS.md updated"
