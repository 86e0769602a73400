"""Triton backward of the fused per-token log-prob: the gradient-tile kernel.

For token i and vocabulary entry j: ``dL/dx_ij = g_i * (onehot_ij - softmax(z)_ij) * dz/dx_ij``
(``z`` the transformed logit, ``x`` the raw one), then ``dH = dX @ W``, ``dW = dX^T @ H``,
``db = sum_i dX_i``.

Design: ONE recompute of each logit tile feeds both dH and dW.  ``_logprob_bwd_dx_kernel``
recomputes the logits of a slab ``[rows, vocabulary chunk]`` (the same mainloop as the
forward, ``logit_tile``), applies the gradient epilogue in registers and writes ``dX`` once,
in the input dtype, into a bounded slab (``slab_bytes``; all tokens x a vocabulary chunk of
``>= 1024`` ids when they fit); the column sums go into ``db`` with relaxed fp32 atomics.  Two
library GEMMs (cuBLAS on CUDA, through ``sgdpo_fast.ops.sweep.backward``, the same driver the
``cuda`` backend uses) consume the slab on the tensor cores: ``dH[rows] += dX @ W[chunk]``
(K = chunk, fp32 accumulator) and ``dW[chunk] = dX^T @ H`` (K = N: the whole sum in one GEMM,
rounded once).  Forward + backward = 4 GEMM-equivalents (2 N V D flops each), plus
``(V - tail) / V`` of one when the driver borrows the end of dW's buffer for dH's fp32 sum
(``sweep._dh_accumulators``; 0 when ``scratch_bytes`` holds it).

Why not one kernel with atomics for both (the design of Cut Cross-Entropy, which
accumulates in bf16 under locks): at bf16 N=8192, D=4096, V=128256 with 128 x 128 tiles every
program would add its [128, D] partial of dH and its [128, D] partial of dW into fp32
accumulators: N D V/128 + V D N/128 = 6.7e10 fp32 reductions (268 GB of read-modify-write at
L2), one per 256 flops of the dH and dW products; at 790 TFLOP/s that is 3.1e12 reductions/s,
12 TB/s of atomic updates, above what L2 serves even for plain reads (7-12 TB/s by
third-party measurements of H100), so the kernel would run at a fraction of the tensor-core
rate whatever the fence semantics.  The slab moves ``dX`` through memory instead: 2 bytes
written and 2 x 2 read per logit (6 N V bytes = 6.3 GB at that shape, 1.5 ms at 4.3 TB/s)
against 33 ms of backward GEMMs, and the GEMMs run at library speed.  The only atomics left
are ``db``'s: BLOCK_V per program (one per 2 BLOCK_N D flops), relaxed.

Why not the old two kernels (dH and dW each recomputing the tile): 5 GEMM-equivalents, and
their fp32 atomics compiled to fenced ``ATOMG.STRONG.GPU`` (default acq_rel semantics): one
per 128-256 flops.

NaN propagates: a NaN upstream gradient or a non-finite logit gives NaN in its row of dX,
hence in dH's row, dW and db (there is no early exit on ``g == 0``).
"""
import torch
import triton
import triton.language as tl

from .launch_order import grouped_pid
from .logit_tile import logit_tile
from .logit_transform import transform_logits_with_grad
from .logprob_configs import KernelConfig, select
from .tile_dot import interpreter_upcast

SLAB_BYTES = 40 << 20      # dX slab (bf16: 8192 tokens x 2560 ids, 16384 x 1280)
SCRATCH_BYTES = 16 << 20   # fp32 dH accumulator scratch (the rest lives in the gradients)
MIN_SLAB_V = 1024          # vocabulary ids per slab at least: the dH GEMM's K; its fp32
#                            accumulator traffic is 8 N D bytes per slab, so K / 4 flops per
#                            byte (>= 256 at 1024, above the H200's ~190 ridge)


