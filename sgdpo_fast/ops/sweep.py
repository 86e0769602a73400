"""The one tiled driver of the log-prob op, and the algebra of its per-token statistics.

Forward: ``forward_stats`` sweeps a vocabulary range one ``[block_n, block_v]`` logit tile
at a time (a library GEMM: MKL on CPU, cuBLAS on CUDA, through ``torch.mm``, always into an
fp32 tile) and folds each tile into per-token partial statistics (``TokenStats``) with an
*epilogue* (``epilogue_torch`` defines the contract; ``csrc/`` holds the C++ and CUDA ones).
The Triton kernels produce the same ``TokenStats`` (one partial per vocabulary split).

Statistics of one vocabulary range, per token:

``m``    running max of the transformed logits ``z`` (``-inf`` while none is finite)
``s``    ``sum exp(z - m)``
``tgt``  ``z`` at the target (0 when the target is not in the range)
``extra`` (only when metrics are asked for) ``[4, n]``: ``sz = sum exp(z - m) * z``,
         ``s2 = sum exp(2 (z - m))``, ``zsum = sum z`` and ``arg``, the first id attaining
         ``m`` (fp64, exact for any vocabulary size)

``merge_stats`` combines partials of disjoint ranges (vocabulary splits of one launch, or
the shards of a vocab-parallel group through all-reduces: the reductions are arguments),
and ``finalize`` turns them into ``lse`` and the metrics.  This is the only online
log-sum-exp of the package outside the Triton kernels.

Backward: ``backward`` recomputes each tile, turns it into ``dL/dx`` in place (epilogue
``grad_tile_``) and accumulates ``dH`` and ``dW`` in fp32.  Extra memory: one tile plus
the fp32 accumulators (none beyond the gradients themselves for fp32 inputs).
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch

from .plan import TileConfig
from .transform import LogitTransform

EXTRA = ("sz", "s2", "zsum", "arg")


class TokenStats(NamedTuple):
    m: torch.Tensor
    s: torch.Tensor
    tgt: torch.Tensor
    extra: Optional[torch.Tensor] = None   # [len(EXTRA), n]: sz, s2, zsum (fp32), arg (as float64)


def empty_stats(n: int, device, metrics: bool) -> TokenStats:
    f32 = dict(dtype=torch.float32, device=device)
    extra = None
    if metrics:
        extra = torch.zeros((len(EXTRA), n), dtype=torch.float64, device=device)
        extra[EXTRA.index("arg")] = -1.0
    return TokenStats(torch.full((n,), -math.inf, **f32), torch.zeros(n, **f32),
                      torch.zeros(n, **f32), extra)


# ----------------------------------------------------------------------------- merging

def _local_max(x):
    return x.amax(dim=0)


def _local_sum(x):
    return x.sum(dim=0)


def _local_min(x):
    return x.amin(dim=0)


def merge_stats(parts: TokenStats, reduce_max: Callable = _local_max,
                reduce_sum: Callable = _local_sum, reduce_min: Callable = _local_min) -> TokenStats:
    """Combine the statistics of disjoint vocabulary ranges.

    With the default reductions ``parts`` holds one range per row (``[S, n]`` fields) and
    the result is ``[n]``.  Vocab-parallel passes all-reduces instead (``[n]`` fields, one
    range per rank).  A range whose logits are all ``-inf`` (``m = -inf, s = 0``) adds
    nothing; its max never enters an exponent (``-inf - -inf`` is NaN).  NaN propagates.
    """
    M = reduce_max(parts.m)
    M_safe = torch.where(M == -math.inf, torch.zeros_like(M), M)
    scale = torch.where(parts.m == -math.inf, torch.zeros_like(parts.m),
                        torch.exp(parts.m - M_safe))
    extra = parts.extra
    # one reduction for all the sums: fields stacked on a last axis
    if extra is None:
        packed = reduce_sum(torch.stack([parts.s * scale, parts.tgt], dim=-1))
        return TokenStats(M, packed[..., 0], packed[..., 1], None)
    sz, s2, zsum, arg = extra.unbind(0)
    scale64 = scale.double()
    packed = reduce_sum(torch.stack([parts.s.double() * scale64, parts.tgt.double(), sz * scale64,
                                     s2 * scale64 * scale64, zsum], dim=-1))
    # the first argmax overall: the smallest id among the ranges that attain the max
    big = torch.full_like(arg, float(2**53))
    arg = reduce_min(torch.where((parts.m == M) & (arg >= 0), arg, big))
    arg = torch.where(arg == 2**53, torch.full_like(arg, -1.0), arg)
    return TokenStats(M, packed[..., 0].float(), packed[..., 1].float(),
                      torch.stack([packed[..., 2], packed[..., 3], packed[..., 4], arg]))


def finalize(stats: TokenStats):
    """``lse [n]`` fp32 (``-inf`` for a row with no finite logit; NaN propagates)."""
    return stats.m + torch.log(stats.s)


def metric_values(stats: TokenStats, lse: torch.Tensor, targets: torch.Tensor, V: int,
                  which) -> torch.Tensor:
    """``[len(which), n]`` fp32 values of the metrics ``which`` (names of ``plan.METRICS``):
    entropy and ``log sum p^2`` of ``softmax(z)``, the mean of ``z`` over the vocabulary,
    and ``is_top1`` (1.0 when the target is the first argmax, as ``torch.argmax``)."""
    sz, s2, zsum, arg = stats.extra.unbind(0)
    s = stats.s.double()
    out = []
    for name in which:
        if name == "entropy":
            v = lse.double() - sz / s
        elif name == "log_sum_sq_probs":
            v = torch.log(s2) - 2.0 * torch.log(s)
        elif name == "mean_logits":
            v = zsum / V
        else:  # is_top1
            v = (arg == targets.double()).double()
        out.append(v.float())
    return torch.stack(out) if out else lse.new_zeros((0, lse.shape[0]))


# ----------------------------------------------------------------------------- GEMMs

@functools.lru_cache(maxsize=None)
def _mm_out_dtype_works(device_type: str) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=float32)`` exists for half inputs on this device
    (cuBLAS does; the CPU build of torch 2.13 does not)."""
    a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device_type)
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        return True
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def logit_tile_(h, w, b, out) -> torch.Tensor:
    """``out [n, vt] fp32 <- h @ w.T (+ b)`` with fp32 accumulation and an fp32 result for
    every input dtype (bf16/fp16 logits are never rounded to their own dtype)."""
    half = h.dtype != torch.float32
    if not half:
        if b is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(b, h, w.t(), out=out)
        return out
    if _mm_out_dtype_works(h.device.type):
        torch.mm(h, w.t(), out_dtype=torch.float32, out=out)
    else:
        torch.mm(h.float(), w.float().t(), out=out)
    if b is not None:
        out.add_(b)
    return out


