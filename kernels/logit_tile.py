"""``logit_tile``: one ``[BLOCK_N, BLOCK_V]`` tile of raw logits ``h @ w.T (+ b)`` in fp32.

Shared by the forward kernel and the backward's gradient-tile kernel (the GEMM mainloop):
the hidden rows and the weight rows are streamed in ``BLOCK_D`` chunks and multiplied with
``tile_dot`` (tensor cores for bf16/fp16, IEEE fp32 for fp32 inputs).

``h_blk`` / ``w_blk`` / ``b_blk`` point at the tile's first token row / vocabulary row (64-bit
base offsets are applied by the caller, so the per-element offsets here are 32-bit).
``r_ld`` / ``c_ld`` are the local row / column indices to load: the caller clamps the ragged
edge to row 0 / column 0, so every load is unmasked (16-byte vectors, pipelined) when
``EVEN_D`` (D a multiple of BLOCK_D); the values computed for clamped rows and columns are
garbage the caller masks out.
"""
import triton
import triton.language as tl

from .tile_dot import tile_dot


@triton.jit
def logit_tile(h_blk, w_blk, b_blk, r_ld, c_ld, D, stride_hn, stride_wv,
               HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
               EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr):
    dd = tl.arange(0, BLOCK_D)
    h_ptrs = h_blk + r_ld[:, None] * stride_hn + dd[None, :]
    w_ptrs = w_blk + c_ld[:, None] * stride_wv + dd[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d0 in tl.range(0, D, BLOCK_D):
        if EVEN_D:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            d_ok = (d0 + dd) < D
            h = tl.load(h_ptrs, mask=d_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=d_ok[None, :], other=0.0)
        acc = tile_dot(h, tl.trans(w), acc, DOT_PRECISION, UPCAST)
        h_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    if HAS_BIAS:
        acc += tl.load(b_blk + c_ld).to(tl.float32)[None, :]
    return acc