@triton.jit(do_not_specialize=["n_rows", "n_cols", "v0"])
def _logprob_bwd_dx_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, g_ptr, dx_ptr, db_ptr,
    n_rows, n_cols, v0, D, stride_hn, stride_wv, stride_dx,
    logit_scale, softcap, inv_temperature,
    HAS_BIAS: tl.constexpr, NEED_DB: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, EVEN_D: tl.constexpr,
    GROUP_N: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dx[i, j] = dL/dx for rows i < n_rows of h and vocabulary rows j < n_cols of w (ids
    v0 + j); db[j] += sum_i dx[i, j] (fp32, relaxed atomics).  ``dx`` is padded to whole
    tiles (zeros written there), so the stores need no mask and go out as 16-byte vectors."""
    pid_n, pid_v = grouped_pid(tl.program_id(0), tl.cdiv(n_rows, BLOCK_N),
                               tl.cdiv(n_cols, BLOCK_V), GROUP_N)
    r = tl.arange(0, BLOCK_N)
    c = tl.arange(0, BLOCK_V)
    rows = pid_n * BLOCK_N + r
    cols = pid_v * BLOCK_V + c
    row_ok = rows < n_rows
    col_ok = cols < n_cols
    acc = logit_tile(h_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_hn,
                     w_ptr + (pid_v * BLOCK_V).to(tl.int64) * stride_wv, b_ptr + pid_v * BLOCK_V,
                     tl.where(row_ok, r, 0), tl.where(col_ok, c, 0), D, stride_hn, stride_wv,
                     HAS_BIAS, DOT_PRECISION, UPCAST, EVEN_D, BLOCK_N, BLOCK_V, BLOCK_D)
    z, dzdx = transform_logits_with_grad(acc, logit_scale, softcap, inv_temperature, HAS_SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    tgt = tl.load(t_ptr + rows, mask=row_ok, other=-1)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where((cols + v0)[None, :] == tgt[:, None], 1.0, 0.0)
    ok = row_ok[:, None] & col_ok[None, :]
    dx = tl.where(ok, g[:, None] * (onehot - p) * dzdx, 0.0)
    dx_blk = dx_ptr + (pid_n * BLOCK_N).to(tl.int64) * stride_dx + pid_v * BLOCK_V
    tl.store(dx_blk + r[:, None] * stride_dx + c[None, :], dx.to(dx_ptr.dtype.element_ty))
    if NEED_DB:
        # plain accumulation: no ordering with any other memory access is needed (the
        # sums are read by the next kernel), so no fences
        tl.atomic_add(db_ptr + cols, tl.sum(dx, axis=0), mask=col_ok, sem="relaxed")


def kernel_config(D, V, dtype, bias=False, softcap=False, **override) -> KernelConfig:
    """The table's gradient-tile config for this head and epilogue, with the plan's fields
    applied."""
    return select("dx", D, V, dtype, bias, softcap).override(**override)


def slab_shape(n, V, elem_bytes, cfg: KernelConfig, slab_bytes=SLAB_BYTES):
    """``(block_n, block_v)`` of the dX slab: all ``n`` tokens by as many vocabulary ids as
    ``slab_bytes`` holds (a multiple of the kernel's BLOCK_V, at least ``MIN_SLAB_V`` or the
    whole padded vocabulary); when even that many ids do not fit, fewer tokens."""
    v_pad = triton.cdiv(V, cfg.block_v) * cfg.block_v
    min_v = min(v_pad, triton.cdiv(MIN_SLAB_V, cfg.block_v) * cfg.block_v)
    if n * min_v * elem_bytes <= slab_bytes:
        block_v = slab_bytes // (n * elem_bytes) // cfg.block_v * cfg.block_v
        return n, max(min_v, min(v_pad, block_v))
    block_n = slab_bytes // (min_v * elem_bytes) // cfg.block_n * cfg.block_n
    return max(cfg.block_n, block_n), min_v


def padded(n, block):
    return triton.cdiv(n, block) * block


def dx_launch(h, w, b, t, lse, g, v0, dx, db, tf, cfg: KernelConfig):
    """``(kernel, grid, args, kwargs)`` of one gradient-tile launch (shared by ``GradTiles``
    and the kernel report, which calls it on meta tensors).

    h [n, D] rows of hidden, w [vt, D] rows of weight (ids v0 ...), b [vt] or None, t [n]
    int64 targets (global ids), lse [n] fp32, g [n] fp32, db [vt] fp32 or None;
    dx [>= padded(n, BLOCK_N), >= padded(vt, BLOCK_V)] (input dtype, unit column stride): the
    kernel writes whole tiles, the caller reads ``dx[:n, :vt]``.
    """
    n, D = h.shape
    vt = w.shape[0]
    if dx.shape[0] < padded(n, cfg.block_n) or dx.shape[1] < padded(vt, cfg.block_v) \
            or dx.stride(1) != 1:
        raise ValueError(f"dx must be a [>= {padded(n, cfg.block_n)}, >= "
                         f"{padded(vt, cfg.block_v)}] slab with unit column stride, got "
                         f"{tuple(dx.shape)} strides {dx.stride()}")
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(vt, cfg.block_v),)
    args = (h, w, b if b is not None else h, t, lse, g, dx, db if db is not None else lse,
            n, vt, int(v0), D, h.stride(0), w.stride(0), dx.stride(0),
            float(tf.logit_scale), float(tf.softcap or 1.0), 1.0 / float(tf.temperature))
    kwargs = dict(
        HAS_BIAS=b is not None, NEED_DB=db is not None, HAS_SOFTCAP=tf.softcap is not None,
        DOT_PRECISION="ieee" if h.dtype == torch.float32 else "tf32",
        UPCAST=interpreter_upcast(h.dtype), EVEN_D=D % cfg.block_d == 0, GROUP_N=cfg.group_n,
        BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return _logprob_bwd_dx_kernel, grid, args, kwargs


class GradTiles:
    """The producer of ``sweep.backward`` for the Triton backend: one kernel launch per tile
    writes ``dX`` (input dtype) into a slab made once for tiles of ``block_n x block_v``."""

    def __init__(self, tf, dtype, device, block_n, block_v, cfg: KernelConfig):
        self.tf, self.cfg = tf, cfg
        self.slab = torch.empty((padded(block_n, cfg.block_n), padded(block_v, cfg.block_v)),
                                dtype=dtype, device=device)

    def __call__(self, h, w, b, t, lse, g, v0, db):
        kernel, grid, args, kwargs = dx_launch(h, w, b, t, lse, g, v0, self.slab, db, self.tf,
                                               self.cfg)
        kernel[grid](*args, **kwargs)
        return self.slab[: h.shape[0], : w.shape[0]]
