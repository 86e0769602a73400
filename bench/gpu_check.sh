#!/usr/bin/env bash
# GPU check (`make gpu-check`): everything one lent H100/H200 should measure, in at most
# TOTAL_S seconds (default 300) of wall time, on a CUDA machine with the project's source tree
# and no network, using the system python3 (torch with CUDA, triton, pytest already there).
#
#   1. probe     machine.json: GPU, versions, bf16 matmul rate, copy and L2 bandwidth (~20 s)
#   2. peers     wheels in .whl/ (bench/fetch_peer_wheels.sh) -> /tmp/site; else unavailable
#   3. build     python3 setup.py build_ext --inplace (C++ and CUDA epilogues), <= 90 s
#   4. tests     python3 -m pytest -m gpu tests (correctness at the real shapes; also compiles
#                the Triton kernels the benchmark then finds in Triton's cache), <= 100 s
#   5. bench     python3 -m bench: the log-prob op, bf16, N=8192 and 16384 at D=4096,
#                V=128256, then the vocabulary sweep V=32000, 256000 at N=8192, every method
#                (peers not installed are rows "unavailable"), results written after each
#                shape, stopped at the time limit
#   6. summary   summary.md: one table (method, time, memory, % of bf16 peak) + the goal checks
#
# Everything lands in $GPU_OUT (default bench/results/gpu-check), flat, at most 8 files:
#   gpu_check.log  machine.json  build.log  pytest_gpu.log  results.json  results.md
#   logprob_vocab.png  summary.md
# On a lent device machine: `make gpu-check GPU_OUT=$OUT` (docs/kernels.md has the procedure).
#
# GPU_CHECK_DRY_RUN=1: the same plumbing on a CPU with tiny shapes (no build, GPU tests only
# collected), for CI (tests/test_gpu_check_plumbing.py).
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"
GPU_OUT="${GPU_OUT:-bench/results/gpu-check}"
PY="${PYTHON:-python3}"
TOTAL_S="${TOTAL_S:-300}"
DRY="${GPU_CHECK_DRY_RUN:-0}"
START=$(date +%s)
mkdir -p "$GPU_OUT"
LOG="$GPU_OUT/gpu_check.log"
: > "$LOG"
exec > >(tee -a "$LOG") 2>&1

left() { echo $(( TOTAL_S - ($(date +%s) - START) )); }
cap() { local t=$(( $(left) - $2 )); [ "$t" -gt "$1" ] && t=$1; [ "$t" -lt 5 ] && t=5; echo "$t"; }
step() { echo; echo "=== $* (t=$(( $(date +%s) - START ))s, $(left)s left) ==="; }
declare -A RC

export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export MAX_JOBS="${MAX_JOBS:-16}"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu
    SHAPES="N=40,D=24,V=300"
    SWEEP=(--vocab-sweep 300 600 --sweep-n 40 --sweep-d 24)
    BENCH_OPTS=(--methods eager ours_torch ours_cpu ours_triton ours_cuda --reps 1 --budget 0
                --no-accuracy)
    PYTEST_TARGET=(tests/test_gpu_logprob.py)
    export TRITON_INTERPRET=1
else
    DEVICE=cuda
    SHAPES="N=8192,D=4096,V=128256 N=16384,D=4096,V=128256"
    SWEEP=(--vocab-sweep 32000 256000 --sweep-n 8192 --sweep-d 4096)
    BENCH_OPTS=(--reps 5 --budget 2)
    # the kernels' own GPU tests first (the goal shapes), then every other GPU test
    PYTEST_TARGET=(tests/test_gpu_logprob.py tests/test_gpu_cuda_backend.py tests/test_edge_inputs.py
                   tests)
fi

step "1. probe (machine.json)"
timeout -k 5 "$(cap 60 200)" "$PY" -m bench.gpu_check probe "$GPU_OUT"
RC[probe]=$?

step "2. peer wheels (.whl/)"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    mkdir -p /tmp/site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    RC[peers]=$?
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
else
    echo "no .whl/: peers not installed here are rows 'unavailable' (bench/fetch_peer_wheels.sh)"
    RC[peers]=none
fi

step "3. build (setup.py build_ext --inplace)"
if [ "$DRY" = 1 ]; then
    echo "dry run: build skipped" > "$GPU_OUT/build.log"
    RC[build]=skipped
else
    timeout -k 10 "$(cap 90 190)" "$PY" setup.py build_ext --inplace > "$GPU_OUT/build.log" 2>&1
    RC[build]=$?
    tail -n 5 "$GPU_OUT/build.log"
    [ "${RC[build]}" = 0 ] || echo "build failed (the cuda backend then JIT-compiles or reports why)"
fi

step "4. GPU tests (pytest -m gpu)"
timeout -k 10 "$(cap 100 100)" "$PY" -m pytest -m gpu "${PYTEST_TARGET[@]}" -q -rfEs \
    -p no:cacheprovider > "$GPU_OUT/pytest_gpu.log" 2>&1
RC[tests]=$?
tail -n 15 "$GPU_OUT/pytest_gpu.log"

step "5. benchmark (goal shapes, then the vocabulary sweep)"
# shellcheck disable=SC2086
timeout -k 10 "$(cap "$TOTAL_S" 25)" "$PY" -m bench --device "$DEVICE" --workload logprob --no-isolate \
    --shapes $SHAPES "${SWEEP[@]}" "${BENCH_OPTS[@]}" --plots vocab --out "$GPU_OUT" \
    >> "$LOG" 2>&1   # progress and the runner's own table: in the log only
RC[bench]=$?
grep -E "^\[logprob\]|^  [a-z_]+ " "$LOG" | tail -n 40

step "6. summary"
"$PY" -m bench.gpu_check summary "$GPU_OUT"
{
    for k in probe peers build tests bench; do echo "- $k: exit ${RC[$k]:-not run}"; done
    echo "- elapsed: $(( $(date +%s) - START )) s of TOTAL_S=$TOTAL_S"
} | tee -a "$GPU_OUT/summary.md"
"$PY" -m bench.gpu_check layout "$GPU_OUT" || echo "gpu-check: $GPU_OUT would not come back in one piece"
[ "${RC[tests]}" = 0 ] && [ "${RC[bench]}" = 0 ]
