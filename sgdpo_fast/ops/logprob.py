"""``fused_token_logprobs``: log p(target | hidden) without the [N, V] logits.

Two entry points run the same forward (``_forward``) and backward (``_backward``):

* the custom op ``sgdpo_fast::token_logprobs`` (``torch.library``: a fake implementation
  for shape inference and registered autograd), so ``torch.compile(fullgraph=True)``
  traces a function that calls the op as one node, with no graph break.  Its schema
  carries the resolved plan as plain values (backend name, tile and block sizes, the
  transform), so the backward runs with exactly the forward's choices.
* ``_DistributedLogprob``, a plain ``torch.autograd.Function`` holding the whole plan on
  ``ctx``, for the plans a custom op cannot carry: a ZeRO-3 gather callable or a
  vocab-parallel process group.

Data-dependent checks (targets in range) run inside the forward, where they do not
break tracing.  Rows whose target is ``ignore_index`` are dropped before the GEMMs: they
cost nothing, give exactly 0 and a zero gradient, and a NaN in such a row cannot reach
the weight gradient.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from . import backends, sweep
from .first_order import first_order
from .plan import LogprobPlan, TileConfig, TritonConfig
from .transform import LogitTransform
from .validate import check_targets, validate_logprob_inputs

__all__ = ["fused_token_logprobs", "token_logprobs", "as_dtype"]

_DEFAULT_PLAN = LogprobPlan()
_OP_NAME = "fused_token_logprobs"


def as_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Contiguous ``t`` in ``dtype`` (None stays None)."""
    if t is None:
        return None
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


# ----------------------------------------------------------------------------- the math

def _rows(targets: torch.Tensor, plan: LogprobPlan):
    """``(idx, t)``: the rows whose target is not ``ignore_index`` (``idx`` None when that is
    all of them) and their targets."""
    valid = targets != plan.ignore_index
    idx = None if bool(valid.all()) else valid.nonzero().squeeze(1)
    return idx, (targets if idx is None else targets.index_select(0, idx))


def _local_targets(t: torch.Tensor, plan: LogprobPlan, V: int) -> torch.Tensor:
    """Targets as ids of this weight's rows: vocab-parallel shifts them by the shard start
    and marks ids another rank owns with -1 (found in no tile)."""
    if plan.group is None:
        return t
    local = t - plan.vocab_start
    return torch.where((local >= 0) & (local < V), local, torch.full_like(local, -1))


def _forward(hidden, weight, bias, targets, plan: LogprobPlan):
    """hidden [N, D], weight [V, D] (or a vocabulary shard), bias [V] | None, one dtype,
    contiguous; targets [N] int64.  Returns ``(logp [N], lse [N], metrics [K, N])`` fp32,
    0 at ignored rows."""
    N, V = hidden.shape[0], weight.shape[0]
    V_total = _vocab_size(V, plan)
    if plan.group is not None and plan.vocab_start + V > V_total:
        raise ValueError(f"vocab_start={plan.vocab_start} + this shard's {V} rows pass the "
                         f"{V_total} rows the group's shards hold together")
    check_targets(targets, V_total, plan.ignore_index)
    idx, t = _rows(targets, plan)
    h = hidden if idx is None else hidden.index_select(0, idx)
    n = h.shape[0]
    if n:
        stats = backends.get(plan.backend).forward(h, weight, bias, _local_targets(t, plan, V), plan)
    else:
        stats = sweep.empty_stats(0, hidden.device, bool(plan.metrics))
    if plan.group is not None:
        from .vocab_parallel import allreduce_stats
        stats = allreduce_stats(stats, plan.group, plan.vocab_start)
    lse_c = sweep.finalize(stats)
    logp_c = stats.tgt - lse_c
    met_c = sweep.metric_values(stats, lse_c, t, V_total, plan.metrics) \
        if plan.metrics else lse_c.new_zeros((0, n))

    def scatter(v, fill_shape):
        if idx is None:
            return v
        out = v.new_zeros(fill_shape)
        out[..., idx] = v
        return out

    return (scatter(logp_c, (N,)), scatter(lse_c, (N,)),
            scatter(met_c, (len(plan.metrics), N)))


def _vocab_size(V_local: int, plan: LogprobPlan) -> int:
    """The whole vocabulary: this weight's rows, or the sum of the group's shards."""
    if plan.group is None:
        return V_local
    t = torch.tensor([V_local], dtype=torch.int64)
    if dist.get_backend(plan.group) == "nccl":
        t = t.cuda()
    dist.all_reduce(t, group=plan.group)
    return int(t.item())


