"""Pure-torch tile epilogues: the reference semantics of the C++/CUDA epilogues in csrc/.

Both functions take one fp32 tile of *raw* logits ``x = h_blk @ W[v0:v0+vt].T (+ b)``
for ``n`` tokens and ``vt`` vocabulary entries starting at ``v0``.

``fold_tile_(x, v0, targets, m, s, tgt, tf)``
    x [n, vt] fp32 (read only), targets [n] int64 (any value outside the tile,
    ignore_index included, is simply not found in it), m/s/tgt [n] fp32 updated
    in place: running max, running sum of exp(z - m), and the transformed target
    logit (left unchanged unless the target falls in this tile).

``grad_tile_(x, v0, targets, lse, g, tf)``
    x [n, vt] fp32 overwritten in place with ``dL/dx = g * (onehot - softmax(z)) * dz/dx``;
    lse [n] fp32 (of the transformed logits), g [n] fp32 upstream gradient
    (already zero at ignored positions).
"""
from __future__ import annotations

import torch

from ..transform import LogitTransform


def _target_in_tile(targets: torch.Tensor, v0: int, vt: int):
    local = targets - v0
    inside = (local >= 0) & (local < vt)
    return inside, local.clamp(0, vt - 1)


def fold_tile_(x, v0: int, targets, m, s, tgt, tf: LogitTransform) -> None:
    vt = x.shape[1]
    z = tf.apply(x)
    m_new = torch.maximum(m, z.amax(dim=1))
    # "safe max": a row whose logits so far are all -inf (masked vocabulary, e.g. a -inf
    # bias over padded entries) subtracts 0 instead, since exp(-inf - -inf) is NaN;
    # exp(-inf - 0) = 0 then adds nothing and leaves s = 0
    m_use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    s.mul_(torch.exp(m - m_use)).add_(torch.exp(z - m_use[:, None]).sum(dim=1))
    m.copy_(m_new)
    inside, idx = _target_in_tile(targets, v0, vt)
    tgt.copy_(torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), tgt))


def grad_tile_(x, v0: int, targets, lse, g, tf: LogitTransform) -> None:
    vt = x.shape[1]
    z, dzdx = tf.apply_with_derivative(x)
    dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])
    inside, idx = _target_in_tile(targets, v0, vt)
    dz.scatter_add_(1, idx[:, None], torch.where(inside, g, torch.zeros_like(g))[:, None])
    x.copy_(dz.mul_(dzdx))
