"""Triton forward of the fused per-token log-prob: online logsumexp over vocabulary tiles.

A 1-D grid of ``n_blocks * SPLITS`` programs: program (i, s) owns token block i and the s-th
contiguous slice of the vocabulary, mapped by ``launch_order.grouped_pid`` (``GROUP_N`` token
blocks side by side, so weight tiles are reused from L2).  It builds logit tiles
``[BLOCK_N, BLOCK_V]`` in registers from ``BLOCK_D`` chunks of hidden and weight (``tl.dot``,
fp32 accumulation), applies bias and the logit transform, and folds each tile into a
running max / sum-exp; the target logit is picked when it falls in the tile.  With
``METRICS`` it also keeps ``sum p z``, ``sum p^2``, ``sum z`` and the first argmax
(``sgdpo_fast.ops.sweep.EXTRA``).  The launcher returns the per-split partials ``[SPLITS, N]``
as a ``TokenStats``; ``sweep.merge_stats`` combines them.  No ``[N, V]`` buffer exists.

Work: one GEMM-equivalent (2 N V D flops); HBM traffic with the grouped order about
``N D e + V D e * ceil(N / (GROUP_N BLOCK_N))`` bytes (e = element size; hidden read once per
group sweep, weights once per group), plus ``12 SPLITS N`` bytes of partials.
"""
import torch
import triton
import triton.language as tl

from .launch_order import grouped_pid
from .logit_tile import logit_tile
from .logit_transform import transform_logits
from .logprob_configs import KernelConfig, select
from .tile_dot import interpreter_upcast

TARGET_WAVES = 16   # programs per launch: this many per multiprocessor (wave quantization < 1/16)
MIN_TILES_PER_SPLIT = 4  # a split sweeps at least this many vocabulary tiles


@triton.jit(do_not_specialize=["N", "n_splits"])
def _logprob_fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, m_ptr, s_ptr, tgt_ptr, x_ptr, arg_ptr,
    N, V, D, v_per_split, n_splits,
    stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, METRICS: tl.constexpr, EVEN_D: tl.constexpr, GROUP_N: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n, pid_s = grouped_pid(tl.program_id(0), tl.cdiv(N, BLOCK_N), n_splits, GROUP_N)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    rows = pid_n * BLOCK_N + r
    row_ok = rows < N
    r_ld = tl.where(row_ok, r, 0)
    h_blk = h_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_hn
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    v_lo = pid_s * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    zt = tl.zeros((BLOCK_N,), tl.float32)
    sz = tl.zeros((BLOCK_N,), tl.float32)     # METRICS: sum exp(z - m) * z
    s2 = tl.zeros((BLOCK_N,), tl.float32)     # sum exp(2 (z - m))
    zs = tl.zeros((BLOCK_N,), tl.float32)     # sum z
    arg = tl.full((BLOCK_N,), -1, tl.int32)   # first argmax
    w_blk = w_ptr + v_lo.to(tl.int64) * stride_wv   # 64-bit base, 32-bit steps
    b_blk = b_ptr + v_lo
    for v0 in range(v_lo, v_hi, BLOCK_V):
        cols = v0 + c
        col_ok = cols < v_hi
        # columns past v_hi but inside V are valid memory (the next split's rows): only the
        # ones past V are clamped
        c_ld = tl.where(cols < V, c, 0)
        acc = logit_tile(h_blk, w_blk, b_blk, r_ld, c_ld, D, stride_hn, stride_wv, HAS_BIAS,
                         DOT_PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
        w_blk += BLOCK_V * stride_wv
        b_blk += BLOCK_V
        z = transform_logits(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
        z = tl.where(col_ok[None, :], z, float("-inf"))
        tile_max = tl.max(z, axis=1)
        m_new = tl.maximum(m, tile_max)
        # "safe max": while every logit seen so far is -inf (a masked vocabulary slice, e.g.
        # a -inf bias over padded entries) subtract 0 instead, since exp(-inf - -inf) is NaN;
        # exp(-inf - 0) = 0 then adds nothing and leaves s = 0.  A NaN or +inf logit makes
        # s NaN (NaN propagates), as in every backend.
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        r_old = tl.exp(m - m_use)
        e = tl.exp(z - m_use[:, None])
        s = s * r_old + tl.sum(e, axis=1)
        if METRICS:
            first = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), axis=1)
            arg = tl.where(tile_max > m, first, arg)
            sz = sz * r_old + tl.sum(tl.where(e > 0, e * z, 0.0), axis=1)
            s2 = s2 * r_old * r_old + tl.sum(e * e, axis=1)
            zs += tl.sum(tl.where(col_ok[None, :], z, 0.0), axis=1)
        m = m_new
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    out = pid_s.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, zt, mask=row_ok)
    if METRICS:
        total = N * n_splits
        tl.store(x_ptr + out, sz, mask=row_ok)
        tl.store(x_ptr + total + out, s2, mask=row_ok)
        tl.store(x_ptr + 2 * total + out, zs, mask=row_ok)
        tl.store(arg_ptr + out, arg.to(tl.int64), mask=row_ok)


