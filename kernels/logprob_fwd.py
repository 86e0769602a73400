"""Triton forward of the fused per-token log-prob: online logsumexp over vocabulary tiles.

Grid ``(cdiv(N, BLOCK_N), SPLITS)``: program (i, s) owns token block i and the
s-th contiguous slice of the vocabulary.  It builds logit tiles
``[BLOCK_N, BLOCK_V]`` in registers from ``BLOCK_D`` chunks of hidden and
weight (``tl.dot``, fp32 accumulation), applies bias and the logit transform,
and folds each tile into a running max / sum-exp; the target logit is picked
when it falls in the tile.  With ``METRICS`` it also keeps ``sum p z``, ``sum p^2``,
``sum z`` and the first argmax (``sgdpo_fast.ops.sweep.EXTRA``).  The launcher returns
the per-split partials ``[SPLITS, N]`` as a ``TokenStats``; ``sweep.merge_stats``
combines them.  No ``[N, V]`` buffer exists.
"""
import torch
import triton
import triton.language as tl

from .logit_tile import logit_tile
from .tile_dot import interpreter_upcast
from .logit_transform import transform_logits

BLOCK_N = 64
BLOCK_V = 128
BLOCK_D = 64
NUM_WARPS = 8
NUM_STAGES = 3
TARGET_PROGRAMS = 4 * 132  # enough programs to fill an H100 (132 SMs) a few times


@triton.jit
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, x_ptr, arg_ptr,
    N, V, D, v_per_split,
    stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    METRICS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s.to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)     # METRICS: sum exp(z - m) * z
    s2 = tl.zeros((BLOCK_N,), tl.float32)     # sum exp(2 (z - m))
    zs = tl.zeros((BLOCK_N,), tl.float32)     # sum z
    arg = tl.full((BLOCK_N,), -1, tl.int64)   # first argmax
    for v0 in tl.range(v_lo, v_hi, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_hi
        acc = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn,
                         stride_wv, HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
        z = transform_logits(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        m_new = tl.maximum(m, tl.max(z, axis=1))
        # "safe max": while every logit seen so far is -inf (a masked vocabulary slice, e.g.
        # a -inf bias over padded entries) subtract 0 instead, since exp(-inf - -inf) is NaN;
        # exp(-inf - 0) = 0 then adds nothing and leaves s = 0
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        r = tl.exp(m - m_use)
        e = tl.exp(z - m_use[:, None])
        s = s * r + tl.sum(e, axis=1)
        if METRICS:
            tile_max = tl.max(z, axis=1)
            first = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), axis=1)
            arg = tl.where(tile_max > m, first, arg)
            sz = sz * r + tl.sum(tl.where(e > 0, e * z, 0.0), axis=1)
            s2 = s2 * r * r + tl.sum(e * e, axis=1)
            zs += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, zt, mask=row_ok)
    if METRICS:
        tl.store(x_ptr + out, sz, mask=row_ok)
        tl.store(x_ptr + N * tl.num_programs(1) + out, s2, mask=row_ok)
        tl.store(x_ptr + 2 * N * tl.num_programs(1) + out, zs, mask=row_ok)
        tl.store(arg_ptr + out, arg, mask=row_ok)


def logprob_forward_partials(hidden, weight, bias, targets, logit_scale=1.0, softcap=None,
                             temperature=1.0, metrics=False, block_n=BLOCK_N, block_v=BLOCK_V,
                             block_d=BLOCK_D, splits=None, num_warps=NUM_WARPS,
                             num_stages=NUM_STAGES, target_programs=TARGET_PROGRAMS):
    """Launch the forward; return its per-split partial statistics.

    hidden  [N, D] fp32/bf16/fp16, row-major contiguous
    weight  [V, D] same dtype, contiguous
    bias    [V] same dtype, or None
    targets [N] int64 (an id in [0, V), or any other value: no target)
    returns ``sgdpo_fast.ops.sweep.TokenStats`` with ``[SPLITS, N]`` fields (fp32; the
    extras, with ``metrics``, ``[4, SPLITS, N]`` fp64): combine with ``sweep.merge_stats``.
    """
    from sgdpo_fast.ops.sweep import TokenStats

    N, D = hidden.shape
    V = weight.shape[0]
    n_blocks = triton.cdiv(N, block_n)
    v_tiles = triton.cdiv(V, block_v)
    if splits is None:
        splits = max(1, min(v_tiles, triton.cdiv(target_programs, n_blocks)))
    v_per_split = triton.cdiv(v_tiles, min(splits, v_tiles)) * block_v
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty((3, splits, N), dtype=torch.float32, device=hidden.device)
    xpart = torch.empty((3, splits, N) if metrics else (1,), dtype=torch.float32,
                        device=hidden.device)
    arg = torch.empty((splits, N) if metrics else (1,), dtype=torch.int64, device=hidden.device)
    _logprob_fwd_kernel[(n_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part[0], part[1], part[2], xpart, arg,
        N, V, D, v_per_split,
        hidden.stride(0), weight.stride(0),
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(hidden.dtype), METRICS=bool(metrics),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    extra = None
    if metrics:
        extra = torch.cat([xpart.double(), arg.double()[None]])
    return TokenStats(part[0], part[1], part[2], extra)
