"""fp64 references for the accuracy columns, independent of every method under test.

Plain materialized math in float64, chunked over rows and vocabulary so the GPU
shapes fit (``[ROW_CHUNK, VOCAB_CHUNK]`` fp64 tiles); the weight gradient is never
held whole in fp64: its error is accumulated tile by tile against the method's.

* logprob workload: on ``ACC_ROWS`` sampled rows, the log-prob errors (max abs, max
  rel) and the hidden-gradient relative-norm error come from the full-size run (a
  row's dH depends on that row only); the weight-gradient error from a second run of
  the method on just those rows (dW sums over all rows).
* loss workload: DPO's sigmoid loss in fp64 on the full batch; SGDPO is checked in
  a deterministic configuration, pilot ratios 1 with equal-length answers (see
  cases.make_loss_inputs), where the pilots are the whole responses: its loss equals
  DPO's and its gradient is half of DPO's (pilots are stop-gradient constants).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .cases import IGNORE_INDEX

ACC_ROWS = 256
ROW_CHUNK = 2048
VOCAB_CHUNK = 8192


def sample_rows(N: int, seed: int = 1) -> torch.Tensor:
    if N <= ACC_ROWS:
        return torch.arange(N)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(N, generator=g)[:ACC_ROWS].sort().values


def _tile_logits(h64, w, vs, ve):
    return h64 @ w[vs:ve].double().t()


def logprob64(hidden, weight, targets):
    """fp64 ``(logp [n], lse [n])``; logp 0 at ignored rows.  hidden [n, D], weight [V, D]."""
    n, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    lse = torch.empty(n, dtype=torch.float64, device=dev)
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    for rs in range(0, n, ROW_CHUNK):
        h64 = hidden[rs:rs + ROW_CHUNK].double()
        # torch's own logsumexp per vocabulary chunk, chunks combined with logaddexp: no
        # hand-written online softmax, nothing shared with the methods under test
        acc = torch.full((h64.shape[0],), -float("inf"), dtype=torch.float64, device=dev)
        for vs in range(0, V, VOCAB_CHUNK):
            z = _tile_logits(h64, weight, vs, min(V, vs + VOCAB_CHUNK))
            acc = torch.logaddexp(acc, torch.logsumexp(z, dim=1))
        lse[rs:rs + ROW_CHUNK] = acc
    zt = (hidden.double() * weight[safe].double()).sum(-1)
    logp = torch.where(valid, zt - lse, torch.zeros_like(lse))
    return logp, lse


def backward64(hidden, weight, targets, lse, grad, dW_cmp=None):
    """fp64 gradients of ``sum(grad * logp)``: returns ``(dH64 [n, D], dW_num2, dW_den2)``
    where, if ``dW_cmp`` (the method's dW [V, D]) is given, ``dW_num2 = ||dW_cmp - dW64||^2``
    and ``dW_den2 = ||dW64||^2`` accumulated tile by tile (else both None)."""
    n, V = hidden.shape[0], weight.shape[0]
    dev = hidden.device
    valid = targets != IGNORE_INDEX
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    g = torch.where(valid, grad.double(), torch.zeros((), dtype=torch.float64, device=dev))
    dH = torch.zeros(hidden.shape, dtype=torch.float64, device=dev)
    num2 = den2 = None
    if dW_cmp is not None:
        num2 = torch.zeros((), dtype=torch.float64, device=dev)
        den2 = torch.zeros((), dtype=torch.float64, device=dev)
    for vs in range(0, V, VOCAB_CHUNK):
        ve = min(V, vs + VOCAB_CHUNK)
        w64 = weight[vs:ve].double()
        dW_tile = torch.zeros_like(w64) if dW_cmp is not None else None
        for rs in range(0, n, ROW_CHUNK):
            re = min(n, rs + ROW_CHUNK)
            h64 = hidden[rs:re].double()
            p = torch.exp(h64 @ w64.t() - lse[rs:re, None])
            dz = -g[rs:re, None] * p
            local = safe[rs:re] - vs
            hit = valid[rs:re] & (local >= 0) & (local < ve - vs)
            rows = hit.nonzero().squeeze(1)
            dz[rows, local[rows]] += g[rs:re][rows]
            dH[rs:re] += dz @ w64
            if dW_tile is not None:
                dW_tile += dz.t() @ h64
        if dW_tile is not None:
            num2 += (dW_cmp[vs:ve].double() - dW_tile).pow(2).sum()
            den2 += dW_tile.pow(2).sum()
    return dH, num2, den2


def rel_norm(a, ref) -> float:
    a, ref = a.double(), ref.double()
    den = ref.norm().item()
    return (a - ref).norm().item() / den if den > 0 else (a - ref).norm().item()


def logprob_errors(inputs, idx, logp_rows, dH_rows, sub_dW):
    """Accuracy of one logprob-workload method against fp64.

    ``logp_rows`` [S] and ``dH_rows`` [S, D]: the full-size run's outputs at the rows ``idx``;
    ``sub_dW`` [V, D] from the run on the rows ``idx`` only (with the same upstream gradient
    on those rows)."""
    idx = idx.to(inputs["hidden"].device)
    h = inputs["hidden"].detach()[idx]
    w = inputs["weight"].detach()
    t = inputs["targets"][idx]
    g = inputs["grad"][idx]
    ref, lse = logprob64(h, w, t)
    valid = t != IGNORE_INDEX
    got = logp_rows.detach().double()
    diff = (got - ref).abs()
    dH64, num2, den2 = backward64(h, w, t, lse, g, dW_cmp=sub_dW)
    out = {
        "logp_max_abs": diff.max().item() if diff.numel() else 0.0,
        "logp_max_rel": (diff[valid] / ref[valid].abs().clamp_min(1e-6)).max().item()
        if valid.any() else 0.0,
        "dH_rel": rel_norm(dH_rows.detach(), dH64),
        "dW_rel": (num2.sqrt() / den2.sqrt()).item() if den2.item() > 0 else num2.sqrt().item(),
    }
    # Ignored rows must give exactly 0 and a zero gradient.
    ign = ~valid
    out["ignored_exact_zero"] = bool((got[ign] == 0).all().item()
                                     and (dH_rows.detach()[ign] == 0).all().item())
    return out


class LossReference:
    """fp64 DPO (sigmoid) loss and its per-token gradient for one loss-workload input set."""

    def __init__(self, inputs, beta):
        t = inputs["targets"]
        h = inputs["hidden"].detach().reshape(-1, inputs["hidden"].shape[-1])
        rh = inputs["ref_hidden"].reshape(-1, h.shape[-1])
        tf = t.reshape(-1)
        pol, self.lse = logprob64(h, inputs["weight"].detach(), tf)
        ref, _ = logprob64(rh, inputs["ref_weight"], tf)
        pol = pol.reshape(t.shape).requires_grad_()
        ref = ref.reshape(t.shape)
        B = t.shape[0] // 2
        with torch.enable_grad():
            ps, rs = pol.sum(-1), ref.sum(-1)
            logits = (ps[:B] - rs[:B]) - (ps[B:] - rs[B:])
            loss = -F.logsigmoid(beta * logits).mean()
            (self.grad_tok,) = torch.autograd.grad(loss, pol)
        self.loss = loss.item()

    def errors(self, inputs, loss, dH, dW, grad_scale=1.0):
        h = inputs["hidden"].detach().reshape(-1, inputs["hidden"].shape[-1])
        tf = inputs["targets"].reshape(-1)
        g = self.grad_tok.reshape(-1) * grad_scale
        dH64, num2, den2 = backward64(h, inputs["weight"].detach(), tf, self.lse, g, dW_cmp=dW)
        return {
            "loss_rel": abs(float(loss) - self.loss) / max(abs(self.loss), 1e-12),
            "dH_rel": rel_norm(dH.reshape(dH64.shape), dH64),
            "dW_rel": (num2.sqrt() / den2.sqrt()).item() if den2.item() > 0 else num2.sqrt().item(),
        }
