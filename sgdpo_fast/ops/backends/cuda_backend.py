"""``cuda`` backend: cuBLAS tile GEMMs plus the CUDA epilogue kernels of csrc/cuda.

Decision: the tile GEMMs go through ``torch.mm`` / ``torch.addmm`` (cuBLAS, on
PyTorch's current stream, so they order correctly with the epilogue launches
that the adapter puts on the same stream).  Only the epilogues are hand-written;
a hand-written GEMM would not beat cuBLAS, and fusing the epilogue into the GEMM
is what the ``triton`` backend does.

The loop is ``tiled.py``'s (the ``cpu`` backend's driver), with one difference:
logit tiles are kept in the *input* dtype (``tile_dtype=hidden.dtype``).  For bf16/fp16 inputs the GEMM writes
a bf16/fp16 tile and the epilogue reads it (fp32 arithmetic, fp32 statistics):
half the tile traffic and no fp32 copy.  Numerically this is what eager bf16
PyTorch does (its logits are bf16 too, and so is the gradient of the logits);
(the ``cpu`` backend rounds the logits to bf16 as well, then widens them).
In backward the gradient tile is written in place in the input dtype and the
``dH``/``dW`` GEMMs return fp32 (``out_dtype=torch.float32``: cuBLAS accumulates
and writes fp32), so accumulation across tiles stays fp32 as the numerics
contract requires.  Where ``torch.mm(..., out_dtype=...)`` is not available the
operands are widened to fp32 first (slower, same result up to rounding).

The drivers take the epilogue as an argument (default: the CUDA one) so the
tests can run them on CPU with a reference epilogue.
"""
from __future__ import annotations

from . import tiled
from .. import native
from ..transform import LogitTransform

TILE_ELEMS = tiled.TILE_ELEMS  # elements of one logit tile (fp32: 16 MiB, bf16: 8 MiB)


def _epilogue():
    ep = native.cuda_epilogue()
    if ep is None:
        raise RuntimeError("backend='cuda' needs the CUDA extension: " + native.why_missing())
    return ep


def forward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, epilogue=None,
            tile_elems: int = TILE_ELEMS):
    """hidden [N, D], weight [V, D] contiguous, fp32/bf16/fp16; bias [V] or None; targets [N]
    int64.  Returns ``(logp [N] fp32, lse [N] fp32)``, logp 0 at ignored positions."""
    return tiled.forward(hidden, weight, bias, targets, ignore_index, tf,
                         _epilogue() if epilogue is None else epilogue, tile_elems,
                         tile_dtype=hidden.dtype)


def backward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, lse, grad,
             needs_hidden: bool, needs_weight: bool, needs_bias: bool, epilogue=None,
             tile_elems: int = TILE_ELEMS):
    """grad [N] fp32 (zero at ignored positions).  Returns ``(dH, dW, db)`` in the input
    dtype, ``None`` where not needed; accumulated in fp32 across tiles."""
    return tiled.backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
                          needs_hidden, needs_weight, needs_bias,
                          _epilogue() if epilogue is None else epilogue, tile_elems,
                          tile_dtype=hidden.dtype)
