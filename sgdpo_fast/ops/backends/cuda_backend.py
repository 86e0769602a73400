"""``cuda`` backend: cuBLAS tile GEMMs plus the CUDA epilogue kernels of csrc/cuda.

The GEMMs go through ``torch.mm`` / ``addmm_`` (cuBLAS, on PyTorch's current
stream); only the epilogues are hand-written, which keeps this backend small.
It reuses the tiled driver of the ``cpu`` backend: fp32 logit tiles, fp32
accumulation of dH and dW across tiles.
"""
from __future__ import annotations

from . import tiled
from .. import native


def _epilogue():
    ep = native.cuda_epilogue()
    if ep is None:
        raise RuntimeError("backend='cuda' needs the CUDA extension: " + native.why_missing())
    return ep


def forward(hidden, weight, bias, targets, ignore_index, tf):
    return tiled.forward(hidden, weight, bias, targets, ignore_index, tf, _epilogue())


def backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
             needs_hidden, needs_weight, needs_bias):
    return tiled.backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
                          needs_hidden, needs_weight, needs_bias, _epilogue())
