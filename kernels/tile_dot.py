"""``tile_dot``: tl.dot with fp32 accumulation, plus a work-around for the interpreter.

Triton's CPU interpreter (TRITON_INTERPRET=1) stores bfloat16 as raw uint16 and
its ``tl.dot`` multiplies the bit patterns (triton-lang/triton#11584).  When
``UPCAST`` is set (only ever under the interpreter, see ``interpreter_upcast``)
the operands are converted to fp32 first; on a GPU ``UPCAST`` is False and the
native bf16/fp16 tensor-core path runs.
"""
import os

import torch
import triton
import triton.language as tl


def interpreter_upcast(dtype: torch.dtype) -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and dtype == torch.bfloat16


@triton.jit
def tile_dot(a, b, acc, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b  (a [M, K], b [K, N], acc [M, N] fp32)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)