def num_sms(device) -> int:
    """Multiprocessors of a CUDA device; 1 elsewhere (the CPU interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def kernel_config(D, V, dtype, bias=False, softcap=False, metrics=False,
                  **override) -> KernelConfig:
    """The table's forward config for this head and epilogue, with the plan's fields
    (``override``) applied."""
    return select("fwd", D, V, dtype, bias, softcap, metrics).override(**override)


def forward_launch(hidden, weight, bias, targets, logit_scale=1.0, softcap=None, temperature=1.0,
                   metrics=False, splits=None, target_programs=None, sms=None, **config):
    """Everything one forward launch needs: ``(kernel, grid, args, kwargs, outputs)``, with
    ``outputs = (part [3, SPLITS, N], xpart, arg)``.  Shared by the launcher and the kernel
    report (which calls it on meta tensors to compile exactly what a launch would)."""
    N, D = hidden.shape
    V = weight.shape[0]
    cfg = kernel_config(D, V, hidden.dtype, bias is not None, softcap is not None, metrics,
                        **config)
    n_blocks = triton.cdiv(N, cfg.block_n)
    v_tiles = triton.cdiv(V, cfg.block_v)
    if splits is None:
        target = target_programs or TARGET_WAVES * (sms or num_sms(hidden.device))
        splits = max(1, min(triton.cdiv(v_tiles, MIN_TILES_PER_SPLIT), triton.cdiv(target, n_blocks)))
    v_per_split = triton.cdiv(v_tiles, min(splits, v_tiles)) * cfg.block_v
    splits = triton.cdiv(V, v_per_split)
    dev = hidden.device
    part = torch.empty((3, splits, N), dtype=torch.float32, device=dev)
    xpart = torch.empty((3, splits, N) if metrics else (1,), dtype=torch.float32, device=dev)
    arg = torch.empty((splits, N) if metrics else (1,), dtype=torch.int64, device=dev)
    args = (hidden, weight, bias if bias is not None else hidden, targets,
            part[0], part[1], part[2], xpart, arg,
            N, V, D, v_per_split, splits, hidden.stride(0), weight.stride(0),
            float(logit_scale), float(softcap or 1.0), 1.0 / float(temperature))
    kwargs = dict(
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(hidden.dtype), METRICS=bool(metrics),
        EVEN_D=D % cfg.block_d == 0, GROUP_N=cfg.group_n,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _logprob_fwd_kernel, (n_blocks * splits,), args, kwargs, (part, xpart, arg)


def logprob_forward_partials(hidden, weight, bias, targets, logit_scale=1.0, softcap=None,
                             temperature=1.0, metrics=False, splits=None, target_programs=None,
                             **config):
    """Launch the forward; return its per-split partial statistics.

    hidden  [N, D] fp32/bf16/fp16, row-major contiguous
    weight  [V, D] same dtype, contiguous
    bias    [V] same dtype, or None
    targets [N] int64 (an id in [0, V), or any other value: no target)
    config  ``TritonConfig`` kernel fields (block_n, block_v, block_d, num_warps, num_stages,
            group_n); unset ones come from ``logprob_configs.select``
    returns ``sgdpo_fast.ops.sweep.TokenStats`` with ``[SPLITS, N]`` fields (fp32; the
    extras, with ``metrics``, ``[4, SPLITS, N]`` fp64): combine with ``sweep.merge_stats``.
    """
    from sgdpo_fast.ops.sweep import TokenStats

    kernel, grid, args, kwargs, (part, xpart, arg) = forward_launch(
        hidden, weight, bias, targets, logit_scale, softcap, temperature, metrics, splits,
        target_programs, **config)
    kernel[grid](*args, **kwargs)
    extra = None
    if metrics:
        extra = torch.cat([xpart.double(), arg.double()[None]])
    return TokenStats(part[0], part[1], part[2], extra)
