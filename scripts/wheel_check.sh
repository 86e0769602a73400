#!/usr/bin/env bash
# Packaging check (CI): `python -m build` makes an sdist and a wheel from it (build isolation:
# setuptools + pybind11 only); the wheel goes into a clean venv and must run the op, the loss
# and the CLI's --help from there, outside the source tree.
# torch (and numpy, tqdm) come from the CI venv through a .pth file instead of a second
# ~50 s torch install: the wheel's own files are what is checked.  Portable flags
# (SGDPO_FAST_PORTABLE=1: no -march=native), as for a wheel meant for other machines.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
SGDPO_FAST_PORTABLE=1 "$PY" -m build --sdist --wheel --outdir "$OUT/dist" . >"$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
ls "$OUT"/dist/*.tar.gz "$OUT"/dist/*.whl
"$PY" -m venv "$OUT/venv"
vsite=$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# the folders torch, numpy and tqdm of the CI venv are imported from
"$PY" -c 'import os, numpy, torch, tqdm
print("\n".join(sorted({os.path.dirname(os.path.dirname(m.__file__)) for m in (torch, numpy, tqdm)})))' \
  > "$vsite/_ci_torch.pth"
"$OUT/venv/bin/python" -m pip install -q --no-deps "$OUT"/dist/*.whl
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
print("wheel smoke: op, loss ok")
PYEOF
"$OUT/venv/bin/sgdpo-fast" --help >/dev/null
echo "wheel smoke: sgdpo-fast --help ok"
