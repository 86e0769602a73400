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

Backward: ``backward`` recomputes each tile once, turns it into ``dL/dx`` (a "producer":
``EpilogueTiles`` = library GEMM + the epilogue's ``grad_tile_``, or the Triton gradient-tile
kernel) and feeds it to two library GEMMs for ``dH`` and ``dW``, accumulated in fp32 (see the
comment above ``backward`` for where the fp32 sums live).  The Triton backend's backward runs
through this driver too, with its fused kernel as the producer.
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
    extra: Optional[torch.Tensor] = None   # [len(EXTRA), n] float64: sz, s2, zsum, arg


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


def mm_into_(out, a, b) -> None:
    """``out = a @ b`` with fp32 accumulation, rounded once into ``out``'s dtype: one library
    GEMM where the device multiplies ``out``'s dtype natively with fp32 accumulation (fp32
    anywhere; bf16/fp16 on CUDA), else an fp32 GEMM and a copy (CPU half inputs)."""
    native = a.dtype == b.dtype == out.dtype and (
        out.dtype == torch.float32 or _mm_out_dtype_works(out.device.type))
    if native:
        torch.mm(a, b, out=out)
    else:
        out.copy_(torch.mm(a.float(), b.float()))


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


# ----------------------------------------------------------------------------- backward
#
# One recompute of each logit tile feeds both gradients: the tile's ``dL/dx`` (a "slab" of
# rows x a vocabulary chunk) goes to two library GEMMs, ``dH[rows] += dX @ W[chunk]`` and
# ``dW[chunk] += dX^T @ H[rows]`` (4 GEMM-equivalents for forward + backward).  The loop runs
# over vocabulary chunks outermost, so each chunk's dW is complete after its row blocks (one
# GEMM with K = N when one row block covers all tokens) and only dH needs an fp32 sum across
# chunks.  For bf16/fp16 that sum lives where the gradients will be written anyway
# (``_dh_accumulators``): half of it in dH's own buffer (compacted in place at the end), the
# rest in ``scratch_bytes`` and, beyond that, in the not-yet-written tail of dW's buffer, whose
# vocabulary rows are then recomputed once more after dH is final (``tail`` phases: extra
# work ``(V - tail) / V`` of one GEMM-equivalent).  Without dW (a frozen head) the loop runs
# over row chunks outermost instead and dH chunks need no tail.

ALIGN_BYTES = 256   # accumulator views start on this alignment (cuBLAS's fast kernels)


class _Acc(NamedTuple):
    """fp32 accumulator of dH rows ``[r0, r1)``; ``in_place``: it lives in dH's own buffer."""
    r0: int
    r1: int
    view: torch.Tensor
    in_place: bool


