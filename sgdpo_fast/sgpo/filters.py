"""SGPO pair filters: Tukey's fences on perplexity, and a minimum-change rule.

A candidate pair is (prompt, original answer, improved answer, perplexity of
the improved answer under the policy).  Decisions, in this order:

* ``empty``        the improved answer is empty (after stripping);
* ``truncated``    the original or the improved answer was cut at the generation limit
                   (``finished`` False): training on it would teach the model to end
                   answers mid-way (only when ``finished`` is given);
* ``identical``    it equals the original after whitespace and case normalization;
* ``too_similar``  difflib similarity of the normalized texts >= ``max_similarity``
                   (not a discernible change);
* ``ppl_high`` / ``ppl_low``  its per-token perplexity lies outside Tukey's fences
                   ``[Q1 - k*IQR, Q3 + k*IQR]`` of the perplexities of the candidates
                   that passed the rules above (``k = tukey_k``, 1.5 by default; fewer
                   than 4 such candidates: no fences);
* ``kept``         otherwise.
"""
from __future__ import annotations

import difflib
import math
from typing import List, Optional, Sequence, Tuple

REASONS = ("kept", "empty", "truncated", "identical", "too_similar", "ppl_high", "ppl_low")


def normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def similarity(a: str, b: str) -> float:
    """difflib ratio of the normalized texts, in [0, 1]."""
    return difflib.SequenceMatcher(None, normalize(a), normalize(b), autojunk=False).ratio()


def quantile(sorted_vals: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of sorted values (numpy's default method)."""
    pos = (len(sorted_vals) - 1) * q
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def tukey_fences(values: Sequence[float], k: float = 1.5) -> Tuple[float, float]:
    """``(Q1 - k*IQR, Q3 + k*IQR)``; ``(-inf, inf)`` for fewer than 4 values."""
    vals = sorted(v for v in values if math.isfinite(v))
    if len(vals) < 4:
        return -math.inf, math.inf
    q1, q3 = quantile(vals, 0.25), quantile(vals, 0.75)
    return q1 - k * (q3 - q1), q3 + k * (q3 - q1)


def decide(originals: Sequence[str], improved: Sequence[str], ppl: Sequence[float], *,
           tukey_k: float = 1.5, max_similarity: float = 0.9,
           finished: Optional[Sequence[bool]] = None) -> Tuple[List[str], Tuple[float, float]]:
    """The reason (see module doc) for each candidate, and the fences used.  ``finished``:
    per candidate, whether both its answers ended with a stop token."""
    if finished is None:
        finished = [True] * len(originals)
    if not (len(originals) == len(improved) == len(ppl) == len(finished)):
        raise ValueError("originals, improved, ppl (and finished) need one entry per candidate")
    if not 0 < max_similarity <= 1:
        raise ValueError(f"max_similarity must be in (0, 1], got {max_similarity}")
    reasons = []
    for o, i, f in zip(originals, improved, finished):
        if not i.strip():
            reasons.append("empty")
        elif not f:
            reasons.append("truncated")
        elif normalize(o) == normalize(i):
            reasons.append("identical")
        elif similarity(o, i) >= max_similarity:
            reasons.append("too_similar")
        else:
            reasons.append("kept")
    lo, hi = tukey_fences([p for p, r in zip(ppl, reasons) if r == "kept"], tukey_k)
    for n, (p, r) in enumerate(zip(ppl, reasons)):
        if r == "kept":
            if not math.isfinite(p) or p > hi:
                reasons[n] = "ppl_high"
            elif p < lo:
                reasons[n] = "ppl_low"
    return reasons, (lo, hi)
