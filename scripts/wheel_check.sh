#!/usr/bin/env bash
# Packaging check (CI): `python -m build` makes an sdist and then a wheel *from that sdist*
# (build isolation: setuptools + pybind11 only), so a file the sdist forgets breaks the check.
# The wheel goes into a clean venv that gets torch==2.13.0 (the pinned CPU build, first, so
# no CUDA wheels are pulled) and then the wheel *with* its declared dependencies: an
# undeclared dependency fails here.  From there, outside the source tree, it must run the op,
# the losses and the CLI's --help.  Portable flags (SGDPO_FAST_PORTABLE=1: no
# -march=native), as for a wheel meant for other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
TORCH=${TORCH:-torch==2.13.0}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SGDPO_FAST_PORTABLE=1 "$PY" -m build --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
grep -q "Building wheel from sdist\|from sdist" "$OUT/build.log" || { echo "wheel not built from the sdist"; tail -20 "$OUT/build.log"; exit 1; }
ls "$OUT"/dist/*.tar.gz "$OUT"/dist/*.whl
"$PY" -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install -q "$TORCH"
"$OUT/venv/bin/python" -m pip install -q "$OUT"/dist/*.whl
cd "$OUT"                                        # away from the source tree
"$OUT/venv/bin/python" - <<'PYEOF'
import torch
import sgdpo_fast as sf
from sgdpo_fast.ops import native

assert "/venv/" in sf.__file__, sf.__file__          # the wheel's copy, not the source tree
assert native.cpu_epilogue() is not None, native.why_missing()
g = torch.Generator().manual_seed(0)
h = torch.randn(2, 6, 16, generator=g, requires_grad=True)
w = torch.randn(37, 16, generator=g, requires_grad=True)
t = torch.randint(0, 37, (2, 6), generator=g)
t[:, :2] = -100
lp = sf.fused_token_logprobs(h, w, t, backend="cpu")
ref = torch.log_softmax(h.double() @ w.double().T, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0]
assert torch.allclose(lp.double(), torch.where(t != -100, ref, 0.0), atol=1e-5)
loss, aux = sf.FusedLinearDPOLoss(beta=0.1)(w, h, t, None, h.detach() + 0.1)
loss.backward()
assert torch.isfinite(loss) and h.grad is not None and len(aux) == 7
out = sf.preference_loss(lp.detach(), lp.detach() - 0.1, t != -100, loss_type="sgdpo")
assert torch.isfinite(out.loss)
import importlib.resources as r
assert r.files("sgdpo_fast._csrc").joinpath("cuda/epilogue.cu").is_file()   # for the JIT build
assert r.files("sgdpo_fast.ops.backends").joinpath("auto_table.json").is_file()
assert r.files("sgdpo_fast.data").joinpath("bundled/heldout.jsonl").is_file()
import sgdpo_fast.kernels                                                      # top-level kernels/
print("wheel smoke: op, loss ok")
PYEOF
"$OUT/venv/bin/sgdpo-fast" --help >/dev/null
echo "wheel smoke: sgdpo-fast --help ok"
