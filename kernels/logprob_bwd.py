"""Triton backward of the fused per-token log-prob: recompute logit tiles, never store them.

For token i and vocabulary entry j: ``dL/dx_ij = g_i * (onehot_ij - softmax(z)_ij) * dz/dx_ij``
(``z`` the transformed logit, ``x`` the raw one), then ``dH = dX @ W``,
``dW = dX^T @ H``, ``db = sum_i dX_i``.

Two kernels, each recomputing the logit tiles it needs:

* ``_logprob_bwd_dh_kernel``, grid ``(token blocks of a chunk, vocabulary splits)``:
  program (i, s) sweeps its vocabulary slice for token block i and adds its
  part of dH into an fp32 accumulator with ``tl.atomic_add``.
* ``_logprob_bwd_dw_kernel``, grid ``(vocab blocks of a chunk, token splits)``:
  likewise for dW (and db).

Memory: fp32 inputs accumulate straight into the fp32 outputs.  For bf16/fp16
the fp32 accumulator is a scratch buffer of at most ``SCRATCH_BYTES`` that
covers one chunk of rows at a time and is cast into the output after each
chunk, so the op needs little beyond its inputs and their gradients.
Accumulation order across splits is not fixed (atomics): results agree to fp32
rounding, not bitwise, from run to run.  Token blocks whose upstream gradient
is all zero are skipped.
"""
import torch
import triton
import triton.language as tl

from .logit_tile import logit_tile
from .logit_transform import transform_logits_with_grad
from .tile_dot import interpreter_upcast, tile_dot

BLOCK_N = 64
BLOCK_V = 128
BLOCK_D = 64
NUM_WARPS = 8
NUM_STAGES = 3
SCRATCH_BYTES = 64 << 20   # fp32 accumulator for one chunk of dH or dW rows (bf16/fp16 inputs)
TARGET_PROGRAMS = 4 * 132  # programs per launch: a few waves on an H100 (132 SMs)


