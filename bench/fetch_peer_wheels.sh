#!/usr/bin/env bash
# Download the benchmark's peers as wheels into .whl/ (git-ignored) for a machine without
# network access, e.g. a lent GPU machine: `make gpu-check` installs .whl/*.whl with
# `pip install --no-index --no-deps --target /tmp/site` when it finds them.  Run it where pip
# can reach PyPI, in the checkout that travels to the GPU machine, and carry `.whl` along.
# The target is the GPU machine's python (3.12, x86-64 Linux); the three peers are pure Python
# and their dependencies (torch, triton, transformers, packaging) are already there.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
PEERS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
mkdir -p .whl
"$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform any \
    -d .whl "${PEERS[@]}"
ls -l .whl
