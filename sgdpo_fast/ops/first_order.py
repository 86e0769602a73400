"""First-order-only gradients: what the custom ops return under ``create_graph=True``.

The op's backward and the pairwise loss's backward compute closed-form gradients that are
not themselves differentiable.  Returning them plainly would make a second-order gradient
through them a silent zero; wrapping them in ``_FirstOrderOnly`` makes differentiating
them an error that says why."""
from __future__ import annotations

import torch


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a gradient, connected to the op's inputs: differentiating it (a
    second-order gradient through the op) raises, never gives a silent zero."""

    @staticmethod
    def forward(ctx, grad, name, *anchors):
        ctx.name = name
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise NotImplementedError(
            f"{ctx.name} has no second-order gradients (a gradient of its gradient); use a "
            f"materialized (eager) computation for double backward")


def first_order(grads, inputs, name: str):
    """``grads`` as they are, or, under ``create_graph=True``, each wrapped so that
    differentiating it raises ``NotImplementedError`` naming ``name``."""
    if not torch.is_grad_enabled():
        return tuple(grads)
    anchors = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    return tuple(None if g is None else _FirstOrderOnly.apply(g, name, *anchors) for g in grads)