def addmm_f32_(acc, a, b) -> None:
    """``acc += a @ b``: acc fp32; a, b fp32, or one half dtype (fp32 accumulation, no
    temporary where the device supports ``out_dtype``)."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.dtype == b.dtype and _mm_out_dtype_works(a.device.type):
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


# ----------------------------------------------------------------------------- the driver

def forward_stats(hidden, weight, bias, targets, tf: LogitTransform, epilogue,
                  tiles: TileConfig, metrics: bool = False) -> TokenStats:
    """Statistics of ``softmax(tf(hidden @ weight.T + bias))`` over this weight's rows.

    hidden [n, D], weight [V, D], bias [V] | None (one float dtype, contiguous);
    targets [n] int64, an id in ``[0, V)`` or anything else for "no target in this range".
    ``epilogue`` folds the tiles (``fold_tile_``); with ``metrics`` the torch epilogue's
    ``fold_tile_metrics_`` folds them instead, extras included, in the same sweep.
    """
    from .backends import epilogue_torch

    n, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    st = empty_stats(n, dev, metrics)
    if n == 0 or V == 0:
        return st
    block_n, block_v = tiles.shape(n, V)
    buf = torch.empty(block_n * block_v, dtype=torch.float32, device=dev)
    for n0 in range(0, n, block_n):
        n1 = min(n, n0 + block_n)
        h, t = hidden[n0:n1], targets[n0:n1]
        rows = slice(n0, n1)
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            logit_tile_(h, weight[v0:v1], None if bias is None else bias[v0:v1], x)
            if metrics:
                epilogue_torch.fold_tile_metrics_(x, v0, t, st.m[rows], st.s[rows],
                                                  st.tgt[rows], st.extra[:, rows], tf)
            else:
                epilogue.fold_tile_(x, v0, t, st.m[rows], st.s[rows], st.tgt[rows], tf)
    return st


def backward(hidden, weight, bias, targets, lse, grad, tf: LogitTransform, epilogue,
             tiles: TileConfig, needs_hidden: bool, needs_weight: bool, needs_bias: bool):
    """Gradients of ``sum_i grad_i * logp_i``: ``(dH [n, D], dW [V, D], db [V])`` in the input
    dtype (``None`` where not needed), accumulated in fp32.  targets [n] as in
    ``forward_stats``; lse [n] fp32 of the whole vocabulary; grad [n] fp32."""
    n, V = hidden.shape[0], weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    dH = torch.zeros(hidden.shape, **f32) if needs_hidden else None
    dW = torch.zeros(weight.shape, **f32) if needs_weight else None
    db = torch.zeros(V, **f32) if needs_bias else None
    if n and V and (needs_hidden or needs_weight or needs_bias):
        block_n, block_v = tiles.shape(n, V)
        buf = torch.empty(block_n * block_v, **f32)
        # half inputs: the gradient tile goes to the GEMMs in the input dtype (tensor cores),
        # through one preallocated buffer
        half = dt != torch.float32 and _mm_out_dtype_works(dev.type)
        hbuf = torch.empty(block_n * block_v, dtype=dt, device=dev) if half else None
        for n0 in range(0, n, block_n):
            n1 = min(n, n0 + block_n)
            g = grad[n0:n1]
            if not bool((g != 0).any()):
                continue  # zero upstream gradient for the whole block (NaN is != 0: kept)
            h, t, l = hidden[n0:n1], targets[n0:n1], lse[n0:n1]
            h_mm = h if half or dt == torch.float32 else h.float()
            for v0 in range(0, V, block_v):
                v1 = min(V, v0 + block_v)
                w = weight[v0:v1]
                x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
                logit_tile_(h, w, None if bias is None else bias[v0:v1], x)
                epilogue.grad_tile_(x, v0, t, l, g, tf)
                dx = hbuf[: x.numel()].view_as(x).copy_(x) if half else x
                if needs_hidden:
                    addmm_f32_(dH[n0:n1], dx, w)
                if needs_weight:
                    addmm_f32_(dW[v0:v1], dx.t(), h_mm)
                if needs_bias:
                    db[v0:v1] += x.sum(dim=0)
    cast = lambda a: None if a is None else (a if dt == torch.float32 else a.to(dt))  # noqa: E731
    return cast(dH), cast(dW), cast(db)
