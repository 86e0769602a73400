"""Block configurations of the log-prob kernels, keyed on (D, V, dtype).

``select(kernel, D, V, dtype, metrics)`` picks one row of ``TABLE`` for the forward kernel
(``"fwd"``) or the backward's gradient-tile kernel (``"dx"``); ``TritonConfig`` fields that a
plan sets override it field by field.  Every shipped row compiles for sm_90a without register
spills at the divisibility the launchers really pass (``tests/test_triton_compile.py`` checks
it, ``python -m bench.kernel_report`` writes the resources and the modeled speed of each to
``bench/results/sm90-kernels.md``).

Why these blocks (H100/H200, bf16; one GEMM-equivalent = 2 N V D flops):

* bf16/fp16, large heads (D >= 1024, V >= 16384), plain epilogue: 128 x 256 x 64 tiles
  (forward) and 256 x 128 x 64 (gradient tile: the same area, and the orientation whose
  16-byte dX stores fit the registers), 8 warps (two warpgroups issuing wgmma), 3 stages
  (48 KiB of operands per stage, 144 KiB).
  Per K-step a program loads (128 + 256) x 64 x 2 B = 48 KiB from L2 for
  2 x 128 x 256 x 64 = 4.2 MFLOP: 85 FLOP/B, against 43 FLOP/B for the old 64 x 128 tiles,
  whose L2 traffic at the tensor-core rate would exceed what L2 delivers.
* the same heads with a richer epilogue (forward: softcap or metrics; gradient tile:
  softcap) keep more live values per logit: 128 x 256 spills there (hundreds of bytes per
  thread with ptxas 12.8 / Triton 3.6), 128 x 128 x 64 (96 KiB) does not.
* small heads: 64 x 128 x 64, 4 warps (less padding, more programs).
* fp32: 64 x 64 x 32, 4 warps (IEEE fp32 on the FMA units: no tensor cores; the accumulator
  is 32 registers per thread).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

KERNELS = ("fwd", "dx")


@dataclass(frozen=True)
class KernelConfig:
    block_n: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    group_n: int

    FIELDS = ("block_n", "block_v", "block_d", "num_warps", "num_stages", "group_n")

    def override(self, **kw) -> "KernelConfig":
        """This config with the fields of ``kw`` that are not None."""
        vals = {f: getattr(self, f) for f in self.FIELDS}
        vals.update({k: v for k, v in kw.items() if k in self.FIELDS and v is not None})
        return KernelConfig(**vals)


LARGE_HALF = KernelConfig(128, 256, 64, 8, 3, 8)
LARGE_HALF_DX = KernelConfig(256, 128, 64, 8, 3, 8)
LARGE_HALF_RICH = KernelConfig(128, 128, 64, 8, 3, 8)
SMALL_HALF = KernelConfig(64, 128, 64, 4, 3, 8)
FP32 = KernelConfig(64, 64, 32, 4, 2, 8)

# (kernel, dtype class, epilogue, min D, min V) -> config; the first matching row wins
# (epilogue None matches both)
TABLE = (
    ("fwd", "half", "plain", 1024, 16384, LARGE_HALF),
    ("fwd", "half", "rich", 1024, 16384, LARGE_HALF_RICH),
    ("dx", "half", "plain", 1024, 16384, LARGE_HALF_DX),
    ("dx", "half", "rich", 1024, 16384, LARGE_HALF_RICH),
    ("fwd", "half", None, 0, 0, SMALL_HALF),
    ("dx", "half", None, 0, 0, SMALL_HALF),
    ("fwd", "fp32", None, 0, 0, FP32),
    ("dx", "fp32", None, 0, 0, FP32),
)


def dtype_class(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "half"


def epilogue(kernel: str, bias: bool = False, softcap: bool = False, metrics: bool = False) -> str:
    """``"rich"`` when the kernel's epilogue keeps more live values per logit than the plain
    log-sum-exp / gradient: the forward with a softcap or metrics, the gradient tile with a
    softcap (a bias alone fits the large tiles of both)."""
    if kernel == "fwd":
        return "rich" if (softcap or metrics) else "plain"
    return "rich" if softcap else "plain"


def select(kernel: str, D: int, V: int, dtype: torch.dtype, bias: bool = False,
           softcap: bool = False, metrics: bool = False) -> KernelConfig:
    """The table's config for ``kernel`` (``"fwd"`` or ``"dx"``) on a ``[*, D] x [V, D]`` head
    with that epilogue."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    cls, ep = dtype_class(dtype), epilogue(kernel, bias, softcap, metrics)
    for k, c, e, min_d, min_v, cfg in TABLE:
        if k == kernel and c == cls and e in (None, ep) and D >= min_d and V >= min_v:
            return cfg
    raise AssertionError("the table has a catch-all row per kernel and dtype class")
