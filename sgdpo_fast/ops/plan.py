"""``LogprobPlan``: every execution choice of the log-prob op, in one frozen object.

A plan is resolved once per call (``backends.resolve``: ``backend="auto"`` becomes a
concrete backend for a CPU device; on CUDA it stays ``auto`` and ``backends/auto_backend.py``
picks the backend per call by device, dtype and shape from the shipped table of measured
results, the same for the forward and the backward) and travels with the call: the forward runs with it and
the backward reads the very same plan from ``ctx`` (or from the custom op's arguments), so
the two can never disagree.  Nothing of the op's configuration lives in module globals.

Fields:

``backend``   ``"auto"`` (see above), ``"torch"`` (tiled driver + torch epilogue, any device), ``"cpu"``
              (tiled driver + the C++ epilogue of ``sgdpo_fast._C``), ``"cuda"`` (tiled
              driver + the CUDA epilogue of ``sgdpo_fast._C_cuda``) or ``"triton"`` (the
              fused kernels of ``sgdpo_fast.kernels``).
``tiles``     ``TileConfig`` of the tiled driver (``torch``/``cpu``/``cuda`` backends).
``triton``    ``TritonConfig`` of the Triton kernels.
``metrics``   extra per-token statistics computed in the same sweep as the log-probs
              (``METRICS``: entropy, log_sum_sq_probs, mean_logits, is_top1); no gradient.
``transform`` the ``LogitTransform`` (logit scale, softcap, temperature).
``ignore_index``  targets equal to it are skipped (log-prob 0, zero gradient).
``gather``    ZeRO-3: a zero-argument callable returning a context inside which the weight
              and bias hold their full values (entered in forward and again in backward).
``group``     vocab-parallel: the process group whose ranks each hold a vocabulary shard
              starting at ``vocab_start`` (statistics are all-reduced, see vocab_parallel.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Tuple


from .transform import LogitTransform

BACKENDS = ("torch", "cpu", "triton", "cuda")
METRICS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


@dataclass(frozen=True)
class TileConfig:
    """Tile shape of the tiled driver (``sweep.py``; the ``torch``/``cpu``/``cuda`` backends): a
    logit tile is ``min(N, max_block_n)`` tokens by ``max(min_block_v, tile_elems // block_n)``
    vocabulary entries (so about ``tile_elems`` fp32 values, more when ``min_block_v``
    wins).  ``scratch_bytes`` bounds the backward's fp32
    accumulators beyond the gradients themselves for bf16/fp16 inputs (see
    ``sweep.backward``: part of dH's fp32 sum lives in the not-yet-written gradient buffers,
    the rest in this much scratch)."""

    tile_elems: int = 1 << 22       # 16 MiB of fp32
    max_block_n: int = 2048         # tokens per tile: fewer passes over W when larger
    min_block_v: int = 256
    scratch_bytes: int = 16 << 20   # fp32 accumulator scratch of the backward (bf16/fp16)

    def __post_init__(self):
        for name in ("tile_elems", "max_block_n", "min_block_v", "scratch_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"TileConfig.{name} must be a positive int, got {v!r}")

    def shape(self, N: int, V: int) -> Tuple[int, int]:
        """``(block_n, block_v)`` for ``N`` tokens and ``V`` vocabulary entries."""
        block_n = max(1, min(N, self.max_block_n))
        block_v = max(self.min_block_v, self.tile_elems // block_n)
        return block_n, max(1, min(V, block_v))

    def as_list(self) -> list:
        """Encoding for the custom op's schema."""
        return [getattr(self, f.name) for f in dataclasses.fields(self)]


@dataclass(frozen=True)
class TritonConfig:
    """Block sizes and launch shape of the Triton kernels (``kernels/logprob_*.py``).

    ``None`` fields take the kernels' choice for the problem: the config table of
    ``kernels/logprob_configs.py``, keyed on (D, V, dtype), restricted to configs that compile
    for sm_90 without register spills (``bench/results/sm90-kernels.md``).  The block fields
    apply to both the forward kernel and the backward's gradient-tile kernel.

    ``block_n``/``block_v``/``block_d``  tile of tokens x vocabulary entries, and the chunk of
                  the hidden dimension per ``tl.dot``
    ``num_warps``/``num_stages``  warps per program, software-pipelining depth
    ``group_n``   launch order: programs of ``group_n`` token blocks run side by side, so the
                  weight tiles they share are read once from HBM and then hit in L2
    ``splits``    forward: vocabulary splits per token block (``None``: enough programs for
                  ``target_programs``, or 16 waves of the device's multiprocessors)
    ``target_programs``  forward: programs per launch the split count aims at
    ``slab_bytes``  backward: the recomputed gradient tile ``dL/dlogits`` of a whole vocabulary
                  chunk (all tokens when they fit) goes through a slab of at most this many
                  bytes, consumed by two library GEMMs (dH and dW)
    ``scratch_bytes``  backward: fp32 accumulator scratch beyond the gradients (bf16/fp16)
    """

    block_n: Optional[int] = None
    block_v: Optional[int] = None
    block_d: Optional[int] = None
    num_warps: Optional[int] = None
    num_stages: Optional[int] = None
    group_n: Optional[int] = None
    splits: Optional[int] = None
    target_programs: Optional[int] = None
    slab_bytes: Optional[int] = None
    scratch_bytes: Optional[int] = None

    KERNEL = ("block_n", "block_v", "block_d", "num_warps", "num_stages", "group_n")
    FORWARD = KERNEL + ("splits", "target_programs")
    BACKWARD = KERNEL + ("slab_bytes", "scratch_bytes")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise ValueError(f"TritonConfig.{f.name} must be None or a positive int, got {v!r}")
        for name in ("block_n", "block_v", "block_d"):  # tl.arange / tl.dot shapes
            v = getattr(self, name)
            if v is not None and (v < 16 or v & (v - 1)):
                raise ValueError(f"TritonConfig.{name} must be a power of two >= 16, got {v}")

    def kwargs(self, which=None) -> dict:
        """The fields that are set (of ``which``: ``FORWARD`` or ``BACKWARD``), as keyword
        arguments of the kernel launchers."""
        names = [f.name for f in dataclasses.fields(self)] if which is None else which
        return {n: getattr(self, n) for n in names if getattr(self, n) is not None}

    def as_list(self) -> list:
        """Encoding for the custom op's schema (0 = None)."""
        return [getattr(self, f.name) or 0 for f in dataclasses.fields(self)]

    @classmethod
    def from_list(cls, xs) -> "TritonConfig":
        names = [f.name for f in dataclasses.fields(cls)]
        return cls(**{n: (int(x) or None) for n, x in zip(names, xs)})


@dataclass(frozen=True)
class LogprobPlan:
    backend: str = "auto"
    tiles: TileConfig = TileConfig()            # frozen, so one shared default is safe
    triton: TritonConfig = TritonConfig()
    metrics: Tuple[str, ...] = ()
    transform: LogitTransform = LogitTransform()
    ignore_index: int = -100
    gather: Optional[Callable[[], Any]] = field(default=None, compare=False)
    group: Any = field(default=None, compare=False)
    vocab_start: int = 0

    def __post_init__(self):
        if self.backend not in ("auto",) + BACKENDS:
            raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {self.backend!r}")
        if not isinstance(self.tiles, TileConfig):
            raise ValueError(f"tiles must be a TileConfig, got {type(self.tiles).__name__}")
        if not isinstance(self.triton, TritonConfig):
            raise ValueError(f"triton must be a TritonConfig, got {type(self.triton).__name__}")
        metrics = tuple(self.metrics)
        bad = [m for m in metrics if m not in METRICS]
        if bad:
            raise ValueError(f"metrics: unknown statistics {bad}; known {METRICS}")
        object.__setattr__(self, "metrics", metrics)
        if not isinstance(self.transform, LogitTransform):
            raise ValueError(f"transform must be a LogitTransform, got {type(self.transform).__name__}")
        if not isinstance(self.ignore_index, int) or isinstance(self.ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {self.ignore_index!r}")
        if not -2**63 <= self.ignore_index < 2**63:
            raise ValueError(f"ignore_index must fit in int64, got {self.ignore_index}")
        if not isinstance(self.vocab_start, int) or self.vocab_start < 0:
            raise ValueError(f"vocab_start must be an int >= 0, got {self.vocab_start!r}")
        if self.gather is not None and not callable(self.gather):
            raise ValueError("gather must be a zero-argument callable returning a context manager")
        # the custom op's encoding of the execution choices (read while tracing, so plain
        # attributes rather than methods)
        object.__setattr__(self, "_op_tiles", self.tiles.as_list())
        object.__setattr__(self, "_op_triton", self.triton.as_list())

    def replace(self, **kw) -> "LogprobPlan":
        return dataclasses.replace(self, **kw)

    @property
    def distributed(self) -> bool:
        """True when the plan carries a ZeRO-3 gather or a vocab-parallel group (these run
        through a plain ``autograd.Function``; everything else through the custom op)."""
        return self.gather is not None or self.group is not None

