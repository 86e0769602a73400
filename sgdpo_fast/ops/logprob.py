"""``fused_token_logprobs``: log p(target | hidden) without the [N, V] logits.

One plain ``torch.autograd.Function`` (no torch.func inside, so it composes with
DDP, ZeRO-3 and FSDP2) over the backends in ``backends/``.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch

from . import backends
from .transform import LogitTransform
from .validate import validate_logprob_inputs


def as_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Contiguous ``t`` in ``dtype`` (None stays None)."""
    if t is None:
        return None
    return (t if t.dtype == dtype else t.to(dtype)).contiguous()


class FusedTokenLogprobFunction(torch.autograd.Function):
    """Forward: (hidden [N,D], weight [V,D], bias [V]|None, targets [N] int64) -> logp [N] fp32.

    ``gather`` (optional): a zero-argument callable returning a context manager inside which
    ``weight`` and ``bias`` hold their full values (DeepSpeed ZeRO-3's GatheredParameters);
    it is entered in forward and again in backward, which recomputes the logit tiles.
    Weight and bias are used in the hidden states' dtype; their gradients come back in
    their own dtype.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, tf, backend, gather=None):
        with gather() if gather is not None else contextlib.nullcontext():
            logp, lse = backends.get(backend).forward(
                hidden, as_dtype(weight, hidden.dtype), as_dtype(bias, hidden.dtype), targets,
                ignore_index, tf)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.ignore_index, ctx.tf, ctx.backend, ctx.gather = ignore_index, tf, backend, gather
        ctx.mark_non_differentiable(lse)
        return logp

    @staticmethod
    def backward(ctx, grad_logp):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if grad_logp is None or not (need_h or need_w or need_b):
            return (None,) * 8
        valid = targets != ctx.ignore_index
        g = torch.where(valid, grad_logp.float(), torch.zeros((), device=grad_logp.device))
        with ctx.gather() if ctx.gather is not None else contextlib.nullcontext():
            dH, dW, db = backends.get(ctx.backend).backward(
                hidden, as_dtype(weight, hidden.dtype), as_dtype(bias, hidden.dtype), targets,
                ctx.ignore_index, ctx.tf, lse, g.contiguous(), need_h, need_w,
                need_b and bias is not None)
        dW = None if dW is None else dW.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dH, dW, db, None, None, None, None, None


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
) -> torch.Tensor:
    """Per-token ``log softmax(z)[target]`` with ``z = transform(hidden @ weight.T + bias)``.

    hidden [..., D] (fp32/fp16/bf16), weight [V, D] same dtype and device,
    targets [...] integer shaped like ``hidden.shape[:-1]``, bias [V] optional.
    The transform is ``logit_scale``, then ``softcap * tanh(./softcap)``, then
    ``/ temperature``.  Returns float32 shaped like ``targets``: 0 at
    ``ignore_index`` positions (whose gradient is exactly 0 too).
    Differentiable w.r.t. hidden, weight and bias.
    """
    validate_logprob_inputs(hidden, weight, targets, bias, ignore_index,
                            temperature, softcap, logit_scale)
    out_shape = targets.shape
    D = hidden.shape[-1]
    h2 = hidden.reshape(-1, D).contiguous()
    t1 = targets.reshape(-1).to(torch.int64).contiguous()
    if h2.shape[0] == 0:
        return (h2.sum(-1) * 0 + weight.sum() * 0).float().reshape(out_shape)
    name = backends.resolve(backend, hidden.device, h2.shape[0], weight.shape[0], D)
    tf = LogitTransform(float(logit_scale), None if softcap is None else float(softcap),
                        float(temperature))
    logp = FusedTokenLogprobFunction.apply(
        h2, weight.contiguous(), None if bias is None else bias.contiguous(), t1,
        int(ignore_index), tf, name)
    return logp.reshape(out_shape)
