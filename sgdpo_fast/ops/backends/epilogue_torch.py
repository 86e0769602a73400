"""Pure-torch tile epilogues: the reference semantics of the C++/CUDA epilogues in csrc/.

Each function takes one fp32 tile of *raw* logits ``x = h_blk @ W[v0:v0+vt].T (+ b)`` for
``n`` tokens and ``vt`` vocabulary entries starting at ``v0`` (see ``ops/sweep.py``).

``fold_tile_(x, v0, targets, m, s, tgt, tf)``
    x [n, vt] fp32 (read only), targets [n] int64 (any value outside the tile is simply
    not found in it), m/s/tgt [n] fp32 updated in place: running max, running sum of
    ``exp(z - m)``, and the transformed target logit (unchanged unless the target falls
    in this tile).

``fold_tile_metrics_(x, v0, targets, m, s, tgt, extra, tf)``
    the same, plus ``extra`` [4, n] fp64 (``sweep.EXTRA``): ``sum exp(z - m) z``,
    ``sum exp(2 (z - m))``, ``sum z`` and the first id attaining the max.

``grad_tile_(x, v0, targets, lse, g, tf)``
    x [n, vt] fp32 overwritten in place with ``dL/dx = g * (onehot - softmax(z)) * dz/dx``;
    lse [n] fp32 (of the transformed logits), g [n] fp32 upstream gradient.
"""
from __future__ import annotations

import torch

from ..transform import LogitTransform


def _target_in_tile(targets: torch.Tensor, v0: int, vt: int):
    local = targets - v0
    inside = (local >= 0) & (local < vt)
    return inside, local.clamp(0, vt - 1)


def _fold_max(z, m):
    """``(m_new, m_use, r)``: the new running max, the max to subtract ("safe max": a row
    whose logits so far are all -inf subtracts 0, since exp(-inf - -inf) is NaN; exp(-inf)
    then adds nothing), and the factor ``exp(m - m_use)`` that rescales the old sums."""
    m_new = torch.maximum(m, z.amax(dim=1))
    m_use = torch.where(m_new == float("-inf"), torch.zeros_like(m_new), m_new)
    return m_new, m_use, torch.exp(m - m_use)


def _fold_target(z, v0, targets, tgt):
    inside, idx = _target_in_tile(targets, v0, z.shape[1])
    tgt.copy_(torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), tgt))


def fold_tile_(x, v0: int, targets, m, s, tgt, tf: LogitTransform) -> None:
    z = tf.apply(x)
    m_new, m_use, r = _fold_max(z, m)
    s.mul_(r).add_(torch.exp(z - m_use[:, None]).sum(dim=1))
    m.copy_(m_new)
    _fold_target(z, v0, targets, tgt)


def fold_tile_metrics_(x, v0: int, targets, m, s, tgt, extra, tf: LogitTransform) -> None:
    z = tf.apply(x)
    tile_max, tile_arg = z.max(dim=1)  # first maximal index, as torch.argmax
    m_new, m_use, r = _fold_max(z, m)
    e = torch.exp(z - m_use[:, None])
    sz, s2, zsum, arg = extra.unbind(0)
    r64 = r.double()
    s.mul_(r).add_(e.sum(dim=1))
    # exp(-inf) * -inf is NaN: masked entries add 0 to sum p*z
    sz.mul_(r64).add_(torch.where(e > 0, e * z, torch.zeros_like(z)).sum(dim=1, dtype=torch.float64))
    s2.mul_(r64 * r64).add_((e * e).sum(dim=1, dtype=torch.float64))
    zsum.add_(z.sum(dim=1, dtype=torch.float64))
    arg.copy_(torch.where(tile_max > m, (tile_arg + v0).double(), arg))
    m.copy_(m_new)
    _fold_target(z, v0, targets, tgt)


def grad_tile_(x, v0: int, targets, lse, g, tf: LogitTransform) -> None:
    vt = x.shape[1]
    z, dzdx = tf.apply_with_derivative(x)
    dz = torch.exp(z - lse[:, None]).mul_(-g[:, None])
    inside, idx = _target_in_tile(targets, v0, vt)
    dz.scatter_add_(1, idx[:, None], torch.where(inside, g, torch.zeros_like(g))[:, None])
    x.copy_(dz.mul_(dzdx))
