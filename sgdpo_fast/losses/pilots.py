"""SGDPO pilot subsets: which response tokens enter the pilot sums ``Pw``, ``Pl``.

Per pair, with ``len_w``, ``len_l`` the response lengths and ``m = min(len_w, len_l)``:
``k_w = max(floor(r1*m), 1)`` positions of the chosen response and
``k_l = max(floor(r2*m), 1)`` of the rejected one (``floor`` of the fp64
product, as ``int(r*m)`` in the authors' Python code).

- ``mode="different"`` (Pilot_d, the paper's default): two independent uniform
  draws without replacement, one inside each response.
- ``mode="same"`` (Pilot_s): one draw shared by the pair.  Response tokens are
  addressed by their offset ``j`` inside the response (the j-th response token
  of the row, counting masked tokens only, so gaps in the mask are skipped).  One
  uniformly random ordering of the offsets ``0 .. m-1`` (the part both responses
  have) is drawn per pair; the chosen pilot is its first ``k_w`` offsets, the
  rejected pilot its first ``k_l``.  So the two pilots cover the same relative
  positions, the smaller one is a subset of the larger, and with ``r1 == r2``
  they are the same offsets in both answers.

Vectorized, no Python loop over pairs: random keys (fp64 uniform, so ties are
negligible) on the candidate positions and ``+inf`` elsewhere; the rank of each
key within its row comes from one ``argsort`` and a scatter; a position is in
the pilot when its rank is below the row's ``k``.  Exactly ``k`` positions per
row, always inside the response.
"""
from __future__ import annotations

from typing import Optional

import torch


def pilot_counts(mask: torch.Tensor, r1: float, r2: float) -> torch.Tensor:
    """``[2B]`` int64: ``k_w`` for rows ``[:B]``, ``k_l`` for rows ``[B:]`` (mask [2B, T] bool)."""
    lens = mask.sum(1)
    B = lens.shape[0] // 2
    m = torch.minimum(lens[:B], lens[B:]).double()
    kw = torch.floor(float(r1) * m).clamp(min=1)
    kl = torch.floor(float(r2) * m).clamp(min=1)
    return torch.cat([kw, kl]).long()


def _uniform(shape, device, generator: Optional[torch.Generator]) -> torch.Tensor:
    if generator is None:
        return torch.rand(shape, dtype=torch.float64, device=device)
    keys = torch.rand(shape, dtype=torch.float64, device=generator.device, generator=generator)
    return keys.to(device)


def _ranks(keys: torch.Tensor) -> torch.Tensor:
    """Rank (0 = smallest) of each entry within its row; unique per row."""
    order = keys.argsort(dim=1)
    ar = torch.arange(keys.shape[1], device=keys.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, ar)


def draw_pilot_masks(mask: torch.Tensor, r1: float, r2: float, mode: str = "different",
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Draw pilot subsets: ``[2B, T]`` bool, a subset of ``mask`` with ``k`` positions per row.

    mask [2B, T] bool (rows ``[:B]`` chosen, ``[B:]`` rejected), every row with at
    least one response token; ``r1``, ``r2`` in (0, 1]; ``mode`` "different" or
    "same"; ``generator`` makes the draw reproducible (it may live on another
    device than ``mask``: keys are drawn there and moved).
    """
    B2, T = mask.shape
    B = B2 // 2
    k = pilot_counts(mask, r1, r2)
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=mask.device)
    if mode == "different":
        keys = torch.where(mask, _uniform((B2, T), mask.device, generator), inf)
        return _ranks(keys) < k[:, None]
    if mode == "same":
        lens = mask.sum(1)
        m = torch.minimum(lens[:B], lens[B:])
        offsets = torch.arange(T, device=mask.device)
        keys = torch.where(offsets[None, :] < m[:, None],
                           _uniform((B, T), mask.device, generator), inf)
        rank_of_offset = _ranks(keys).repeat(2, 1)             # [2B, T], by offset
        offset_of_pos = (mask.long().cumsum(1) - 1).clamp(min=0)  # offset of each response token
        rank_at_pos = rank_of_offset.gather(1, offset_of_pos)
        return mask & (rank_at_pos < k[:, None])
    raise ValueError(f"pilot_mode must be 'different' or 'same', got {mode!r}")
