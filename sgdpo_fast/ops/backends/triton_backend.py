"""``triton`` backend: the fused kernels of ``sgdpo_fast.kernels`` (logprob_fwd, logprob_bwd).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
Block sizes are the kernels' module defaults; ``BLOCKS`` overrides them
(tests use small blocks so tiny shapes still span several tiles).
"""
from __future__ import annotations

from ...kernels import logprob_bwd, logprob_fwd

BLOCKS: dict = {}  # e.g. {"block_n": 16, "block_v": 32, "block_d": 16}


def forward(hidden, weight, bias, targets, ignore_index, tf):
    return logprob_fwd.logprob_forward(
        hidden, weight, bias, targets, ignore_index, logit_scale=tf.logit_scale,
        softcap=tf.softcap, temperature=tf.temperature, **BLOCKS)


def backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
             needs_hidden, needs_weight, needs_bias):
    return logprob_bwd.logprob_backward(
        hidden, weight, bias, targets, lse, grad, need_hidden=needs_hidden,
        need_weight=needs_weight, need_bias=needs_bias, logit_scale=tf.logit_scale,
        softcap=tf.softcap, temperature=tf.temperature, **BLOCKS)
