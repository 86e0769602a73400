"""Tiled driver shared by the ``cpu`` and ``cuda`` backends.

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
    """out[n, vt] fp32 <- h @ w.T (+ b); GEMM in the input dtype, fp32 accumulate."""
    if h.dtype == torch.float32:
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


def forward(hidden, weight, bias, targets, ignore_index, tf: LogitTransform, epilogue,
            tile_elems: int = TILE_ELEMS):
    """hidden [N, D], weight [V, D], bias [V] | None, targets [N] int64.
    Returns ``(logp [N] fp32, lse [N] fp32)``, logp 0 at ignored positions."""
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    block_n, block_v = tile_shape(N, V, tile_elems)
    logp = torch.zeros(N, dtype=torch.float32, device=dev)
    lse = torch.zeros(N, dtype=torch.float32, device=dev)
    buf = torch.empty(block_n * block_v, dtype=torch.float32, device=dev)
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
             tile_elems: int = TILE_ELEMS):
    """grad [N] fp32 (zero at ignored positions).  Returns ``(dH, dW, db)`` in the
    input dtype, ``None`` where not needed; accumulation in fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    block_n, block_v = tile_shape(N, V, tile_elems)
    f32 = dict(dtype=torch.float32, device=dev)
    dH = torch.zeros(hidden.shape, **f32) if needs_hidden else None
    dW = torch.zeros(weight.shape, **f32) if needs_weight else None
    db = torch.zeros(V, **f32) if needs_bias else None
    buf = torch.empty(block_n * block_v, **f32)
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        g = grad[n0:n1]
        if not bool((g != 0).any()):
            continue  # every token of the block is ignored or has zero upstream gradient
        h, t, l = hidden[n0:n1], targets[n0:n1], lse[n0:n1]
        h32 = h if dt == torch.float32 else h.float()
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            w = weight[v0:v1]
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            _tile(h, w, None if bias is None else bias[v0:v1], x)
            epilogue.grad_tile_(x, v0, t, l, g, tf)
            if needs_hidden:
                dH[n0:n1].addmm_(x, w if dt == torch.float32 else w.float())
            if needs_weight:
                dW[v0:v1].addmm_(x.t(), h32)
            if needs_bias:
                db[v0:v1] += x.sum(dim=0)
    cast = lambda a: None if a is None else (a if dt == torch.float32 else a.to(dt))
    return cast(dH), cast(dW), cast(db)