def _backward(grad_logp, hidden, weight, bias, targets, lse, plan: LogprobPlan,
              needs_hidden: bool, needs_weight: bool, needs_bias: bool):
    """Gradients of ``sum(grad_logp * logp)``: ``(dH, dW, db)`` in the input dtype or None."""
    idx, t = _rows(targets, plan)
    h = hidden if idx is None else hidden.index_select(0, idx)
    g = grad_logp.float() if idx is None else grad_logp.float().index_select(0, idx)
    l = lse if idx is None else lse.index_select(0, idx)
    needs_bias = needs_bias and bias is not None
    if h.shape[0]:
        dH, dW, db = backends.get(plan.backend).backward(
            h, weight, bias, _local_targets(t, plan, weight.shape[0]), l, g.contiguous(), plan,
            needs_hidden, needs_weight, needs_bias)
    else:
        dH = h.new_zeros(h.shape) if needs_hidden else None
        dW = torch.zeros_like(weight) if needs_weight else None
        db = torch.zeros_like(bias) if needs_bias else None
    if needs_hidden and plan.group is not None:
        # every rank holds a partial dH (its shard's columns): sum them, in fp32
        acc = dH.float()
        dist.all_reduce(acc, op=dist.ReduceOp.SUM, group=plan.group)
        dH = acc.to(hidden.dtype)
    if needs_hidden and idx is not None:
        full = torch.zeros_like(hidden)
        full.index_copy_(0, idx, dH)
        dH = full
    return dH, dW, db


# ----------------------------------------------------------------------------- custom op

def _plan_from_args(ignore_index, logit_scale, softcap, temperature, backend, tiles, triton,
                    metrics) -> LogprobPlan:
    return LogprobPlan(backend=backend, tiles=TileConfig(*tiles),
                       triton=TritonConfig.from_list(triton),
                       metrics=tuple(m for m in metrics.split(",") if m),
                       transform=LogitTransform(logit_scale, softcap, temperature),
                       ignore_index=ignore_index)


