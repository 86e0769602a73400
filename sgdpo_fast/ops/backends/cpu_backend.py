"""``cpu`` backend: tiled MKL GEMMs (through torch) plus a fused epilogue.

The epilogue is the C++ one from ``sgdpo_fast._C`` when the extension is built,
else the torch epilogue with the same semantics (``epilogue_torch``).
Set ``epilogue="torch"`` or ``"native"`` to force one (the benchmark compares them).
"""
from __future__ import annotations

from . import epilogue_torch, tiled
from .. import native


def _epilogue(kind: str = "auto"):
    if kind == "torch":
        return epilogue_torch
    ep = native.cpu_epilogue()
    if ep is None:
        if kind == "native":
            raise RuntimeError("the C++ extension sgdpo_fast._C is not built: " + native.why_missing())
        return epilogue_torch
    return ep


EPILOGUE = "auto"  # module-level switch read at call time (bench/tests set it)


def forward(hidden, weight, bias, targets, ignore_index, tf):
    return tiled.forward(hidden, weight, bias, targets, ignore_index, tf, _epilogue(EPILOGUE))


def backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
             needs_hidden, needs_weight, needs_bias):
    return tiled.backward(hidden, weight, bias, targets, ignore_index, tf, lse, grad,
                          needs_hidden, needs_weight, needs_bias, _epilogue(EPILOGUE))
