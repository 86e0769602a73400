"""Independent fp64 oracles: plain materialized computations, no project code.  The eager
baseline (the error bf16 results are judged against) is bench.baselines'."""
from __future__ import annotations

import os

import torch

from bench.baselines import eager_logprobs  # noqa: F401  (re-exported for the tests)

# Seed of the tests' random inputs: fixed, so a failure reproduces; set SGDPO_FAST_TEST_SEED
# to draw other inputs (CI uses the default).
SEED = int(os.environ.get("SGDPO_FAST_TEST_SEED", "0"))


def logprob_oracle(hidden, weight, targets, bias=None, ignore_index=-100, temperature=1.0,
                   softcap=None, logit_scale=1.0):
    """fp64, materialized: log_softmax(transform(h @ W.T + b))[target], 0 where ignored.

    Inputs may require grad; the result is differentiable (fp64 autograd)."""
    h = hidden.double()
    x = h @ weight.double().t()
    if bias is not None:
        x = x + bias.double()
    x = x * logit_scale
    if softcap is not None:
        x = softcap * torch.tanh(x / softcap)
    x = x / temperature
    lp = torch.log_softmax(x, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    out = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros_like(out))


def rel_err(a, b) -> float:
    """Relative error in norm, ``|a - b| / |b|``, computed in fp64."""
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def logp_rel_err(lp, ref):
    """|lp - ref| relative to |ref| floored at 1: logp = z_target - lse is a difference of
    two O(|lse|) fp32 numbers, so when p(target) -> 1 (logp -> 0) only an absolute
    accuracy of a few eps * |lse| is attainable, and a pure relative error blows up."""
    return (lp.double() - ref).abs() / ref.abs().clamp_min(1.0)


def max_or_zero(x) -> float:
    """max of a possibly empty (masked) selection; 0 when empty."""
    return x.max().item() if x.numel() else 0.0
