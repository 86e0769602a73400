"""The eager baseline: what users write today, in the inputs' dtype (materialized logits,
fp32 log_softmax, gather).  The benchmark's ``eager`` method and the tests' "no worse than
eager" tolerances both use this one function."""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


def eager_logprobs(hidden, weight, targets, bias=None, ignore_index=IGNORE_INDEX):
    """log_softmax(hidden @ weight.T + bias)[target] in float32, 0 where ignored."""
    x = hidden @ weight.t()
    if bias is not None:
        x = x + bias
    lp = torch.log_softmax(x.float(), dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    out = lp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, out, torch.zeros_like(out))
