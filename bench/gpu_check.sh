#!/usr/bin/env bash
# GPU check (`make gpu-check`): on a CUDA machine with the project's source tree and no
# network, using the system `python3` (torch with CUDA, triton, pytest already there).
#   1. peer wheels in .whl/ (if any) -> pip install --no-index --no-deps --target /tmp/site
#   2. build the native extension in place (failure tolerated: the backends report it)
#   3. python3 -m pytest -m gpu tests
#   4. python3 -m bench --device cuda --quick, then the full GPU benchmark if time is left
# Everything is teed into $GPU_OUT (default bench/results/gpu-check/).  Whole script: about
# 9 minutes at most (TOTAL_S); each step runs under `timeout` with what is left.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
GPU_OUT="${GPU_OUT:-bench/results/gpu-check}"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-540}"
START=$(date +%s)
mkdir -p "$GPU_OUT"
LOG="$GPU_OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
step() { echo; echo "=== $* (t=$(( $(date +%s) - START ))s, $(left)s left) ==="; }
declare -A RC

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1

step "machine"
nvidia-smi || true
"$PY" - <<'EOF' || true
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(0))
try:
    import triton; print("triton", triton.__version__)
except Exception as e:
    print("triton: not importable:", e)
EOF

step "peer wheels (.whl/)"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    mkdir -p /tmp/site
    "$PY" -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl
    RC[wheels]=$?
    export PYTHONPATH="$ROOT:/tmp/site${PYTHONPATH#"$ROOT"}"
else
    echo "no .whl/ directory: peers not installed here are recorded as unavailable"
    RC[wheels]=skipped
fi
echo "PYTHONPATH=$PYTHONPATH"

step "native extension (setup.py build_ext --inplace)"
timeout -k 10 "$(( $(left) > 200 ? 200 : $(left) ))" "$PY" setup.py build_ext --inplace \
    > "$GPU_OUT/build_ext.log" 2>&1
RC[build_ext]=$?
tail -n 30 "$GPU_OUT/build_ext.log"
[ "${RC[build_ext]}" = 0 ] || echo "build_ext failed (tolerated; the cuda/cpu backends report the reason)"

step "pytest -m gpu tests"
T=$(( $(left) - 150 )); [ "$T" -lt 60 ] && T=60
timeout -k 10 "$T" "$PY" -m pytest -m gpu tests -q -rs --junitxml="$GPU_OUT/pytest_gpu.xml" \
    2>&1 | tee "$GPU_OUT/pytest_gpu.log"
RC[pytest_gpu]=${PIPESTATUS[0]}

step "benchmark, quick (python3 -m bench --device cuda --quick)"
T=$(( $(left) - 10 )); [ "$T" -lt 30 ] && T=30
timeout -k 10 "$T" "$PY" -m bench --device cuda --quick --out "$GPU_OUT/bench-quick"
RC[bench_quick]=$?

if [ "$(left)" -gt 240 ]; then
    step "benchmark, full (stopped at the time limit; results are written after every shape)"
    timeout -k 10 "$(( $(left) - 10 ))" "$PY" -m bench --device cuda --out "$GPU_OUT/bench-full" \
        --reps 5 --budget 5
    RC[bench_full]=$?
else
    RC[bench_full]="skipped (not enough time left)"
fi

step "summary"
{
    for k in wheels build_ext pytest_gpu bench_quick bench_full; do echo "$k: ${RC[$k]:-not run}"; done
    echo "elapsed: $(( $(date +%s) - START )) s"
} | tee "$GPU_OUT/summary.txt"
[ "${RC[pytest_gpu]}" = 0 ] && [ "${RC[bench_quick]}" = 0 ]