@triton.jit
def _grad_tile(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, rows, cols, row_ok, col_ok, D,
               stride_hn, stride_wv, logit_scale, softcap, inv_temperature,
               HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Recompute one [BLOCK_N, BLOCK_V] logit tile and return dL/dx for it (fp32, 0 off-range)."""
    acc = logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_wv,
                     HAS_BIAS, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
    z, dzdx = transform_logits_with_grad(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = (cols[None, :] == tgt[:, None]).to(tl.float32)
    dx = g[:, None] * (onehot - p) * dzdx
    return tl.where(row_ok[:, None] & col_ok[None, :], dx, 0.0)


@triton.jit
def _logprob_bwd_dh_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, acc_ptr,
    n_start, n_stop, V, D, v_per_split, stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, HAS_SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc[rows - n_start, :] += dX[rows, slice] @ W[slice, :] (fp32, atomics)."""
    rows = n_start + tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_stop
    v_lo = tl.program_id(1).to(tl.int64) * v_per_split
    v_hi = tl.minimum(v_lo + v_per_split, V)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    if tl.max(tl.abs(g), axis=0) > 0:
        dd = tl.arange(0, BLOCK_D)
        for v0 in tl.range(v_lo, v_hi, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V)
            col_ok = cols < v_hi
            dx = _grad_tile(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, rows, cols, row_ok, col_ok,
                            D, stride_hn, stride_wv, logit_scale, softcap, inv_temperature,
                            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            dx = dx.to(w_ptr.dtype.element_ty)
            for d0 in tl.range(0, D, BLOCK_D):
                d_ok = (d0 + dd) < D
                w = tl.load(w_ptr + cols[:, None] * stride_wv + (d0 + dd)[None, :],
                            mask=col_ok[:, None] & d_ok[None, :], other=0.0)
                part = tile_dot(dx, w, tl.zeros((BLOCK_N, BLOCK_D), tl.float32), DOT_PRECISION, UPCAST)
                tl.atomic_add(acc_ptr + (rows - n_start)[:, None] * D + (d0 + dd)[None, :], part,
                              mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _logprob_bwd_dw_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, acc_ptr, db_ptr,
    v_start, v_stop, N, D, n_per_split, stride_hn, stride_wv,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """acc[cols - v_start, :] += dX[slice, cols]^T @ H[slice, :]; db[cols] += sum dX (fp32, atomics)."""
    cols = v_start + tl.program_id(0).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < v_stop
    n_lo = tl.program_id(1).to(tl.int64) * n_per_split
    n_hi = tl.minimum(n_lo + n_per_split, N)
    dd = tl.arange(0, BLOCK_D)
    db = tl.zeros((BLOCK_V,), tl.float32)
    for n0 in tl.range(n_lo, n_hi, BLOCK_N):
        rows = n0 + tl.arange(0, BLOCK_N)
        row_ok = rows < n_hi
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        if tl.max(tl.abs(g), axis=0) > 0:
            dx = _grad_tile(h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, rows, cols, row_ok, col_ok,
                            D, stride_hn, stride_wv, logit_scale, softcap, inv_temperature,
                            HAS_BIAS, HAS_SOFTCAP, DOT_PRECISION, UPCAST, BLOCK_N, BLOCK_V, BLOCK_D)
            if NEED_DB:
                db += tl.sum(dx, axis=0)
            if NEED_DW:
                dxt = tl.trans(dx.to(h_ptr.dtype.element_ty))
                for d0 in tl.range(0, D, BLOCK_D):
                    d_ok = (d0 + dd) < D
                    h = tl.load(h_ptr + rows[:, None] * stride_hn + (d0 + dd)[None, :],
                                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
                    part = tile_dot(dxt, h, tl.zeros((BLOCK_V, BLOCK_D), tl.float32),
                                    DOT_PRECISION, UPCAST)
                    tl.atomic_add(acc_ptr + (cols - v_start)[:, None] * D + (d0 + dd)[None, :],
                                  part, mask=col_ok[:, None] & d_ok[None, :])
    if NEED_DB:
        tl.atomic_add(db_ptr + cols, db, mask=col_ok)


def _splits(blocks_in_chunk, total_len, block, target_programs):
    """Split the swept dimension so one launch has about ``target_programs`` programs."""
    tiles = triton.cdiv(total_len, block)
    splits = max(1, min(tiles, triton.cdiv(target_programs, blocks_in_chunk)))
    per_split = triton.cdiv(tiles, splits) * block
    return triton.cdiv(total_len, per_split), per_split


def _chunk_rows(D, block, total, scratch_bytes):
    rows = max(block, (scratch_bytes // (4 * D)) // block * block)
    return min(rows, triton.cdiv(total, block) * block)


def logprob_backward(hidden, weight, bias, targets, lse, grad, need_hidden=True, need_weight=True,
                     need_bias=False, logit_scale=1.0, softcap=None, temperature=1.0,
                     block_n=BLOCK_N, block_v=BLOCK_V, block_d=BLOCK_D,
                     num_warps=NUM_WARPS, num_stages=NUM_STAGES, target_programs=TARGET_PROGRAMS,
                     scratch_bytes=SCRATCH_BYTES):
    """Launch the backward kernels.

    hidden  [N, D] fp32/bf16/fp16 contiguous; weight [V, D] same dtype; bias [V] or None
    targets [N] int64 (an id in [0, V), or any other value: no target in this range);
    lse [N] fp32 (from the forward); grad [N] fp32
    returns (dH [N, D], dW [V, D], db [V]) in the input dtype, None where not needed;
    accumulation in fp32 (see the module docstring for the scratch buffer).
    """
    N, D = hidden.shape
    V = weight.shape[0]
    dev, dt = hidden.device, hidden.dtype
    common = dict(
        logit_scale=float(logit_scale), softcap=float(softcap or 1.0),
        inv_temperature=1.0 / float(temperature),
        HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None,
        DOT_PRECISION="ieee" if dt == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(dt),
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_D=block_d,
        num_warps=num_warps, num_stages=num_stages,
    )
    b_arg = bias if bias is not None else hidden
    fp32 = dt == torch.float32
    scratch = None
    dH = dW = db = None
    if need_hidden:
        dH = torch.zeros((N, D), dtype=dt, device=dev)
        rows = _chunk_rows(D, block_n, N, scratch_bytes)
        if not fp32:
            scratch = torch.empty(rows * D, dtype=torch.float32, device=dev)
        for n0 in range(0, N, rows):
            n1 = min(N, n0 + rows)
            acc = dH[n0:n1] if fp32 else scratch[: (n1 - n0) * D].view(n1 - n0, D).zero_()
            blocks = triton.cdiv(n1 - n0, block_n)
            splits, per_split = _splits(blocks, V, block_v, target_programs)
            _logprob_bwd_dh_kernel[(blocks, splits)](
                hidden, weight, b_arg, targets, lse, grad, acc, n0, n1, V, D, per_split,
                hidden.stride(0), weight.stride(0), **common)
            if not fp32:
                dH[n0:n1].copy_(acc)
    need_bias = need_bias and bias is not None
    if need_weight or need_bias:
        db32 = torch.zeros(V, dtype=torch.float32, device=dev) if need_bias else None
        dW = torch.zeros((V, D), dtype=dt, device=dev) if need_weight else None
        rows = _chunk_rows(D, block_v, V, scratch_bytes) if need_weight else triton.cdiv(V, block_v) * block_v
        if need_weight and not fp32 and (scratch is None or scratch.numel() < rows * D):
            scratch = torch.empty(rows * D, dtype=torch.float32, device=dev)
        for v0 in range(0, V, rows):
            v1 = min(V, v0 + rows)
            if need_weight:
                acc = dW[v0:v1] if fp32 else scratch[: (v1 - v0) * D].view(v1 - v0, D).zero_()
            else:
                acc = lse  # unused when NEED_DW is False
            blocks = triton.cdiv(v1 - v0, block_v)
            splits, per_split = _splits(blocks, N, block_n, target_programs)
            _logprob_bwd_dw_kernel[(blocks, splits)](
                hidden, weight, b_arg, targets, lse, grad, acc,
                db32 if db32 is not None else lse, v0, v1, N, D, per_split,
                hidden.stride(0), weight.stride(0), NEED_DW=need_weight, NEED_DB=need_bias, **common)
            if need_weight and not fp32:
                dW[v0:v1].copy_(acc)
        db = db32.to(dt) if need_bias else None
    return dH, dW, db
