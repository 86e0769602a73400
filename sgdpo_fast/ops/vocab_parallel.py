"""Vocab-parallel log-probs: the head's vocabulary split across the ranks of a group.

Each rank of ``group`` holds a contiguous vocabulary shard ``weight[start:end]`` ([V_r, D],
plus the bias shard) and the *same* tokens (hidden [N, D], targets [N], replicated, as in
Megatron-style tensor parallelism).  It is the single-device op with ``plan.group`` set:

* forward: every rank sweeps its shard with its backend (``sweep.TokenStats``: running
  max, sum-exp, the target logit it owns), then :func:`allreduce_stats` combines them with
  two collectives, an all-reduce MAX of the maxima and one all-reduce SUM of the rescaled
  sums and target logits (a MIN for the first argmax when metrics are asked for);
* backward is local: each rank recomputes its tiles against the *global* logsumexp, so
  ``dW_r`` (and ``db_r``) belong to its shard; the partial ``dH`` is all-reduced (SUM).

Never more than one logit tile of the shard is alive.  Every rank must call the forward
and run the backward.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from . import sweep
from .plan import LogprobPlan

__all__ = ["vocab_shard_range", "shard_lm_head", "vocab_parallel_token_logprobs",
           "allreduce_stats"]


def vocab_shard_range(vocab_size: int, rank: int, world_size: int) -> Tuple[int, int]:
    """``[start, end)`` of rank ``rank``'s vocabulary shard: contiguous, the first
    ``vocab_size % world_size`` ranks hold one row more (odd V splits unevenly)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size), got rank={rank}, world_size={world_size}")
    if vocab_size < 1:
        raise ValueError(f"vocab_size must be positive, got {vocab_size}")
    base, extra = divmod(vocab_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_lm_head(weight: torch.Tensor, bias: Optional[torch.Tensor] = None, group=None):
    """This rank's shard of a full head: ``(weight[start:end], bias[start:end] | None, start)``.

    Returns views (``.clone()`` them to free the full head)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    start, end = vocab_shard_range(weight.shape[0], rank, world)
    return weight[start:end], None if bias is None else bias[start:end], start


def allreduce_stats(stats: sweep.TokenStats, group, vocab_start: int) -> sweep.TokenStats:
    """The statistics of the whole vocabulary from each rank's shard statistics (``[n]``
    fields; the extras' argmax is shifted from shard ids to global ids first)."""
    def reduce(op):
        def f(x):
            x = x.clone()
            dist.all_reduce(x, op=op, group=group)
            return x
        return f

    if stats.extra is not None and vocab_start:
        extra = stats.extra.clone()
        arg = extra[sweep.EXTRA.index("arg")]
        arg.copy_(torch.where(arg >= 0, arg + vocab_start, arg))
        stats = stats._replace(extra=extra)
    return sweep.merge_stats(stats, reduce(dist.ReduceOp.MAX), reduce(dist.ReduceOp.SUM),
                             reduce(dist.ReduceOp.MIN))


def _check_shard(name, t, hidden, dim):
    """A shard's own checks, under its own name (the op would name weight / bias)."""
    if t is None and dim == 1:
        return
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16,
                                                          torch.bfloat16):
        raise ValueError(f"{name} must be a float32/float16/bfloat16 tensor")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if isinstance(hidden, torch.Tensor):
        if t.dtype != hidden.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from hidden dtype {hidden.dtype}")
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")


def vocab_parallel_token_logprobs(
    hidden: torch.Tensor,
    weight_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    vocab_start: int,
    bias_shard: Optional[torch.Tensor] = None,
    group=None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
    plan: Optional[LogprobPlan] = None,
) -> torch.Tensor:
    """Per-token log-probs with the head's vocabulary split across ``group``.

    hidden [..., D] and targets [...] (global ids or ``ignore_index``) must be the same on
    every rank; weight_shard [V_r, D] and bias_shard [V_r] are this rank's rows
    ``[vocab_start, vocab_start + V_r)`` (see :func:`vocab_shard_range`; shards may differ
    in size).  Targets are checked against the whole vocabulary (the sum of the shards);
    ``vocab_size``, when given, must equal that sum.  Same transform
    and numerics as :func:`sgdpo_fast.fused_token_logprobs`; returns float32 shaped like
    ``targets``.
    """
    from .logprob import fused_token_logprobs
    from .validate import check_int

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_token_logprobs needs an initialized torch.distributed "
                         "process group")
    vocab_start = check_int("vocab_start", vocab_start)
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    _check_shard("weight_shard", weight_shard, hidden, 2)
    _check_shard("bias_shard", bias_shard, hidden, 1)
    if weight_shard.shape[-1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard has D={weight_shard.shape[-1]} but hidden has "
                         f"D={hidden.shape[-1]}")
    if bias_shard is not None and bias_shard.shape[0] != weight_shard.shape[0]:
        raise ValueError(f"bias_shard must have shape [{weight_shard.shape[0]}] (the shard's "
                         f"rows), got {tuple(bias_shard.shape)}")
    group = group if group is not None else dist.group.WORLD
    if vocab_size is not None:
        total = torch.tensor([weight_shard.shape[0]], dtype=torch.int64)
        if dist.get_backend(group) == "nccl":
            total = total.cuda()
        dist.all_reduce(total, group=group)
        if int(total.item()) != check_int("vocab_size", vocab_size):
            raise ValueError(f"vocab_size={vocab_size} but the group's shards hold "
                             f"{int(total.item())} rows together")
    base = plan if plan is not None else LogprobPlan()
    return fused_token_logprobs(
        hidden, weight_shard, targets, bias=bias_shard, ignore_index=ignore_index,
        temperature=temperature, softcap=softcap, logit_scale=logit_scale, backend=backend,
        plan=base.replace(group=group, vocab_start=vocab_start))
