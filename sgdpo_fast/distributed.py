"""Scale: the log-prob op under torch.distributed.

Two things live here.

1. **Vocab-parallel log-probs** (:func:`vocab_parallel_token_logprobs`).  Each
   rank of ``group`` holds a contiguous vocabulary shard ``weight[start:end]``
   ([V_r, D], plus the bias shard) and the *same* tokens (hidden [N, D],
   targets [N], replicated, as in Megatron-style tensor parallelism).  Forward:
   every rank folds its shard into a local logsumexp ``lse_r`` and, for the
   targets it owns, the target logit; then two collectives, an all-reduce MAX of
   ``lse_r`` and one all-reduce SUM of the stacked ``[exp(lse_r - max),
   target logit]``, give ``lse = max + log(sum)`` and the target logit on every
   rank.  Backward is local: each rank recomputes its tiles with the *global*
   lse, so ``dW_r`` (and ``db_r``) belong to its shard and stay local; the
   partial ``dH`` is all-reduced (SUM).  Never more than one logit tile of the
   shard is alive.  A plain ``torch.autograd.Function`` (no torch.func).

2. **Head handling for sharded data parallelism** (:func:`head_module_logprobs`,
   :func:`lm_head_logprobs`, :func:`gathered_lm_head`).  The fused op reads ``lm_head.weight`` directly
   instead of calling the ``lm_head`` module, so sharded parameters must be
   made whole around it:

   * DeepSpeed ZeRO-3: parameters carry ``ds_id`` and are empty outside their
     module's forward.  ``lm_head_logprobs`` gathers them with
     ``deepspeed.zero.GatheredParameters`` in the forward *and again in the
     backward* (the backward recomputes the logit tiles), so the weight is whole
     only while the op runs.  Run it inside the model's forward (as
     :func:`sgdpo_fast.apply_fused_lm_head` does), so ZeRO-3's gradient hooks
     are armed.  Tested on CPU with DeepSpeed 0.19.8 (tests/test_distributed.py,
     skipped where DeepSpeed is not installed, as in CI).
   * FSDP2 (``torch.distributed.fsdp.fully_shard``): inside the root module's
     forward the root's parameters (``lm_head`` included, unless it was
     ``fully_shard``-ed on its own) are already unsharded plain tensors and
     nothing is needed.  When ``lm_head`` is its own FSDP unit, its parameters
     are ``DTensor`` shards there: :func:`head_module_logprobs` runs the op as a
     registered FSDP forward method of the head (``register_fsdp_forward_method``),
     so FSDP2 unshards it, re-unshards it for the backward's recompute and
     reduce-scatters its gradient.  (``DTensor.full_tensor()`` would be wrong
     for training: its backward slices the local gradient, with no reduction
     across data-parallel ranks; :func:`lm_head_logprobs` refuses it then.)
     For gradient-free use (reference model, evaluation), :func:`gathered_lm_head`
     unshards an ``FSDPModule`` with ``module.unshard()`` / ``module.reshard()``.
   * DDP and single process: nothing to do.
"""
from __future__ import annotations

import contextlib
import math
from typing import Callable, Optional, Tuple

import torch
import torch.distributed as dist

from .ops import backends
from .ops.backends import epilogue_torch, tiled
from .ops.logprob import FusedTokenLogprobFunction, as_dtype, fused_token_logprobs
from .ops.transform import LogitTransform
from .ops import native

__all__ = [
    "vocab_shard_range",
    "shard_lm_head",
    "VocabParallelLogprobFunction",
    "vocab_parallel_token_logprobs",
    "lm_head_logprobs",
    "head_module_logprobs",
    "gathered_lm_head",
    "is_zero3_param",
]


# ----------------------------------------------------------------------------- vocab-parallel

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


def _epilogue(device: torch.device):
    ep = native.cuda_epilogue() if device.type == "cuda" else native.cpu_epilogue()
    return epilogue_torch if ep is None else ep