@torch.library.custom_op("sgdpo_fast::token_logprobs", mutates_args=())
def _token_logprobs_op(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       targets: torch.Tensor, ignore_index: int, logit_scale: float,
                       softcap: Optional[float], temperature: float, backend: str,
                       tiles: List[int], triton: List[int], metrics: str
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_from_args(ignore_index, logit_scale, softcap, temperature, backend, tiles,
                           triton, metrics)
    return _forward(hidden, weight, bias, targets, plan)


@_token_logprobs_op.register_fake
def _token_logprobs_fake(hidden, weight, bias, targets, ignore_index, logit_scale, softcap,
                         temperature, backend, tiles, triton, metrics):
    N = hidden.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    return (hidden.new_empty((N,), **f32), hidden.new_empty((N,), **f32),
            hidden.new_empty((len([m for m in metrics.split(",") if m]), N), **f32))


@torch.library.custom_op("sgdpo_fast::token_logprobs_backward", mutates_args=())
def _token_logprobs_bwd_op(grad_logp: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor,
                           bias: Optional[torch.Tensor], targets: torch.Tensor,
                           lse: torch.Tensor, ignore_index: int, logit_scale: float,
                           softcap: Optional[float], temperature: float, backend: str,
                           tiles: List[int], triton: List[int], needs: List[bool]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan_from_args(ignore_index, logit_scale, softcap, temperature, backend, tiles,
                           triton, "")
    with torch.no_grad():
        dH, dW, db = _backward(grad_logp, hidden, weight, bias, targets, lse, plan, *needs)
    empty = hidden.new_empty((0,))
    return (empty if dH is None else dH, empty.clone() if dW is None else dW,
            empty.clone() if db is None else db)


@_token_logprobs_bwd_op.register_fake
def _token_logprobs_bwd_fake(grad_logp, hidden, weight, bias, targets, lse, ignore_index,
                             logit_scale, softcap, temperature, backend, tiles, triton, needs):
    empty = lambda: hidden.new_empty((0,))  # noqa: E731
    return (torch.empty_like(hidden) if needs[0] else empty(),
            torch.empty_like(weight) if needs[1] else empty(),
            torch.empty_like(bias) if (needs[2] and bias is not None) else empty())


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    ctx.save_for_backward(hidden, weight, bias, targets, output[1])
    ctx.op_args = inputs[4:11]  # ignore_index ... triton
    ctx.has_bias = bias is not None


def _op_backward(ctx, grad_logp, _grad_lse, _grad_metrics):
    hidden, weight, bias, targets, lse = ctx.saved_tensors
    needs = [bool(x) for x in ctx.needs_input_grad[:3]]
    needs[2] = needs[2] and ctx.has_bias
    if grad_logp is None or not any(needs):
        return (None,) * 12
    dH, dW, db = torch.ops.sgdpo_fast.token_logprobs_backward(
        grad_logp, hidden, weight, bias, targets, lse, *ctx.op_args, needs)
    grads = (dH if needs[0] else None, dW if needs[1] else None, db if needs[2] else None)
    return first_order(grads, (hidden, weight, bias, grad_logp), _OP_NAME) + (None,) * 9


_token_logprobs_op.register_autograd(_op_backward, setup_context=_setup_context)


class _DistributedLogprob(torch.autograd.Function):
    """The op for plans with a ZeRO-3 ``gather`` or a vocab-parallel ``group``: the plan
    (callable and process group included) lives on ``ctx``.  Weight and bias are cast to the
    hidden states' dtype inside the gather, differentiably (their gradients come back in
    their own dtype)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, plan):
        with plan.gather() if plan.gather is not None else contextlib.nullcontext():
            logp, lse, met = _forward(hidden, as_dtype(weight, hidden.dtype),
                                      as_dtype(bias, hidden.dtype), targets, plan)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse, met)
        return logp, lse, met

    @staticmethod
    def backward(ctx, grad_logp, _grad_lse, _grad_met):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (need_h or need_w or need_b):
            return (None,) * 5
        plan = ctx.plan
        with plan.gather() if plan.gather is not None else contextlib.nullcontext():
            dH, dW, db = _backward(grad_logp, hidden, as_dtype(weight, hidden.dtype),
                                   as_dtype(bias, hidden.dtype), targets, lse, plan,
                                   need_h, need_w, need_b and bias is not None)
        dW = None if dW is None else dW.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return first_order((dH, dW, db), (hidden, weight, bias, grad_logp), _OP_NAME) + (None, None)


# ----------------------------------------------------------------------------- public

def _pick(name: str, kw, default, planned):
    """A math argument from the keyword or, when that is left at its default, from the plan."""
    if planned == default:
        return kw
    if kw != default and kw != planned:
        raise ValueError(f"{name}={kw!r} contradicts plan's {name}={planned!r}")
    return planned


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                   temperature: float = 1.0, softcap: Optional[float] = None,
                   logit_scale: float = 1.0, backend: str = "auto",
                   plan: Optional[LogprobPlan] = None
                   ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`fused_token_logprobs` plus the metrics ``plan.metrics`` from the same sweep.

    Returns ``(logp, metrics)``: logp float32 shaped like ``targets``; metrics maps each
    name of ``plan.metrics`` to a float32 tensor shaped like ``targets`` (``is_top1`` as
    0/1), without gradient, 0 at ignored positions.
    """
    base = _DEFAULT_PLAN if plan is None else plan
    if not isinstance(base, LogprobPlan):
        raise ValueError(f"plan must be a LogprobPlan, got {type(plan).__name__}")
    # the math may come from the keywords or from the plan; both set and different is an error
    ptf = base.transform
    logit_scale = _pick("logit_scale", logit_scale, 1.0, ptf.logit_scale)
    softcap = _pick("softcap", softcap, None, ptf.softcap)
    temperature = _pick("temperature", temperature, 1.0, ptf.temperature)
    ignore_index = _pick("ignore_index", ignore_index, -100, base.ignore_index)
    validate_logprob_inputs(hidden, weight, targets, bias, ignore_index, temperature, softcap,
                            logit_scale, exact_dtypes=not base.distributed)
    if backend != "auto" and base.backend not in ("auto", backend):
        raise ValueError(f"backend={backend!r} contradicts plan.backend={base.backend!r}")
    name = backends.resolve(backend if backend != "auto" else base.backend, hidden.device.type)
    out_shape = targets.shape
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D).contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    softcap = None if softcap is None else float(softcap)
    if base.distributed:
        full = base.replace(backend=name, ignore_index=int(ignore_index),
                            transform=LogitTransform(float(logit_scale), softcap, float(temperature)))
        logp, _, met = _DistributedLogprob.apply(h2, weight, bias, t1, full)
    else:
        logp, _, met = torch.ops.sgdpo_fast.token_logprobs(
            h2, weight.contiguous(), None if bias is None else bias.contiguous(), t1,
            int(ignore_index), float(logit_scale), softcap, float(temperature), name,
            base._op_tiles, base._op_triton, ",".join(base.metrics))
    metrics = {m: met[i].detach().reshape(out_shape) for i, m in enumerate(base.metrics)}
    return logp.reshape(out_shape), metrics


def fused_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    logit_scale: float = 1.0,
    backend: str = "auto",
    plan: Optional[LogprobPlan] = None,
) -> torch.Tensor:
    """Per-token ``log softmax(z)[target]`` with ``z = transform(hidden @ weight.T + bias)``.

    hidden [..., D] (fp32/fp16/bf16), weight [V, D] same dtype and device,
    targets [...] integer shaped like ``hidden.shape[:-1]``, bias [V] optional.
    The transform is ``logit_scale``, then ``softcap * tanh(./softcap)``, then
    ``/ temperature``.  Returns float32 shaped like ``targets``: 0 at
    ``ignore_index`` positions (whose gradient is exactly 0 too).
    Differentiable w.r.t. hidden, weight and bias (first order).  ``backend`` picks the
    implementation (``auto``, ``torch``, ``cpu``, ``cuda``, ``triton``); ``plan`` (a
    :class:`~sgdpo_fast.ops.plan.LogprobPlan`) carries the other execution choices
    (tile and block sizes; the transform and ``ignore_index`` may come from it instead of
    the keywords, a contradiction is an error).  ``torch.compile(fullgraph=True)`` traces it
    as one op (build plans outside the compiled function).
    """
    return token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                          temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                          backend=backend, plan=plan)[0]
