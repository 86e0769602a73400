"""Triton forward of the fused per-token log-prob: online logsumexp over vocabulary tiles.

Grid ``(cdiv(N, BLOCK_N), SPLITS)``: program (i, s) owns token block i and the
s-th contiguous slice of the vocabulary.  It builds logit tiles
``[BLOCK_N, BLOCK_V]`` in registers from ``BLOCK_D`` chunks of hidden and
weight (``tl.dot``, fp32 accumulation), applies bias and the logit transform,
and folds each tile into a running max / sum-exp; the target logit is picked
when it falls in the tile.  Per-split partials ``[SPLITS, N]`` are combined by
``logprob_forward`` with a few tiny torch ops.  Only ``logp[N]`` and
``lse[N]`` leave the op; no ``[N, V]`` buffer exists.
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
    h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr,
    N, V, D, v_per_split,
    stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        s = s * tl.exp(m - m_use) + tl.sum(tl.exp(z - m_use[:, None]), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, zt, mask=row_ok)


def combine_partials(m, s):
    """lse [N] from per-split running maxima ``m`` and sums ``s`` ``[SPLITS, N]``.

    A split whose logits are all -inf (masked vocabulary) has ``m = -inf, s = 0`` and
    contributes nothing; its maximum must not enter an exponent (``-inf - -inf`` is NaN).
    A row with no finite logit at all gets ``lse = -inf``.
    """
    ok = torch.isfinite(m)
    mx = torch.where(ok, m, torch.full_like(m, float("-inf"))).amax(dim=0)
    mx_use = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
    terms = torch.where(ok, s * torch.exp(torch.where(ok, m, mx_use) - mx_use), torch.zeros_like(s))
    return mx_use + torch.log(terms.sum(dim=0))


def logprob_forward(hidden, weight, bias, targets, ignore_index, logit_scale=1.0, softcap=None,
                    temperature=1.0, block_n=BLOCK_N, block_v=BLOCK_V, block_d=BLOCK_D,
                    splits=None, num_warps=NUM_WARPS, num_stages=NUM_STAGES):
    """Launch the forward.

    hidden  [N, D] fp32/bf16/fp16, row-major contiguous
    weight  [V, D] same dtype, contiguous
    bias    [V] same dtype, or None
    targets [N] int64 (values in [0, V) or ignore_index)
    returns (logp [N] fp32, 0 at ignored positions; lse [N] fp32)
    """
    N, D = hidden.shape
    V = weight.shape[0]
    n_blocks = triton.cdiv(N, block_n)
    v_tiles = triton.cdiv(V, block_v)
    if splits is None:
        splits = max(1, min(v_tiles, triton.cdiv(TARGET_PROGRAMS, n_blocks)))
    v_per_split = triton.cdiv(v_tiles, splits) * block_v
    splits = triton.cdiv(V, v_per_split)
    part = torch.empty((3, splits, N), dtype=torch.float32, device=hidden.device)
    _logprob_fwd_kernel[(n_blocks, splits)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part[0], part[1], part[2],
        N, V, D, v_per_split,
        hidden.stride(0), weight.stride(0),
        float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(hidden.dtype),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    m, s, zt = part[0], part[1], part[2]
    lse = combine_partials(m, s)
    tgt = zt.sum(dim=0)
    logp = torch.where(targets != ignore_index, tgt - lse, torch.zeros_like(lse))
    return logp, lse
