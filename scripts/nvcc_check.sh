#!/usr/bin/env bash
# Compile every CUDA source under csrc/ with nvcc, compile-only, so CUDA code cannot rot on
# CPU-only CI.  Exits non-zero if any file fails (or if nvcc is missing).
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
ARCH=${NVCC_ARCH:-sm_90}
command -v "$NVCC" >/dev/null || { echo "nvcc-check: $NVCC not found" >&2; exit 1; }
mapfile -t files < <(find csrc -name '*.cu' | sort)
[ ${#files[@]} -gt 0 ] || { echo "nvcc-check: no .cu files under csrc/" >&2; exit 1; }
status=0
for f in "${files[@]}"; do
  if "$NVCC" -std=c++17 -arch="$ARCH" -Icsrc -c "$f" -o /dev/null; then
    echo "nvcc-check: ok   $f"
  else
    echo "nvcc-check: FAIL $f" >&2
    status=1
  fi
done
# the CUDA module's C++ binding file: syntax-check it where pybind11 is importable
PY=${PYTHON:-.venv/bin/python}
if [ -x "$PY" ] && inc=$("$PY" -m pybind11 --includes 2>/dev/null); then
  if g++ -std=c++17 -fsyntax-only -Icsrc $inc csrc/cuda/bindings.cpp; then
    echo "nvcc-check: ok   csrc/cuda/bindings.cpp (g++ -fsyntax-only)"
  else
    echo "nvcc-check: FAIL csrc/cuda/bindings.cpp" >&2
    status=1
  fi
fi
exit $status
