"""The LM head under sharded data parallelism: whole weights for the fused op.

The fused op reads ``lm_head.weight`` directly instead of calling the ``lm_head`` module,
so sharded parameters must be made whole around it:

* DeepSpeed ZeRO-3: parameters carry ``ds_id`` and are empty outside their module's
  forward.  :func:`lm_head_logprobs` gathers them with ``deepspeed.zero.GatheredParameters``
  in the forward *and again in the backward* (the backward recomputes the logit tiles:
  ``LogprobPlan.gather``), so the weight is whole only while the op runs.  Run it inside
  the model's forward (as the head path of ``model/head.py`` does), so ZeRO-3's gradient
  hooks are armed.
* FSDP2 (``torch.distributed.fsdp.fully_shard``): inside the root module's forward the
  root's parameters (``lm_head`` included, unless it was ``fully_shard``-ed on its own)
  are already unsharded plain tensors and nothing is needed.  When ``lm_head`` is its own
  FSDP unit, its parameters are ``DTensor`` shards there: :func:`head_module_logprobs`
  runs the op as a registered FSDP forward method of the head
  (``register_fsdp_forward_method``), so FSDP2 unshards it, re-unshards it for the
  backward's recompute and reduce-scatters its gradient.  (``DTensor.full_tensor()``
  would be wrong for training: its backward slices the local gradient, with no reduction
  across data-parallel ranks; :func:`lm_head_logprobs` refuses it then.)  For
  gradient-free use, :func:`gathered_lm_head` unshards an ``FSDPModule`` with
  ``unshard()`` / ``reshard()``.
* DDP and single process: nothing to do.
* PEFT on the head (:func:`effective_head`): a LoRA ``lm_head`` (``peft``'s ``lora.Linear``)
  runs with its *merged* weight ``W + sum_a scaling_a * B_a @ A_a`` (and bias), built
  differentiably per call, so the op sees what the LoRA layer's forward computes and the
  adapters get their gradients (cost: one extra ``[V, D]`` tensor and its gradient).
  ``modules_to_save=["lm_head"]`` uses the active trained copy.  What a merged weight cannot
  express raises a ``ValueError``: LoRA dropout > 0 while training, DoRA and other LoRA
  variants, mixed-adapter batches, and a LoRA head whose base weight is sharded.

The vocab-parallel math (a head split by vocabulary rows) is ``ops/vocab_parallel.py``.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch

from ..ops.logprob import token_logprobs
from ..ops.plan import LogprobPlan

__all__ = ["lm_head_logprobs", "head_module_logprobs", "gathered_lm_head", "is_zero3_param",
           "effective_head"]


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


def head_logprobs_and_metrics(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                              *, bias: Optional[torch.Tensor] = None, ignore_index: int = -100,
                              temperature: float = 1.0, softcap: Optional[float] = None,
                              logit_scale: float = 1.0, backend: str = "auto",
                              plan: Optional[LogprobPlan] = None
                              ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`sgdpo_fast.ops.token_logprobs` on a head that may be sharded (see the module
    docstring); returns ``(logp, metrics of plan.metrics)``.  ``hidden``'s dtype is the
    compute dtype: a head held in another dtype (fp32 weights under bf16 autocast) is
    cast to it, differentiably."""
    kw = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
              logit_scale=logit_scale, backend=backend)
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
    if is_zero3_param(weight) or is_zero3_param(bias):
        gather = lambda: _zero3_gather([weight, bias])  # noqa: E731
        base = plan if plan is not None else LogprobPlan()
        with gather():  # validated against the whole weight; the backward gathers again
            return token_logprobs(hidden, weight, targets, bias=bias,
                                  plan=base.replace(gather=gather), **kw)
    if isinstance(hidden, torch.Tensor) and hidden.is_floating_point():
        weight = weight if weight.dtype == hidden.dtype else weight.to(hidden.dtype)
        if bias is not None and bias.dtype != hidden.dtype:
            bias = bias.to(hidden.dtype)
    return token_logprobs(hidden, weight, targets, bias=bias, plan=plan, **kw)


def lm_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                     **kw) -> torch.Tensor:
    """:func:`sgdpo_fast.fused_token_logprobs` on a head that may be sharded: plain tensors
    (single process, DDP, FSDP2 inside the root forward), ``DTensor`` shards (refused with
    gradients, see the module docstring) or ZeRO-3 partitioned parameters (gathered around
    the forward and the backward).  Keyword arguments as :func:`head_logprobs_and_metrics`."""
    return head_logprobs_and_metrics(hidden, weight, targets, **kw)[0]


def _is_fsdp_module(m) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except Exception:  # pragma: no cover - old torch
        return False
    return isinstance(m, FSDPModule)


def _is_lora_layer(m) -> bool:
    return all(hasattr(m, a) for a in ("base_layer", "lora_A", "lora_B", "scaling", "active_adapters"))


def _is_modules_to_save(m) -> bool:
    return hasattr(m, "original_module") and hasattr(m, "modules_to_save")