def _f32_view(t: torch.Tensor, byte_off: int, rows: int, D: int) -> torch.Tensor:
    """fp32 ``[rows, D]`` view of the storage of the contiguous half tensor ``t``, from byte
    ``byte_off`` (a multiple of ``ALIGN_BYTES``)."""
    es = t.element_size()
    start = byte_off // es
    return t.view(-1)[start: start + rows * D * 4 // es].view(torch.float32).view(rows, D)


def _dh_accumulators(dH, start: int, D: int, scratch, dW=None, cover_all=False):
    """fp32 accumulators for the half-precision dH rows from ``start`` on: ``(accs, stop,
    tail)``; the accumulators cover rows ``[start, stop)``.

    1. dH's own buffer from row ``start`` on (as fp32 it holds half as many rows),
    2. ``scratch`` (an fp32 buffer, or None),
    3. with ``dW``: the end of dW's buffer; ``tail`` is the first vocabulary row whose dW
       shares those bytes (``V`` when unused),
    4. with ``cover_all``: a fresh buffer for whatever is left (beyond the memory budget: only
       when dW's buffer is smaller than the rest of the sum)."""
    n, es = dH.shape[0], dH.element_size()
    accs, r = [], start
    off = -(-start * D * es // ALIGN_BYTES) * ALIGN_BYTES
    a = min(n - r, max(0, (n * D * es - off) // (4 * D)))
    if a:
        accs.append(_Acc(r, r + a, _f32_view(dH, off, a, D), True))
        r += a
    if r < n and scratch is not None:
        b = min(n - r, scratch.numel() // D)
        if b:
            accs.append(_Acc(r, r + b, scratch[: b * D].view(b, D), False))
            r += b
    tail = None if dW is None else dW.shape[0]
    if r < n and dW is not None:
        V, wes = dW.shape[0], dW.element_size()
        off = (V * D * wes - (n - r) * D * 4) // ALIGN_BYTES * ALIGN_BYTES
        if off >= 0:
            accs.append(_Acc(r, n, _f32_view(dW, off, n - r, D), False))
            tail, r = off // (wes * D), n
    if r < n and cover_all:
        accs.append(_Acc(r, n, torch.empty((n - r, D), dtype=torch.float32, device=dH.device),
                         False))
        r = n
    for acc in accs:
        acc.view.zero_()
    return accs, r, tail


def _add_dh(accs, n0: int, n1: int, dx, w) -> None:
    """``dH[n0:n1] += dx @ w`` into the accumulators covering those rows."""
    for acc in accs:
        lo, hi = max(n0, acc.r0), min(n1, acc.r1)
        if lo < hi:
            addmm_f32_(acc.view[lo - acc.r0: hi - acc.r0], dx[lo - n0: hi - n0], w)


def _finish_dh(dH, accs) -> None:
    """Round the fp32 sums into dH.  The accumulator inside dH's own buffer is compacted in
    place first: fp32 row j sits at bytes ``off + 4Dj``, its half row at ``base + 2Dj`` with
    ``off >= base``, so converting rows ``[r, 2r)`` reads bytes no earlier conversion wrote and
    writes only over fp32 rows already converted (row 0, which overlaps itself, goes through a
    one-row copy).  Then the other accumulators are copied into the rows that freed up."""
    for acc in accs:
        if acc.in_place:
            dst, src = dH[acc.r0: acc.r1], acc.view
            dst[:1].copy_(src[:1].clone())
            r = 1
            while r < dst.shape[0]:
                r1 = min(dst.shape[0], 2 * r)
                dst[r:r1].copy_(src[r:r1])
                r = r1
    for acc in accs:
        if not acc.in_place:
            dH[acc.r0: acc.r1].copy_(acc.view)


class EpilogueTiles:
    """Gradient tiles of the ``torch``/``cpu``/``cuda`` backends: a library GEMM into an fp32
    logit tile, the epilogue's ``grad_tile_`` in place, the column sums into ``db``, and, for
    bf16/fp16 where the device's GEMM takes ``out_dtype`` (CUDA), one copy into a half buffer
    for the tensor-core GEMMs.  Buffers for tiles of up to ``block_n x block_v`` are made once,
    here; a tile allocates nothing (where the GEMMs take the operands natively: fp32, or half
    on CUDA; CPU half inputs go through fp32 copies)."""

    def __init__(self, epilogue, tf: LogitTransform, dtype, device, block_n: int, block_v: int,
                 need_db: bool):
        f32 = dict(dtype=torch.float32, device=device)
        self.epilogue, self.tf = epilogue, tf
        self.buf = torch.empty(block_n * block_v, **f32)
        half = dtype != torch.float32 and _mm_out_dtype_works(torch.device(device).type)
        self.hbuf = torch.empty(block_n * block_v, dtype=dtype, device=device) if half else None
        self.colsum = torch.empty(block_v, **f32) if need_db else None

    def __call__(self, h, w, b, t, lse, g, v0: int, db):
        """``dL/dx`` of the tile ``h @ w.T (+ b)`` (rows ``h``, vocabulary ids from ``v0``);
        adds its column sums (fp32) into ``db`` unless None."""
        n, vt = h.shape[0], w.shape[0]
        x = self.buf[: n * vt].view(n, vt)
        logit_tile_(h, w, b, x)
        self.epilogue.grad_tile_(x, v0, t, lse, g, self.tf)
        if db is not None:
            cs = self.colsum[:vt]
            torch.sum(x, dim=0, out=cs)
            db.add_(cs)
        if self.hbuf is None:
            return x
        return self.hbuf[: n * vt].view(n, vt).copy_(x)


def _blocks(lo: int, hi: int, step: int):
    return [(a, min(hi, a + step)) for a in range(lo, hi, step)]


def backward(hidden, weight, bias, targets, lse, grad, producer, block_n: int, block_v: int,
             scratch_bytes: int, needs_hidden: bool, needs_weight: bool, needs_bias: bool):
    """Gradients of ``sum_i grad_i * logp_i``: ``(dH [n, D], dW [V, D], db [V])`` in the input
    dtype (``None`` where not needed), accumulated in fp32.

    hidden [n, D], weight [V, D], bias [V] | None (one dtype, contiguous); targets [n] as in
    ``forward_stats``; lse [n] fp32 of the whole vocabulary; grad [n] fp32.  ``producer(h, w,
    b, t, lse, g, v0, db)`` returns a tile's ``dL/dx`` (``EpilogueTiles``, or the Triton
    kernel of ``kernels/logprob_bwd.py``) for tiles of at most ``block_n x block_v``.
    Extra memory for bf16/fp16 (see the comment above): the producer's buffers, an fp32 dW
    chunk ``[block_v, D]`` when the tokens take several row blocks, and at most
    ``scratch_bytes`` of fp32 dH sums (more only when dW's buffer cannot hold the rest).
    NaN propagates: a non-finite logit or upstream gradient makes its row's dH, and dW and db,
    NaN (as eager autograd does)."""
    n, D = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    f32 = dict(dtype=torch.float32, device=dev)
    half = dt != torch.float32
    needs_bias = needs_bias and bias is not None
    alloc = torch.empty if half else torch.zeros
    dH = alloc(hidden.shape, dtype=dt, device=dev) if needs_hidden else None
    dW = alloc(weight.shape, dtype=dt, device=dev) if needs_weight else None
    db = torch.zeros(V, **f32) if needs_bias else None
    if n == 0 or V == 0:
        dH = None if dH is None else dH.zero_()
        dW = None if dW is None else dW.zero_()
    elif needs_weight:
        _vocab_outer(hidden, weight, bias, targets, lse, grad, producer, dH, dW, db,
                     max(1, min(n, block_n)), max(1, min(V, block_v)), scratch_bytes)
    elif needs_hidden or needs_bias:
        _rows_outer(hidden, weight, bias, targets, lse, grad, producer, dH, db,
                    max(1, min(n, block_n)), max(1, min(V, block_v)), scratch_bytes)
    return dH, dW, (None if db is None else db.to(dt))


def _vocab_outer(hidden, weight, bias, targets, lse, grad, producer, dH, dW, db, block_n,
                 block_v, scratch_bytes):
    n, D = hidden.shape
    V = weight.shape[0]
    half = hidden.dtype != torch.float32
    f32 = dict(dtype=torch.float32, device=hidden.device)
    rows = _blocks(0, n, block_n)
    dw_acc = torch.empty(block_v * D, **f32) if half and len(rows) > 1 else None
    accs, tail = [], V
    if dH is not None:
        if half:
            left = scratch_bytes - (0 if dw_acc is None else 4 * dw_acc.numel())
            scratch_rows = min(n, max(0, left) // (4 * D))
            scratch = torch.empty(scratch_rows * D, **f32) if scratch_rows else None
            accs, _, tail = _dh_accumulators(dH, 0, D, scratch, dW=dW, cover_all=True)
        else:
            accs = [_Acc(0, n, dH, False)]
    # (vocabulary range, dH, dW, db); dH is final after the phase that reaches V with dH
    phases = [(0, tail, True, True, True)]
    if tail < V:
        phases += [(tail, V, True, False, True), (tail, V, False, True, False)]
    for v_lo, v_hi, do_dh, do_dw, do_db in phases:
        do_dh = do_dh and dH is not None
        for v0, v1 in _blocks(v_lo, v_hi, block_v):
            w = weight[v0:v1]
            b = None if bias is None else bias[v0:v1]
            dbv = db[v0:v1] if (db is not None and do_db) else None
            wacc = dw_acc[: (v1 - v0) * D].view(v1 - v0, D).zero_() \
                if (do_dw and dw_acc is not None) else None
            for n0, n1 in rows:
                h = hidden[n0:n1]
                dx = producer(h, w, b, targets[n0:n1], lse[n0:n1], grad[n0:n1], v0, dbv)
                if do_dh:
                    _add_dh(accs, n0, n1, dx, w)
                if do_dw:
                    if not half:
                        addmm_f32_(dW[v0:v1], dx.t(), h)
                    elif wacc is None:
                        mm_into_(dW[v0:v1], dx.t(), h)
                    else:
                        addmm_f32_(wacc, dx.t(), h)
            if wacc is not None:
                dW[v0:v1].copy_(wacc)
        if do_dh and half and v_hi == V:
            _finish_dh(dH, accs)   # before the tail's dW overwrites the bytes it borrowed


def _rows_outer(hidden, weight, bias, targets, lse, grad, producer, dH, db, block_n, block_v,
                scratch_bytes):
    """No dW: row chunks outermost, each swept over the whole vocabulary; a chunk's dH sums
    live in dH's own unwritten rows and the scratch (chunks shrink geometrically)."""
    n, D = hidden.shape
    V = weight.shape[0]
    half = hidden.dtype != torch.float32
    scratch = None
    if dH is not None and half:
        scratch_rows = min(n, max(1, scratch_bytes // (4 * D)))
        scratch = torch.empty(scratch_rows * D, dtype=torch.float32, device=hidden.device)
    s = 0
    while s < n:
        if dH is None:
            accs, e = [], n
        elif half:
            accs, e, _ = _dh_accumulators(dH, s, D, scratch)
        else:
            accs, e = [_Acc(0, n, dH, False)], n
        for v0, v1 in _blocks(0, V, block_v):
            w = weight[v0:v1]
            b = None if bias is None else bias[v0:v1]
            dbv = None if db is None else db[v0:v1]
            for n0, n1 in _blocks(s, e, block_n):
                dx = producer(hidden[n0:n1], w, b, targets[n0:n1], lse[n0:n1], grad[n0:n1],
                              v0, dbv)
                _add_dh(accs, n0, n1, dx, w)
        if dH is not None and half:
            _finish_dh(dH, accs)
        s = e


def backward_tiled(hidden, weight, bias, targets, lse, grad, tf: LogitTransform, epilogue,
                   tiles: TileConfig, needs_hidden: bool, needs_weight: bool, needs_bias: bool):
    """``backward`` with ``EpilogueTiles`` of ``tiles``'s shape (the ``torch``/``cpu``/``cuda``
    backends)."""
    n, V = hidden.shape[0], weight.shape[0]
    block_n, block_v = tiles.shape(max(n, 1), max(V, 1))
    producer = EpilogueTiles(epilogue, tf, hidden.dtype, hidden.device, block_n, block_v,
                             needs_bias and bias is not None)
    return backward(hidden, weight, bias, targets, lse, grad, producer, block_n, block_v,
                    tiles.scratch_bytes, needs_hidden, needs_weight, needs_bias)
