"""``torch`` backend: the tiled driver (``ops/sweep.py``) with the pure-torch epilogue.

Runs on any device; the fallback where no extension is built, and the reference of the
native epilogues' semantics.  Memory: one logit tile (``plan.tiles``) plus the fp32
accumulators of the backward.
"""
from __future__ import annotations

from .. import sweep
from . import epilogue_torch


def forward(hidden, weight, bias, targets, plan):
    return sweep.forward_stats(hidden, weight, bias, targets, plan.transform, epilogue_torch,
                               plan.tiles, metrics=bool(plan.metrics))


def backward(hidden, weight, bias, targets, lse, grad, plan, needs_hidden, needs_weight,
             needs_bias):
    return sweep.backward_tiled(hidden, weight, bias, targets, lse, grad, plan.transform,
                                epilogue_torch, plan.tiles, needs_hidden, needs_weight, needs_bias)
