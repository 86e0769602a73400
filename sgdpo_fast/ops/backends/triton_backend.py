"""``triton`` backend: the fused kernels of ``sgdpo_fast.kernels``.

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).  Block sizes
and launch shape come from ``plan.triton`` (``TritonConfig``; unset fields take the config
table of ``kernels/logprob_configs.py``, keyed on (D, V, dtype)).

Forward: ``kernels/logprob_fwd.py`` writes one partial ``TokenStats`` per vocabulary split;
``sweep.merge_stats`` combines them.  Backward: the tiled driver ``sweep.backward`` with the
gradient-tile kernel of ``kernels/logprob_bwd.py`` as its producer (one recompute of each
logit tile; the dX slab feeds the dH and dW GEMMs).
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
    n, D = hidden.shape
    V = weight.shape[0]
    tc = plan.triton
    cfg = logprob_bwd.kernel_config(D, V, hidden.dtype, bias is not None,
                                    plan.transform.softcap is not None, **tc.kwargs(tc.KERNEL))
    block_n, block_v = logprob_bwd.slab_shape(
        max(n, 1), max(V, 1), hidden.element_size(), cfg, tc.slab_bytes or logprob_bwd.SLAB_BYTES)
    producer = logprob_bwd.GradTiles(plan.transform, hidden.dtype, hidden.device, block_n,
                                     block_v, cfg)
    return sweep.backward(hidden, weight, bias, targets, lse, grad, producer, block_n, block_v,
                          tc.scratch_bytes or logprob_bwd.SCRATCH_BYTES, needs_hidden,
                          needs_weight, needs_bias)
