"""Backends of the log-prob op.

A backend is a module with two functions; all tensors on one device, the plan resolved
(``sgdpo_fast.ops.plan.LogprobPlan``):

``forward(hidden, weight, bias, targets, plan) -> sweep.TokenStats``
    hidden [n, D] and weight [V, D] contiguous, one dtype (fp32/fp16/bf16); bias [V] same
    dtype or None; targets [n] int64, an id in ``[0, V)`` or any other value for "no target
    in this vocabulary range" (the op maps ignored rows away and, vocab-parallel, targets
    another rank owns to -1).  Returns the per-token statistics of the range; with
    ``plan.metrics`` also their extras (``sweep.EXTRA``).

``backward(hidden, weight, bias, targets, lse, grad, plan, needs_hidden, needs_weight,
           needs_bias) -> (dH, dW, db)``
    lse [n] fp32 (of the whole vocabulary), grad [n] fp32.  Gradients in the input dtype,
    ``None`` where not needed, accumulated in fp32.

| backend | device | how |
|---|---|---|
| ``torch``  | any  | ``sweep.py`` driver + the torch epilogue |
| ``cpu``    | CPU  | ``sweep.py`` driver + the C++ epilogue (``sgdpo_fast._C``) |
| ``cuda``   | CUDA | ``sweep.py`` driver + the CUDA epilogue (``sgdpo_fast._C_cuda``) |
| ``triton`` | CUDA (CPU under ``TRITON_INTERPRET=1``) | fused kernels of ``sgdpo_fast.kernels`` |

``auto`` on CUDA stays ``auto`` in the plan: ``auto_backend`` picks one of these per call from
the shipped table of measured (else modeled) results, by device, dtype and shape.
"""
from __future__ import annotations

import importlib
import os

import torch

from ..plan import BACKENDS



def triton_usable(device_type: str) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors only under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device_type == "cuda":
        return True
    return device_type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.assume_constant_result
def resolve(name: str, device_type: str) -> str:
    """Map ``backend=`` to a concrete backend for a device type (``"cpu"``, ``"cuda"``, ...).

    ``auto``: on CUDA ``auto`` itself (``auto_backend`` chooses per call, by shape, from the
    table of measured results shipped with the package); on CPU the ``cpu`` backend when the
    C++ extension is built, else ``torch``.  A constant for ``torch.compile`` (it depends on
    the machine, not on tensor values)."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    from .. import native
    if name == "auto":
        if device_type == "cuda":
            return "auto"
        if device_type == "cpu":
            return "cpu" if native.cpu_epilogue() is not None else "torch"
        return "torch"
    if name == "cpu":
        if device_type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device_type}")
        if native.cpu_epilogue() is None:
            raise ValueError("backend='cpu' needs the C++ extension sgdpo_fast._C: "
                             + native.why_missing())
    if name == "cuda" and device_type != "cuda":
        raise ValueError(f"backend='cuda' needs CUDA tensors, got device {device_type}")
    if name == "triton" and not triton_usable(device_type):
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU) "
                         "and the triton package")
    return name


def get(name: str):
    """The backend module ``name`` (a resolved name, see ``resolve``; ``"auto"`` is the
    per-call dispatcher of CUDA devices)."""
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    return importlib.import_module(f"sgdpo_fast.ops.backends.{name}_backend")
