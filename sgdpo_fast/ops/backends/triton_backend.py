"""``triton`` backend: the fused kernels of ``sgdpo_fast.kernels`` (logprob_fwd, logprob_bwd).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).  Block
sizes and launch shape come from ``plan.triton`` (``TritonConfig``; unset fields take the
kernel modules' defaults).  The forward kernel writes one partial ``TokenStats`` per
vocabulary split; ``sweep.merge_stats`` combines them.
"""
from __future__ import annotations

from .. import sweep


def forward(hidden, weight, bias, targets, plan):
    from ...kernels import logprob_fwd
    tf = plan.transform
    parts = logprob_fwd.logprob_forward_partials(
        hidden, weight, bias, targets, logit_scale=tf.logit_scale, softcap=tf.softcap,
        temperature=tf.temperature, metrics=bool(plan.metrics),
        **plan.triton.kwargs(plan.triton.FORWARD))
    return sweep.merge_stats(parts)


def backward(hidden, weight, bias, targets, lse, grad, plan, needs_hidden, needs_weight,
             needs_bias):
    from ...kernels import logprob_bwd
    tf = plan.transform
    return logprob_bwd.logprob_backward(
        hidden, weight, bias, targets, lse, grad, need_hidden=needs_hidden,
        need_weight=needs_weight, need_bias=needs_bias, logit_scale=tf.logit_scale,
        softcap=tf.softcap, temperature=tf.temperature,
        **plan.triton.kwargs(plan.triton.BACKWARD))
