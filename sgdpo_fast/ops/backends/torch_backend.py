"""``torch`` backend: pure PyTorch, chunked over tokens, runs on any device.

It uses only stock torch primitives (``logsumexp``, ``softmax``) on
``[chunk, V]`` slabs, so it is an implementation independent of the tiled
epilogues and serves as the universal fallback.  Memory is bounded by
``chunk * V`` floats (``TOKEN_CHUNK_ELEMS``), never by ``N * V``.
"""
from __future__ import annotations

import torch

from ..transform import LogitTransform

TOKEN_CHUNK_ELEMS = 1 << 24  # fp32 elements of one [chunk, V] slab (64 MiB)


def _chunk(N: int, V: int) -> int:
    return max(1, min(N, TOKEN_CHUNK_ELEMS // V))


def _logits(h, weight, bias):
    x = h @ weight.t()
    if bias is not None:
        x = x + bias
    return x.float()


def forward(hidden, weight, bias, targets, ignore_index: int, tf: LogitTransform):
    """hidden [N, D], weight [V, D], bias [V] | None (all one float dtype), targets [N] int64.

    Returns ``(logp [N] fp32, lse [N] fp32)``; ``logp`` is 0 at ignored positions.
    """
    N, V = hidden.shape[0], weight.shape[0]
    logp = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    lse = torch.zeros(N, dtype=torch.float32, device=hidden.device)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    step = _chunk(N, V)
    for s in range(0, N, step):
        z = tf.apply(_logits(hidden[s:s + step], weight, bias))
        l = torch.logsumexp(z, dim=1)
        t = z.gather(1, safe[s:s + step, None]).squeeze(1)
        lse[s:s + step] = l
        logp[s:s + step] = torch.where(valid[s:s + step], t - l, torch.zeros_like(l))
    return logp, lse


def backward(hidden, weight, bias, targets, ignore_index: int, tf: LogitTransform,
             lse, grad, needs_hidden: bool, needs_weight: bool, needs_bias: bool):
    """grad [N] fp32, zero at ignored positions.  Returns ``(dH, dW, db)`` in the input
    dtype (``None`` where not needed); accumulation across chunks is fp32."""
    N, V = hidden.shape[0], weight.shape[0]
    dt = hidden.dtype
    dH = torch.empty_like(hidden) if needs_hidden else None
    dW = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=weight.device) if needs_bias else None
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    step = _chunk(N, V)
    for s in range(0, N, step):
        h = hidden[s:s + step]
        x = _logits(h, weight, bias)
        z, dzdx = tf.apply_with_derivative(x)
        g = grad[s:s + step]
        dz = torch.softmax(z, dim=1) * (-g[:, None])
        dz.scatter_add_(1, safe[s:s + step, None], torch.where(valid[s:s + step], g, 0.0)[:, None])
        dx = dz * dzdx
        if needs_hidden:
            dH[s:s + step] = (dx.to(dt) @ weight).to(dt) if dt != torch.float32 else dx @ weight
        if needs_weight:
            dW += (dx.t().to(dt) @ h).float()
        if needs_bias:
            db += dx.sum(dim=0)
    return dH, (dW.to(dt) if dW is not None else None), (db.to(dt) if db is not None else None)
