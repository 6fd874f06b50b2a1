#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (issue 3): build pyserve._C with CUDA in a fresh
# build dir, run the `gpu` tests of tests/ops, run the GPU benchmarks (benchmarks/bench_gpu.py: Huffman decode,
# csr_linear / int8_linear / codebook_linear vs cuBLAS fp32/fp16, cuSPARSE via torch.sparse and
# torch._int_mm), and write everything to one results file. Designed to finish in under 8 minutes;
# on an H200 machine (16 cores): 59 s in all (sm_90 build, 612 gpu tests, all benchmarks).
#
#   benchmarks/gpu_check.sh [RESULTS]        # default: gpu_check_results.txt in the repository root
#
# Environment: PY, the Python to use (default .venv/bin/python; a bare name such as python3 is looked
# up on PATH; it needs a CUDA build of torch and
# pyserve's build and test dependencies: scikit-build-core, pybind11, ninja, pytest, hypothesis);
# CUDA_ARCHS, CMake CUDA architectures (default: the visible GPU's, from nvidia-smi).
# Exit status: 0 all passed; 2 no GPU / no nvcc / no CUDA torch; otherwise the failing step's.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
# A bare command name (PY=python3) is looked up on PATH.
case "$PY" in */*) ;; *) PY="$(command -v "$PY" || echo "$PY")" ;; esac
RESULTS="${1:-$ROOT/gpu_check_results.txt}"
BUILD_DIR="build/gpu-check"
BENCH_JSON="$(mktemp "${TMPDIR:-/tmp}/bench_gpu.XXXXXX.json")"
trap 'rm -f "$BENCH_JSON"' EXIT

die() { echo "gpu_check: $*" >&2; exit 2; }

# ---- preconditions: fail fast and clearly where this cannot run ------------------------------
command -v nvidia-smi >/dev/null 2>&1 || die "no GPU: nvidia-smi not found"
nvidia-smi -L >/dev/null 2>&1 && [ -n "$(nvidia-smi -L 2>/dev/null)" ] || die "no GPU: nvidia-smi lists no device"
command -v nvcc >/dev/null 2>&1 || die "nvcc not found on PATH (needed for PYSERVE_CUDA=ON)"
[ -x "$PY" ] || die "no Python at $PY (run 'make base' or set PY=/path/to/python)"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null \
  || die "$PY has no CUDA build of torch (torch.cuda.is_available() is False)"
if [ -z "${CUDA_ARCHS:-}" ]; then
  CUDA_ARCHS="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' .')"
fi

start=$(date +%s)
{
  echo "# pyserve gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "# commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/# gpu /'
  echo "# nvcc $(nvcc --version | tail -n1)"
  echo "# torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda)')"
  echo "# CUDA_ARCHS $CUDA_ARCHS"
} > "$RESULTS"
log() { echo "$*" | tee -a "$RESULTS"; }

# ---- 1. fresh CUDA build (its own build dir; the CPU build in build/ is left alone) ------------
log "## build (PYSERVE_CUDA=ON, $BUILD_DIR)"
rm -rf "$BUILD_DIR"
if ! PYSERVE_CUDA=ON "$PY" -m pip install -q --no-index --no-build-isolation --no-deps -e . \
    -C build-dir="$BUILD_DIR" -C cmake.define.CMAKE_CUDA_ARCHITECTURES="$CUDA_ARCHS" 2>&1 | tee -a "$RESULTS"; then
  echo "gpu_check: the CUDA build failed (see $RESULTS)" >&2; exit 1
fi
if ! "$PY" - <<'EOF' 2>&1 | tee -a "$RESULTS"
import sys
from pyserve.ops import build_info, cuda_device_count
info = build_info()
print("build_info", info, "devices", cuda_device_count())
sys.exit(0 if info["cuda"] and cuda_device_count() > 0 else 1)
EOF
then
  echo "gpu_check: the build has no CUDA kernels or sees no device (see $RESULTS)" >&2; exit 1
fi

# ---- 2. the gpu tests -------------------------------------------------------------------------
log "## tests: pytest -m gpu tests/ops"
set +e
timeout 180 "$PY" -m pytest -m gpu tests/ops -q -rs -p no:cacheprovider 2>&1 | tee -a "$RESULTS"
tests_rc=${PIPESTATUS[0]}
set -e
log "tests exit status: $tests_rc"

# ---- 3. benchmarks ------------------------------------------------------------------------------
log "## benchmarks: benchmarks/bench_gpu.py"
set +e
timeout 240 "$PY" benchmarks/bench_gpu.py --out "$BENCH_JSON" 2>&1 | tee -a "$RESULTS"
bench_rc=${PIPESTATUS[0]}
set -e
if [ "$bench_rc" -eq 0 ]; then
  echo "## benchmark results (JSON)" >> "$RESULTS"
  cat "$BENCH_JSON" >> "$RESULTS"
fi
log "benchmark exit status: $bench_rc"
log "## total $(( $(date +%s) - start )) s"
echo "gpu_check: results in $RESULTS"
[ "$tests_rc" -eq 0 ] || exit "$tests_rc"
exit "$bench_rc"