def effective_head(lm_head: torch.nn.Module) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(weight [V, D], bias [V] or None)`` that ``lm_head``'s own forward applies: its
    parameters, or for a PEFT LoRA head the merged weight (differentiable w.r.t. the
    adapters), for ``modules_to_save`` the active copy's (see the module docstring)."""
    if _is_modules_to_save(lm_head):
        active = [a for a in getattr(lm_head, "active_adapters", []) if a in lm_head.modules_to_save]
        off = getattr(lm_head, "disable_adapters", False) or not active
        return effective_head(lm_head.original_module if off else lm_head.modules_to_save[active[0]])
    if not _is_lora_layer(lm_head):
        return lm_head.weight, getattr(lm_head, "bias", None)
    base = lm_head.base_layer
    weight, bias = base.weight, getattr(base, "bias", None)
    if lm_head.disable_adapters:
        if lm_head.merged:            # what the LoRA layer's forward does in this state
            lm_head.unmerge()
        return base.weight, getattr(base, "bias", None)
    if lm_head.merged:
        return weight, bias
    if is_zero3_param(weight) or _is_dtensor(weight):
        raise ValueError("LoRA on a sharded (ZeRO-3 / FSDP) lm_head is not supported by the fused head: "
                         "leave 'lm_head' out of target_modules")
    for name in lm_head.active_adapters:
        if name not in lm_head.lora_A:
            continue
        if name in getattr(lm_head, "lora_variant", {}) or getattr(lm_head, "use_dora", {}).get(name):
            raise ValueError(f"adapter {name!r} on lm_head is a LoRA variant (DoRA, ...), which the fused "
                             f"head cannot merge: leave 'lm_head' out of target_modules")
        drop = lm_head.lora_dropout[name]
        if lm_head.training and torch.is_grad_enabled() and getattr(drop, "p", 0.0) > 0:
            raise ValueError(f"adapter {name!r} on lm_head has lora_dropout={drop.p}: dropout on the LoRA "
                             f"branch cannot be merged into the head weight; use lora_dropout=0 for "
                             f"lm_head (or leave it out of target_modules)")
        weight = weight + lm_head.get_delta_weight(name).to(weight.dtype)
        b_bias = getattr(lm_head.lora_B[name], "bias", None)
        if b_bias is not None:
            extra = (b_bias * lm_head.scaling[name]).to(weight.dtype)
            bias = extra if bias is None else bias + extra
    return weight, bias


def _head_method(self, hidden, targets, kw):
    weight, bias = effective_head(self)
    return head_logprobs_and_metrics(hidden, weight, targets, bias=bias, **kw)


def _fsdp_head_method(self, hidden, targets, kw):
    # FSDP2 warns about a view returned by a unit (an in-place op on it would skip its
    # pre-backward hook): return the [N] log-probs as a tensor of their own
    lp, met = _head_method(self, hidden, targets, kw)
    return (lp.clone() if lp._base is not None else lp), met


_FSDP_METHOD = "_sgdpo_fast_logprobs"


def head_module_logprobs(lm_head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                         **kw) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`head_logprobs_and_metrics` on ``lm_head.weight`` / ``lm_head.bias``, for any
    wrapping; returns ``(logp, metrics)``.

    When ``lm_head`` is its own FSDP2 unit (``fully_shard(model.lm_head)``), the op runs as
    a registered FSDP forward method of it (``register_fsdp_forward_method``): FSDP2
    unshards the head before, reshards it after, unshards it again for the backward's
    recompute and reduce-scatters its gradient, exactly as for ``lm_head(h)``.
    """
    if _is_fsdp_module(lm_head):
        if _FSDP_METHOD not in lm_head.__dict__:
            from torch.distributed.fsdp import register_fsdp_forward_method
            setattr(lm_head, _FSDP_METHOD, _fsdp_head_method.__get__(lm_head, type(lm_head)))
            register_fsdp_forward_method(lm_head, _FSDP_METHOD)
        return getattr(lm_head, _FSDP_METHOD)(hidden, targets, kw)
    return _head_method(lm_head, hidden, targets, kw)


@contextlib.contextmanager
def gathered_lm_head(lm_head: torch.nn.Module):
    """Context yielding ``(weight, bias)`` of ``lm_head`` as whole tensors, for
    gradient-free passes (gradients reaching unsharded parameters outside the module's
    own forward are not reduce-scattered).

    * ZeRO-3: ``deepspeed.zero.GatheredParameters`` over the head's parameters.
    * FSDP2, ``lm_head`` an ``FSDPModule``: ``unshard()`` on entry, ``reshard()`` on exit.
    * ``DTensor`` parameters of a module that is not itself an FSDP unit: ``full_tensor()``.
    * Otherwise the parameters as they are.
    """
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if is_zero3_param(weight) or is_zero3_param(bias):
        with _zero3_gather([weight, bias]):
            yield lm_head.weight, getattr(lm_head, "bias", None)
        return
    if _is_fsdp_module(lm_head):
        lm_head.unshard()
        try:
            yield lm_head.weight, getattr(lm_head, "bias", None)
        finally:
            lm_head.reshard()
        return
    if _is_dtensor(weight):
        yield weight.full_tensor(), (bias.full_tensor() if _is_dtensor(bias) else bias)
        return
    if _is_lora_layer(lm_head) or _is_modules_to_save(lm_head):
        yield effective_head(lm_head)
        return
    yield weight, bias
