"""Backends of the log-prob op.

A backend is a module with two functions (all tensors on one device):

``forward(hidden, weight, bias, targets, ignore_index, tf) -> (logp, lse)``
    hidden [N, D] and weight [V, D] contiguous, one dtype (fp32/fp16/bf16);
    bias [V] same dtype or None; targets [N] int64 (values in [0, V) or
    ignore_index); tf a ``LogitTransform``.  logp [N] fp32 with 0 at ignored
    positions; lse [N] fp32, the logsumexp of the transformed logits.

``backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
           needs_hidden, needs_weight, needs_bias) -> (dH, dW, db)``
    grad [N] fp32, already zero at ignored positions.  Gradients in the input
    dtype, ``None`` where not needed, accumulated in fp32.
"""
from __future__ import annotations

import importlib

import torch

_MODULES = {
    "torch": "sgdpo_fast.ops.backends.torch_backend",
    "cpu": "sgdpo_fast.ops.backends.cpu_backend",
    "triton": "sgdpo_fast.ops.backends.triton_backend",
    "cuda": "sgdpo_fast.ops.backends.cuda_backend",
}
BACKENDS = tuple(_MODULES)


def triton_usable(device: torch.device) -> bool:
    """Triton runs on CUDA devices, and on CPU tensors only under TRITON_INTERPRET=1."""
    import os
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(name: str, device: torch.device, N: int = 0, V: int = 0, D: int = 0) -> str:
    """Map ``backend=`` to a concrete backend name for this device (and shape)."""
    if name not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    if name != "auto":
        if name == "cpu" and device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got device {device}")
        if name == "cuda" and device.type != "cuda":
            raise ValueError(f"backend='cuda' needs CUDA tensors, got device {device}")
        if name == "triton" and not triton_usable(device):
            raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 on CPU) "
                             "and the triton package")
        return name
    if device.type == "cuda":
        # DESIGN.md asks for the faster of triton/cuda per shape from measured results; no GPU
        # run has produced them yet, so triton (fully fused) first, then the cuda extension
        if triton_usable(device):
            return "triton"
        from .. import native
        return "cuda" if native.cuda_epilogue() is not None else "torch"
    if device.type == "cpu":
        from .. import native
        return "cpu" if native.cpu_epilogue() is not None else "torch"
    return "torch"


def get(name: str):
    return importlib.import_module(_MODULES[name])
