"""``cpu`` backend: the tiled driver (``ops/sweep.py``: MKL tile GEMMs through torch) with
the C++ epilogue of ``sgdpo_fast._C`` (csrc/cpu/epilogue.cpp).  ``backends.resolve``
refuses it when the extension is not built (``auto`` then picks ``torch``)."""
from __future__ import annotations

from .. import native, sweep


def _epilogue():
    ep = native.cpu_epilogue()
    if ep is None:
        raise RuntimeError("backend='cpu' needs the C++ extension: " + native.why_missing())
    return ep


def forward(hidden, weight, bias, targets, plan):
    return sweep.forward_stats(hidden, weight, bias, targets, plan.transform, _epilogue(),
                               plan.tiles, metrics=bool(plan.metrics))


def backward(hidden, weight, bias, targets, lse, grad, plan, needs_hidden, needs_weight,
             needs_bias):
    return sweep.backward_tiled(hidden, weight, bias, targets, lse, grad, plan.transform,
                                _epilogue(), plan.tiles, needs_hidden, needs_weight, needs_bias)