class VocabParallelLogprobFunction(torch.autograd.Function):
    """(hidden [N,D], weight_shard [V_r,D], bias_shard [V_r]|None, targets [N] int64) -> logp [N] fp32.

    ``targets`` are global vocabulary ids (or ``ignore_index``), identical on
    every rank of ``group``; ``vocab_start`` is this rank's first id.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, vocab_start, ignore_index, tf, group):
        N, Vr = hidden.shape[0], weight.shape[0]
        dev = hidden.device
        f32 = dict(dtype=torch.float32, device=dev)
        valid = targets != ignore_index
        local = targets - vocab_start
        owned = valid & (local >= 0) & (local < Vr)
        # -1 is outside every tile: rows whose target another rank owns (or
        # that are ignored) get no one-hot term here.
        t_loc = torch.where(owned, local, torch.full_like(local, -1))
        m = torch.full((N,), -math.inf, **f32)
        s = torch.zeros(N, **f32)
        tgt = torch.zeros(N, **f32)
        if Vr > 0 and N > 0:
            ep = _epilogue(dev)
            block_n, block_v = tiled.tile_shape(N, Vr)
            buf = torch.empty(block_n * block_v, **f32)
            for n0 in range(0, N, block_n):
                n1 = min(N, n0 + block_n)
                for v0 in range(0, Vr, block_v):
                    v1 = min(Vr, v0 + block_v)
                    x = buf[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
                    tiled._tile(hidden[n0:n1], weight[v0:v1],
                                None if bias is None else bias[v0:v1], x)
                    ep.fold_tile_(x, v0, t_loc[n0:n1], m[n0:n1], s[n0:n1], tgt[n0:n1], tf)
        lse_loc = m + torch.log(s)                       # -inf on an empty shard
        gmax = lse_loc.clone()
        dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
        # Every row has at least one logit somewhere, so gmax is finite.
        packed = torch.stack([torch.exp(lse_loc - gmax),
                              torch.where(owned, tgt, torch.zeros_like(tgt))])
        dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
        lse = gmax + torch.log(packed[0])
        logp = torch.where(valid, packed[1] - lse, torch.zeros_like(lse))
        ctx.save_for_backward(hidden, weight, bias, t_loc, valid, lse)
        ctx.tf, ctx.group = tf, group
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, t_loc, valid, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        g = torch.where(valid, grad_logp.float(), torch.zeros((), device=lse.device)).contiguous()
        need_b = need_b and bias is not None
        if weight.shape[0] > 0 and hidden.shape[0] > 0:
            dH, dW, db = tiled.backward(hidden, weight, bias, t_loc, -1, ctx.tf, lse, g,
                                        need_h, need_w, need_b, _epilogue(hidden.device))
        else:
            dH = torch.zeros_like(hidden) if need_h else None
            dW = torch.zeros_like(weight) if need_w else None
            db = torch.zeros_like(bias) if need_b else None
        if need_h:
            # Every rank holds a partial dH (its shard's columns): sum them.
            # The collective runs in fp32 so bf16 partials do not lose bits.
            acc = dH.float() if dH.dtype != torch.float32 else dH
            dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=ctx.group)
            dH = acc.to(hidden.dtype)
        return dH, dW, db, None, None, None, None, None


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
) -> torch.Tensor:
    """Per-token log-probs with the head's vocabulary split across ``group``.

    hidden [..., D] and targets [...] (global ids or ``ignore_index``) must be
    the same on every rank; weight_shard [V_r, D] and bias_shard [V_r] are
    this rank's rows ``[vocab_start, vocab_start + V_r)`` (see
    :func:`vocab_shard_range`; shards may differ in size).  ``vocab_size``
    (the full V) enables the target range check.  Same transform and numerics
    as :func:`sgdpo_fast.fused_token_logprobs`; returns float32 shaped like
    ``targets``.  Every rank must call it (it runs collectives), and every rank
    must run the backward.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocab_parallel_token_logprobs needs an initialized torch.distributed process group")
    for name, t in (("hidden", hidden), ("weight_shard", weight_shard)):
        if not isinstance(t, torch.Tensor) or t.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"{name} must be a float32/float16/bfloat16 tensor")
    if weight_shard.dim() != 2 or weight_shard.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight_shard must be [V_r, D={hidden.shape[-1]}], got {tuple(weight_shard.shape)}")
    if weight_shard.dtype != hidden.dtype or weight_shard.device != hidden.device:
        raise ValueError("weight_shard must have hidden's dtype and device")
    if bias_shard is not None and (tuple(bias_shard.shape) != (weight_shard.shape[0],)
                                   or bias_shard.dtype != hidden.dtype):
        raise ValueError(f"bias_shard must be [{weight_shard.shape[0]}] in hidden's dtype")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError("targets must be an integer tensor")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1]")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")
    if temperature <= 0 or (softcap is not None and softcap <= 0):
        raise ValueError("temperature and softcap must be positive")
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if vocab_size is not None:
        bad = (t1 != ignore_index) & ((t1 < 0) | (t1 >= vocab_size))
        if bool(bad.any()):
            raise ValueError(f"targets has ids outside [0, {vocab_size}) that are not ignore_index")
    tf = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    D = hidden.shape[-1]
    logp = VocabParallelLogprobFunction.apply(
        hidden.reshape(-1, D).contiguous(), weight_shard.contiguous(),
        None if bias_shard is None else bias_shard.contiguous(), t1,
        int(vocab_start), int(ignore_index), tf, group)
    return logp.reshape(targets.shape)


# ----------------------------------------------------------------------------- sharded heads

