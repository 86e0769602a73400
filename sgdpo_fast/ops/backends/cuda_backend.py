"""``cuda`` backend: cuBLAS tile GEMMs plus the CUDA epilogue kernels of csrc/cuda.

Decision: the tile GEMMs go through ``torch.mm`` / ``torch.addmm`` (cuBLAS, on
PyTorch's current stream, so they order correctly with the epilogue launches
that the adapter puts on the same stream).  Only the epilogues are hand-written;
a hand-written GEMM would not beat cuBLAS, and fusing the epilogue into the GEMM
is what the ``triton`` backend does.

Same loop as ``tiled.py`` (the ``cpu`` backend's driver), with one difference:
logit tiles are kept in the *input* dtype.  For bf16/fp16 inputs the GEMM writes
a bf16/fp16 tile and the epilogue reads it (fp32 arithmetic, fp32 statistics):
half the tile traffic and no fp32 copy.  Numerically this is what eager bf16
PyTorch does (its logits are bf16 too, and so is the gradient of the logits);
``tiled._tile`` would round the logits to bf16 as well and only then widen them.
In backward the gradient tile is written in place in the input dtype and the
``dH``/``dW`` GEMMs return fp32 (``out_dtype=torch.float32``: cuBLAS accumulates
and writes fp32), so accumulation across tiles stays fp32 as the numerics
contract requires.  Where ``torch.mm(..., out_dtype=...)`` is not available the
operands are widened to fp32 first (slower, same result up to rounding).

The drivers take the epilogue as an argument (default: the CUDA one) so the
tests can run them on CPU with a reference epilogue.
"""
from __future__ import annotations

import torch

from . import tiled
from .. import native
from ..transform import LogitTransform

TILE_ELEMS = tiled.TILE_ELEMS  # elements of one logit tile (fp32: 16 MiB, bf16: 8 MiB)
_MM_OUT_DTYPE: dict = {}       # device type -> whether torch.mm(..., out_dtype=) works there


def _epilogue():
    ep = native.cuda_epilogue()
    if ep is None:
        raise RuntimeError("backend='cuda' needs the CUDA extension: " + native.why_missing())
    return ep


def _addmm_f32_(acc, a, b):
    """``acc += a @ b``: acc fp32, a and b one dtype (fp32/bf16/fp16), fp32 accumulation."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    else:
        acc += _mm_f32(a, b)


def _mm_f32(a, b):
    """``a @ b`` as fp32 for bf16/fp16 a and b, accumulated in fp32."""
    dev = a.device.type
    if _MM_OUT_DTYPE.get(dev, True):
        try:
            out = torch.mm(a, b, out_dtype=torch.float32)
            _MM_OUT_DTYPE[dev] = True
            return out
        except (RuntimeError, TypeError, NotImplementedError):
            _MM_OUT_DTYPE[dev] = False  # e.g. CPU, or an older torch: widen instead
    return a.float() @ b.float()


def _tile(h, w, b, out):
    """out[n, vt] (input dtype) <- h @ w.T (+ b), one cuBLAS call."""
    if b is None:
        return torch.mm(h, w.t(), out=out)
    return torch.addmm(b, h, w.t(), out=out)


def forward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, epilogue=None,
            tile_elems: int = TILE_ELEMS):
    """hidden [N, D], weight [V, D] contiguous, fp32/bf16/fp16; bias [V] or None; targets [N]
    int64.  Returns ``(logp [N] fp32, lse [N] fp32)``, logp 0 at ignored positions."""
    ep = _epilogue() if epilogue is None else epilogue
    N, V = hidden.shape[0], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    block_n, block_v = tiled.tile_shape(N, V, tile_elems)
    f32 = dict(dtype=torch.float32, device=dev)
    logp, lse = torch.zeros(N, **f32), torch.zeros(N, **f32)
    buf = torch.empty(block_n * block_v, dtype=dt, device=dev)
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        h, t = hidden[n0:n1], targets[n0:n1]
        m = torch.full((n1 - n0,), float("-inf"), **f32)
        s, tgt = torch.zeros(n1 - n0, **f32), torch.zeros(n1 - n0, **f32)
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], x)
            ep.fold_tile_(x, v0, t, m, s, tgt, tf)
        l = m + torch.log(s)
        lse[n0:n1] = l
        logp[n0:n1] = torch.where(t != ignore_index, tgt - l, torch.zeros_like(l))
    return logp, lse


def backward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, lse, grad,
             needs_hidden: bool, needs_weight: bool, needs_bias: bool, epilogue=None,
             tile_elems: int = TILE_ELEMS):
    """grad [N] fp32 (zero at ignored positions).  Returns ``(dH, dW, db)`` in the input
    dtype, ``None`` where not needed; accumulated in fp32 across tiles."""
    ep = _epilogue() if epilogue is None else epilogue
    N, V = hidden.shape[0], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    block_n, block_v = tiled.tile_shape(N, V, tile_elems)
    f32 = dict(dtype=torch.float32, device=dev)
    dH = torch.zeros(hidden.shape, **f32) if needs_hidden else None
    dW = torch.zeros(weight.shape, **f32) if needs_weight else None
    db = torch.zeros(V, **f32) if needs_bias else None
    buf = torch.empty(block_n * block_v, dtype=dt, device=dev)
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        g = grad[n0:n1]
        if not bool((g != 0).any()):
            continue  # every token of the block is ignored or has zero upstream gradient
        h, t, l = hidden[n0:n1], targets[n0:n1], lse[n0:n1]
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            w = weight[v0:v1]
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile(h, w, None if bias is None else bias[v0:v1], x)
            ep.grad_tile_(x, v0, t, l, g, tf)  # x <- dL/dlogits, in place, input dtype
            if needs_hidden:
                _addmm_f32_(dH[n0:n1], x, w)
            if needs_weight:
                _addmm_f32_(dW[v0:v1], x.t(), h)
            if needs_bias:
                db[v0:v1] += x.sum(dim=0, dtype=torch.float32)
    cast = lambda a: None if a is None else (a if dt == torch.float32 else a.to(dt))
    return cast(dH), cast(dW), cast(db)
