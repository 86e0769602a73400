"""``logit_tile``: one ``[BLOCK_N, BLOCK_V]`` tile of raw logits ``h @ w.T (+ b)`` in fp32.

Shared by the forward and both backward kernels: the hidden rows and the weight
rows are streamed in ``BLOCK_D`` chunks and multiplied with ``tile_dot``
(tensor cores for bf16/fp16, IEEE fp32 for fp32 inputs); ragged edges are masked
to zero.  ``rows`` / ``cols`` are int64 index vectors (64-bit offsets).
"""
import triton
import triton.language as tl

from .tile_dot import tile_dot


@triton.jit
def logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_hn, stride_wv,
               HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    dd = tl.arange(0, BLOCK_D)
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        d_ok = (d0 + dd) < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + (d0 + dd)[None, :],
                    mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + (d0 + dd)[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tile_dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc
