"""No-gradient per-token statistics of the LM head's next-token distribution.

TRL's trainers log, next to the log-probs, the entropy, the mean logit and
whether the label is the argmax, and WPO weights use ``log(sum_v p_v^2)``.
They are metrics (never differentiated by the DPO family), so they are computed
here without autograd, one ``[BLOCK_N, BLOCK_V]`` logit tile at a time with an
online rescaling: never ``[N, V]``.  This is one extra forward GEMM over the
vocabulary, paid only when a caller asks for these fields.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

from ..ops.transform import LogitTransform

STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")
BLOCK_N = 1024        # tokens per tile
TILE_ELEMS = 1 << 22  # fp32 elements of one logit tile (16 MiB)


@torch.no_grad()
def head_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
               targets: torch.Tensor, tf: LogitTransform, which: Sequence[str]
               ) -> Dict[str, torch.Tensor]:
    """Statistics of ``softmax(z)``, ``z = tf(hidden @ weight.T + bias)``, per token.

    hidden [N, D] and weight [V, D] one float dtype, bias [V] or None, targets [N]
    int64 (any value; used only by ``is_top1``, a target outside ``[0, V)`` is
    never top-1).  ``which`` is a subset of ``STATS``.  Returns a dict of [N]
    tensors: float32 for entropy / log_sum_sq_probs / mean_logits (of the
    transformed logits), bool for is_top1 (label is the *first* argmax, as
    ``torch.argmax`` breaks ties).
    """
    unknown = set(which) - set(STATS)
    if unknown:
        raise ValueError(f"which: unknown statistics {sorted(unknown)}; known {STATS}")
    N, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    out: Dict[str, torch.Tensor] = {}
    if not which:
        return out
    block_n = max(1, min(N, BLOCK_N))
    block_v = max(1, min(V, TILE_ELEMS // block_n))
    m = torch.full((N,), -math.inf, **f32)       # running max
    s = torch.zeros(N, **f32)                    # sum exp(z - m)
    sz = torch.zeros(N, **f32)                   # sum exp(z - m) * z
    s2 = torch.zeros(N, **f32)                   # sum exp(2 (z - m))
    zsum = torch.zeros(N, **f32)                 # sum z
    tgt = torch.full((N,), -math.inf, **f32)     # target logit
    before = torch.full((N,), -math.inf, **f32)  # max over ids < target
    for n0 in range(0, N, block_n):
        n1 = min(N, n0 + block_n)
        h, t = hidden[n0:n1], targets[n0:n1]
        for v0 in range(0, V, block_v):
            v1 = min(V, v0 + block_v)
            x = h @ weight[v0:v1].t()
            if bias is not None:
                x = x + bias[v0:v1]
            z = tf.apply(x.float())
            mb, sb = m[n0:n1], s[n0:n1]
            m_new = torch.maximum(mb, z.amax(dim=1))
            r = torch.exp(mb - m_new)
            e = torch.exp(z - m_new[:, None])
            sb.mul_(r).add_(e.sum(1))
            sz[n0:n1].mul_(r).add_((e * z).sum(1))
            s2[n0:n1].mul_(r * r).add_((e * e).sum(1))
            zsum[n0:n1] += z.sum(1)
            mb.copy_(m_new)
            local = t - v0
            inside = (local >= 0) & (local < v1 - v0)
            idx = local.clamp(0, v1 - v0 - 1)
            tgt[n0:n1] = torch.where(inside, z.gather(1, idx[:, None]).squeeze(1), tgt[n0:n1])
            cols = torch.arange(v0, v1, device=dev)
            earlier = cols[None, :] < t[:, None]
            before[n0:n1] = torch.maximum(
                before[n0:n1], z.masked_fill(~earlier, -math.inf).amax(dim=1))
    lse = m + torch.log(s)
    if "entropy" in which:
        out["entropy"] = lse - sz / s
    if "log_sum_sq_probs" in which:
        out["log_sum_sq_probs"] = torch.log(s2) - 2.0 * torch.log(s)
    if "mean_logits" in which:
        out["mean_logits"] = zsum / V
    if "is_top1" in which:
        out["is_top1"] = (tgt >= m) & (tgt > before)
    return out
