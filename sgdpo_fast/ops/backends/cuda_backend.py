"""``cuda`` backend: the tiled driver (``ops/sweep.py``: cuBLAS tile GEMMs through
``torch.mm``, on PyTorch's current stream) with the CUDA epilogue kernels of csrc/cuda.

Only the epilogues are hand-written: a hand-written GEMM would not beat cuBLAS, and
fusing the epilogue into the GEMM is what the ``triton`` backend does.  Logit tiles are
fp32 for every input dtype (cuBLAS writes fp32 from bf16/fp16 operands: ``out_dtype``);
in backward the gradient tile goes back to the GEMMs in the input dtype (tensor cores)
and ``dH``/``dW`` accumulate in fp32, as the numerics contract requires.
"""
from __future__ import annotations

from .. import native, sweep


def _epilogue():
    ep = native.cuda_epilogue()
    if ep is None:
        raise RuntimeError("backend='cuda' needs the CUDA extension: " + native.why_missing())
    return ep


def forward(hidden, weight, bias, targets, plan, epilogue=None):
    """``epilogue`` (default: the CUDA one) lets the tests run the driver with another."""
    return sweep.forward_stats(hidden, weight, bias, targets, plan.transform,
                               epilogue or _epilogue(), plan.tiles, metrics=bool(plan.metrics))


def backward(hidden, weight, bias, targets, lse, grad, plan, needs_hidden, needs_weight,
             needs_bias, epilogue=None):
    return sweep.backward_tiled(hidden, weight, bias, targets, lse, grad, plan.transform,
                                epilogue or _epilogue(), plan.tiles, needs_hidden, needs_weight,
                                needs_bias)