def is_zero3_param(p) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter."""
    return p is not None and hasattr(p, "ds_id") and hasattr(p, "ds_status")


def _zero3_gather(params):
    """Context gathering ZeRO-3 params that are not already available (else a null context)."""
    params = [p for p in params if is_zero3_param(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed  # only reached when the parameters are ZeRO-3 ones
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    todo = list({id(p): p for p in params if p.ds_status != ZeroParamStatus.AVAILABLE}.values())
    return deepspeed.zero.GatheredParameters(todo) if todo else contextlib.nullcontext()


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover - old torch
        return False
    return isinstance(t, DTensor)


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                     bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                     temperature: float = 1.0, softcap: Optional[float] = None,
                     logit_scale: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """:func:`sgdpo_fast.fused_token_logprobs` on a head that may be sharded.

    ``weight`` / ``bias`` are the head's parameters as the model holds them:
    plain tensors (single process, DDP, FSDP2 inside the root forward),
    ``DTensor`` shards (FSDP2: made whole with the differentiable
    ``full_tensor()``), or ZeRO-3 partitioned parameters (gathered around the
    forward and the backward).  ``hidden``'s dtype is the compute dtype: a head
    held in another dtype (fp32 weights under bf16 autocast) is cast to it,
    differentiably.  Same shapes and numerics as the op.
    """
    if _is_dtensor(weight) or _is_dtensor(bias):
        if torch.is_grad_enabled() and any(
                isinstance(p, torch.Tensor) and p.requires_grad for p in (weight, bias)):
            # full_tensor()'s backward only slices the local gradient: under data
            # parallelism the ranks' gradients would never be reduced.
            raise ValueError(
                "weight is a sharded DTensor: pass the lm_head module to head_module_logprobs() "
                "(FSDP2 then unshards it and reduce-scatters its gradient), or call this inside the "
                "forward of the FSDP unit that owns it")
        weight = weight.full_tensor() if _is_dtensor(weight) else weight
        bias = bias.full_tensor() if _is_dtensor(bias) else bias
    if not (is_zero3_param(weight) or is_zero3_param(bias)):
        if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
            weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
            if bias is not None and bias.dtype != hidden.dtype:
                bias = bias.to(hidden.dtype)
        return fused_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                    temperature=temperature, softcap=softcap,
                                    logit_scale=logit_scale, backend=backend)
    gather: Callable = lambda: _zero3_gather([weight, bias])  # noqa: E731
    with gather():  # validate against the whole weight, then run the gathering Function
        from .ops.validate import validate_logprob_inputs
        validate_logprob_inputs(hidden, as_dtype(weight, hidden.dtype), targets, as_dtype(bias, hidden.dtype),
                                ignore_index, temperature, softcap, logit_scale)
        V = weight.shape[0]
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D).contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    name = backends.resolve(backend, hidden.device, h2.shape[0], V, D)
    tf = LogitTransform(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    logp = FusedTokenLogprobFunction.apply(h2, weight, bias, t1, int(ignore_index), tf, name, gather)
    return logp.reshape(targets.shape)


def _is_fsdp_module(m) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - old torch
        return False
    return isinstance(m, FSDPModule)


def _head_method(self, hidden, targets, kw):
    return lm_head_logprobs(hidden, self.weight, targets, bias=getattr(self, "bias", None), **kw)


_FSDP_METHOD = "_sgdpo_fast_logprobs"


def head_module_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         **kw) -> torch.Tensor:
    """:func:`lm_head_logprobs` on ``lm_head.weight`` / ``lm_head.bias``, for any wrapping.

    When ``lm_head`` is its own FSDP2 unit (``fully_shard(model.lm_head)``), the
    op runs as a registered FSDP forward method of it
    (``torch.distributed.fsdp.register_fsdp_forward_method``): FSDP2 unshards
    the head before, reshards it after, unshards it again for the backward's
    recompute and reduce-scatters its gradient, exactly as for ``lm_head(h)``.
    Keyword arguments are those of :func:`lm_head_logprobs`.
    """
    if _is_fsdp_module(lm_head):
        if _FSDP_METHOD not in lm_head.__dict__:
            from torch.distributed.fsdp import register_fsdp_forward_method
            setattr(lm_head, _FSDP_METHOD, _head_method.__get__(lm_head, type(lm_head)))
            register_fsdp_forward_method(lm_head, _FSDP_METHOD)
        return getattr(lm_head, _FSDP_METHOD)(hidden, targets, kw)
    return _head_method(lm_head, hidden, targets, kw)


@contextlib.contextmanager
def gathered_lm_head(lm_head: torch.nn.Module):
    """Context yielding ``(weight, bias)`` of ``lm_head`` as whole tensors.

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the head's parameters.
    * FSDP2, ``lm_head`` an ``FSDPModule`` (it was ``fully_shard``-ed): ``unshard()``
      on entry and ``reshard()`` on exit.  Gradients reaching the unsharded
      parameters outside the module's own forward are not reduce-scattered, so
      use this for gradient-free passes (reference model, evaluation); for
      training use :func:`lm_head_logprobs` inside the model's forward.
    * ``DTensor`` parameters of a module that is not itself an FSDP unit:
      ``full_tensor()`` copies.
    * Otherwise the parameters as they are.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if is_zero3_param(weight) or is_zero3_param(bias):
        with _zero3_gather([weight, bias]):
            yield lm_head.weight, getattr(lm_head, "bias", None)
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - old torch
        FSDPModule = ()
    if FSDPModule and isinstance(lm_head, FSDPModule):
        lm_head.unshard()
        try:
            yield lm_head.weight, getattr(lm_head, "bias", None)
        finally:
            lm_head.reshard()
        return
    if _is_dtensor(weight):
        yield weight.full_tensor(), (bias.full_tensor() if _is_dtensor(bias) else bias)
        return
    yield weight, bias
