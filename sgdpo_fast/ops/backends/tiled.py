"""Tiled driver shared by the ``cpu`` and ``cuda`` backends (the latter keeps its tiles in
the input dtype: ``tile_dtype``).

Logits are produced one ``[BLOCK_N, BLOCK_V]`` tile at a time by a library GEMM
(MKL on CPU, cuBLAS on CUDA, both through ``torch.mm``) and consumed at once by
an *epilogue* (see ``epilogue_torch`` for the contract; csrc/ holds the native
ones).  Forward keeps an online max / sum-exp per token; backward recomputes
each tile, turns it into its gradient in place and accumulates ``dH`` and
``dW`` in fp32.  Peak extra memory: one tile plus the fp32 accumulators.
"""
from __future__ import annotations

import torch

from ..transform import LogitTransform

TILE_ELEMS = 1 << 22      # fp32 elements of one logit tile (16 MiB)
MAX_BLOCK_N = 2048        # tokens per tile: fewer passes over W when larger
MIN_BLOCK_V = 256


def tile_shape(N: int, V: int, tile_elems: int = TILE_ELEMS):
    block_n = max(1, min(N, MAX_BLOCK_N))
    block_v = max(MIN_BLOCK_V, tile_elems // block_n)
    return block_n, min(V, block_v)


def _tile(h, w, b, out):
    """out[n, vt] <- h @ w.T (+ b), GEMM in the input dtype.  ``out`` fp32 (the ``cpu``
    backend: a bf16/fp16 product is widened) or the input dtype (one library call)."""
    if out.dtype == h.dtype:
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b, h, w.t(), out=out)
    else:
        x = h @ w.t()
        if b is not None:
            x += b
        out.copy_(x)
    return out


_MM_OUT_DTYPE: dict = {}  # device type -> whether torch.mm(..., out_dtype=) works there


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


def _addmm_f32_(acc, a, b):
    """``acc += a @ b``: acc fp32; a, b fp32 (in place) or one half dtype (fp32 product)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype:
        acc += _mm_f32(a, b)
    else:
        acc.addmm_(a.float(), b.float())


def forward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, epilogue,
            tile_elems: int = TILE_ELEMS, tile_dtype=torch.float32):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64; logit tiles in
    ``tile_dtype`` (fp32, or the input dtype where the epilogue reads half precision).
    Returns ``(logp [N] fp32, lse [N] fp32)``, logp 0 at ignored positions."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    block_n, block_v = tile_shape(N, V, tile_elems)
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    buf = torch.empty(block_n * block_v, dtype=tile_dtype, device=dev)
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        h, t = hidden[n0:n1], targets[n0:n1]
        m = torch.full((n1 - n0,), float("-inf"), dtype=torch.float32, device=dev)
        s = torch.zeros(n1 - n0, dtype=torch.float32, device=dev)
        tgt = torch.zeros(n1 - n0, dtype=torch.float32, device=dev)
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], x)
            epilogue.fold_tile_(x, v0, t, m, s, tgt, tf)
        l = m + torch.log(s)
        lse[n0:n1] = l
        logp[n0:n1] = torch.where(t != ignore_index, tgt - l, torch.zeros_like(l))
    return logp, lse


def backward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, lse, grad,
             needs_hidden: bool, needs_weight: bool, needs_bias: bool, epilogue,
             tile_elems: int = TILE_ELEMS, tile_dtype=torch.float32):
    """grad [N] fp32 (zero at ignored positions).  Returns ``(dH, dW, db)`` in the
    input dtype, ``None`` where not needed; accumulation in fp32.  With half-precision
    tiles the gradient tile stays in that dtype and its GEMMs return fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    block_n, block_v = tile_shape(N, V, tile_elems)
    f32 = dict(dtype=torch.float32, device=dev)
    dH = torch.zeros(hidden.shape, **f32) if needs_hidden else None
    dW = torch.zeros(weight.shape, **f32) if needs_weight else None
    db = torch.zeros(V, **f32) if needs_bias else None
    buf = torch.empty(block_n * block_v, dtype=tile_dtype, device=dev)
    half = tile_dtype != torch.float32
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        g = grad[n0:n1]
        if not bool((g != 0).any()):
            continue  # every token of the block is ignored or has zero upstream gradient
        h, t, l = hidden[n0:n1], targets[n0:n1], lse[n0:n1]
        h_acc = h if (half or dt == torch.float32) else h.float()
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            w = weight[v0:v1]
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile(h, w, None if bias is None else bias[v0:v1], x)
            epilogue.grad_tile_(x, v0, t, l, g, tf)
            if needs_hidden:
                _addmm_f32_(dH[n0:n1], x, w)
            if needs_weight:
                _addmm_f32_(dW[v0:v1], x.t(), h_acc)
            if needs_bias:
                db[v0:v1] += x.sum(dim=0, dtype=torch.float32)
    cast = lambda a: None if a is None else (a if dt == torch.float32 else a.to(dt))
    return cast(dH), cast(dW), cast(db)
