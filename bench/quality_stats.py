"""Statistics of the quality study (``bench/quality.py``): bootstrap intervals over prompts,
paired differences between arms on the same prompts, the spread over seeds.

Inputs are 0/1 correctness vectors, one entry per prompt (the same prompts, in the same
order, for every arm and seed).  Intervals are percentile bootstrap intervals; every
function takes a seed so a report is reproducible.
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np


def _as_matrix(x) -> np.ndarray:
    """[seeds, prompts] float64 from one vector (one seed) or a list of vectors."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or a.shape[1] == 0 or a.shape[0] == 0:
        raise ValueError(f"expected [prompts] or [seeds, prompts] with at least one prompt, got "
                         f"shape {a.shape}")
    return a


def bootstrap_ci(correct: Sequence[float], n_boot: int = 2000, level: float = 0.95,
                 seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean of ``correct`` (one value per prompt),
    resampling prompts with replacement: ``(lo, hi)``."""
    a = _as_matrix(correct)[0]
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, a.size, size=(n_boot, a.size))
    means = a[idx].mean(axis=1)
    q = (1 - level) / 2
    return float(np.quantile(means, q)), float(np.quantile(means, 1 - q))


def paired_bootstrap(a, b, n_boot: int = 2000, level: float = 0.95, seed: int = 0,
                     resample_seeds: bool = True) -> Dict[str, float]:
    """Difference of mean accuracy ``A - B`` on the same prompts.

    ``a``: [seeds_a, prompts] (or [prompts]), ``b``: [seeds_b, prompts], 0/1 per prompt.
    Each replicate draws one set of prompts (with replacement) for both arms, the pairing
    that makes a small effect visible, and, with ``resample_seeds``, draws each arm's seeds
    with replacement too, so the interval covers the training-seed spread as well as the
    choice of prompts.  Returns ``{"diff", "lo", "hi", "p"}``: ``p`` is the two-sided
    bootstrap p-value (twice the share of replicates on the far side of 0, at most 1);
    the difference is significant at ``1 - level`` when ``[lo, hi]`` excludes 0.
    """
    A, B = _as_matrix(a), _as_matrix(b)
    if A.shape[1] != B.shape[1]:
        raise ValueError(f"a and b need the same prompts: {A.shape[1]} vs {B.shape[1]}")
    n = A.shape[1]
    rng = np.random.default_rng(seed)
    diff = float(A.mean() - B.mean())
    reps = np.empty(n_boot)
    for r in range(n_boot):
        idx = rng.integers(0, n, size=n)
        sa = rng.integers(0, A.shape[0], size=A.shape[0]) if resample_seeds else np.arange(A.shape[0])
        sb = rng.integers(0, B.shape[0], size=B.shape[0]) if resample_seeds else np.arange(B.shape[0])
        reps[r] = A[np.ix_(sa, idx)].mean() - B[np.ix_(sb, idx)].mean()
    q = (1 - level) / 2
    lo, hi = float(np.quantile(reps, q)), float(np.quantile(reps, 1 - q))
    p = min(1.0, 2 * min(float((reps <= 0).mean()), float((reps >= 0).mean())))
    return {"diff": diff, "lo": lo, "hi": hi, "p": p}


def seed_spread(values: Sequence[float]) -> Dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max over seeds."""
    v = [float(x) for x in values]
    if not v:
        raise ValueError("seed_spread needs at least one value")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "sd": sd, "min": min(v), "max": max(v), "n": len(v)}
