"""Per-loss-type formulas on per-pair quantities (torch, any float dtype).

Every loss of the family is a function of per-pair *log-ratios*:

``x_w``, ``x_l``      chosen / rejected sequence log-ratio on the loss side
                      (``logpi - logref`` summed, or averaged, over the response;
                      SimPO has no reference so it is the policy average alone);
``pil_w``, ``pil_l``  SGDPO pilot log-ratios (sums over the pilot subsets).

With an f-divergence (``f_divergence_type``, TRL's f-DPO) the log-ratios first become
*scores* ``s = f_score(x)`` (:func:`f_score`; the identity for ``reverse_kl``).
``ipo`` and ``sigmoid_norm`` divide each score by the answer's token count (TRL).

``pair_loss`` returns the per-pair loss and its partial derivatives with respect to its
four inputs, in closed form: the pairwise loss (torch path and Triton kernel, which
mirrors these lines) turns them into per-token gradient weights without autograd.

Formulas (``eps`` = label smoothing, ``b`` = beta, ``g`` = simpo_gamma, ``tau`` =
discopop_tau, ``cdpo(z) = (1-eps)*softplus(-z) + eps*softplus(z)``, ``z = b*(s_w - s_l)``,
``cw = b*s_w``, ``cl = b*s_l``, ``sig`` the logistic function):

- ``sigmoid``       ``cdpo(z)`` (DPO; cDPO when eps > 0, as TRL < 1.0 and TRL's CPO
                    trainer; TRL 1.16's DPO trainer and Liger 0.8.5 ignore eps here)
- ``robust``        ``((1-eps)*softplus(-z) - eps*softplus(z)) / (1-2eps)``
- ``hinge``         ``relu(1 - z)``
- ``ipo``           ``(s_w - s_l - 1/(2b))**2`` on per-token normalized scores (TRL)
- ``simpo``         ``cdpo(z - g)`` on averaged policy log-probs (TRL's CPOTrainer)
- ``sgdpo``         ``0.5*cdpo(b*(s_w - pil_l)) + 0.5*cdpo(b*(pil_w - s_l))``
- ``exo_pair``      ``sig(z)*(logsig(z) - log(1-eps)) + sig(-z)*(logsig(-z) - log(eps))``
- ``nca_pair``      ``softplus(-cw) + 0.5*softplus(cw) + 0.5*softplus(cl)``
- ``bco_pair``      ``softplus(-cw) + softplus(cl)``
- ``sppo_hard``     ``(s_w - 1/(2b))**2 + (s_l + 1/(2b))**2``
- ``apo_zero``      ``sig(-cw) + sig(cl)``
- ``apo_down``      ``sig(cw) + sig(-z)``
- ``discopop``      ``softplus(-z)*(1 - m) + exp(-z)*m``, ``m = sig(z/tau)``
- ``sigmoid_norm``  ``softplus(-z)`` on per-token normalized scores
- ``sft``           0 (the NLL term of ``preference_loss`` carries it)
- ``aot``, ``aot_unpaired``: ``cdpo`` of sorted differences, a batch-level loss
  (``pairwise.py`` sorts; see :func:`cdpo`).

Limits are kept: a ``-inf`` log-prob that sends a loss to a finite limit gives that
limit, never ``0 * inf = NaN`` (``x*log x`` terms and ``eps*softplus(+inf)`` with
``eps = 0`` are written so).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels.pairwise_codes import (BATCH_LOSS_TYPES, F_DIVERGENCES, FDIV_CODE,  # noqa: F401
                                      KERNEL_LOSS_TYPES, LOSS_CODE, LOSS_TYPES)

# loss types that read no reference log-probs
REFERENCE_FREE = frozenset({"simpo", "sft"})
NEEDS_REF = frozenset(LOSS_TYPES) - REFERENCE_FREE
# loss side (and rewards) always per-token averaged policy log-probs (TRL's CPO for simpo)
ALWAYS_AVERAGED = frozenset({"simpo"})
# scores divided by the answer's token count on the loss side only (TRL 1.16)
LENGTH_NORMALIZED = frozenset({"ipo", "sigmoid_norm"})
# loss types with a label-smoothing term (others refuse a non-zero value)
SMOOTHED = frozenset({"sigmoid", "robust", "simpo", "sgdpo", "exo_pair", "aot", "aot_unpaired"})
# loss types defined on the chosen - rejected score difference: the ones an f-divergence
# generalizes (TRL 1.16's list, plus sgdpo, whose two terms are such differences)
F_DIVERGENCE_TYPES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust",
                                "discopop", "sft", "sgdpo"})
# TRL's clamp of (alpha - 1) * x before exp in the alpha-divergence (fp32 / bf16)
ALPHA_CLAMP = 80.0
ALPHA_ONE_TOL = 1e-6


def _eps_softplus(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * softplus(z)``, exactly 0 for eps = 0 (0 * softplus(+inf) would be NaN where
    the loss's limit is finite, e.g. a -inf log-prob in a rejected answer)."""
    return eps * F.softplus(z) if eps else torch.zeros_like(z)


def cdpo(z: torch.Tensor, eps: float):
    """(1-eps)*softplus(-z) + eps*softplus(z) and its derivative in z."""
    val = (1.0 - eps) * F.softplus(-z) + _eps_softplus(z, eps)
    d = -(1.0 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    return val, d


def _xlogx_term(q: torch.Tensor, logq: torch.Tensor, logp: float) -> torch.Tensor:
    """``q * (log q - log p)``, 0 where ``q == 0`` (its limit)."""
    return torch.where(q == 0, torch.zeros_like(q), q * (logq - logp))


def f_score(x: torch.Tensor, f_divergence: str, alpha: float):
    """``(s, ds/dx)``: the f-DPO score of log-ratios ``x``, ``s = f'(exp(x))`` up to TRL's
    constants: reverse_kl ``x``; forward_kl ``1 - exp(-x)``; js_divergence
    ``log 2 + logsig(x)``; alpha_divergence ``(exp(min((a-1)x, 80)) - 1)/(a-1)``
    (reverse_kl when ``|a - 1| < 1e-6``)."""
    if f_divergence == "reverse_kl" or (f_divergence == "alpha_divergence"
                                        and abs(alpha - 1.0) < ALPHA_ONE_TOL):
        return x, torch.ones_like(x)
    if f_divergence == "forward_kl":
        e = torch.exp(-x)
        return 1.0 - e, e
    if f_divergence == "js_divergence":
        return math.log(2.0) - F.softplus(-x), torch.sigmoid(-x)
    if f_divergence == "alpha_divergence":
        t = (alpha - 1.0) * x
        e = torch.exp(torch.clamp(t, max=ALPHA_CLAMP))
        return (e - 1.0) / (alpha - 1.0), torch.where(t <= ALPHA_CLAMP, e, torch.zeros_like(e))
    raise ValueError(f"unknown f_divergence_type {f_divergence!r}; expected one of {F_DIVERGENCES}")


def pair_loss(loss_type: str, s_w: torch.Tensor, s_l: torch.Tensor,
              pil_w: torch.Tensor | None, pil_l: torch.Tensor | None, *,
              beta: float, label_smoothing: float, simpo_gamma: float,
              discopop_tau: float = 0.05):
    """Per-pair loss [B] and ``(d_s_w, d_s_l, d_pil_w, d_pil_l)`` (each [B] or None) of
    the per-pair (not batch-level) loss types."""
    eps = float(label_smoothing)
    b = float(beta)
    if loss_type == "sgdpo":
        v1, d1 = cdpo(b * (s_w - pil_l), eps)
        v2, d2 = cdpo(b * (pil_w - s_l), eps)
        return 0.5 * (v1 + v2), (0.5 * b * d1, -0.5 * b * d2, 0.5 * b * d2, -0.5 * b * d1)
    z = b * (s_w - s_l)
    sig = torch.sigmoid
    if loss_type == "sigmoid":
        val, d = cdpo(z, eps)
        d = b * d
    elif loss_type == "simpo":
        val, d = cdpo(z - simpo_gamma, eps)
        d = b * d
    elif loss_type == "sigmoid_norm":
        val, d = F.softplus(-z), -b * sig(-z)
    elif loss_type == "robust":
        val = ((1.0 - eps) * F.softplus(-z) - _eps_softplus(z, eps)) / (1.0 - 2.0 * eps)
        d = b * (-(1.0 - eps) * sig(-z) - eps * sig(z)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        u = 1.0 - z
        val = torch.relu(u)
        d = -b * (u > 0).to(z.dtype)
    elif loss_type == "ipo":
        u = s_w - s_l - 1.0 / (2.0 * b)
        val = u * u
        d = 2.0 * u
    elif loss_type == "exo_pair":
        qw, ql = sig(z), sig(-z)
        lpw, lpl = math.log1p(-eps), math.log(eps)
        val = _xlogx_term(qw, -F.softplus(-z), lpw) + _xlogx_term(ql, -F.softplus(z), lpl)
        # d/dz = qw*ql*(z - (log pw - log pl)); its limit at |z| -> inf is 0
        dz = torch.where(torch.isinf(z), torch.zeros_like(z), qw * ql * (z - (lpw - lpl)))
        d = b * dz
    elif loss_type == "discopop":
        m, one_m = sig(z / discopop_tau), sig(-z / discopop_tau)
        lg, e = F.softplus(-z), torch.exp(-z)
        val = lg * one_m + e * m
        dm = m * one_m / discopop_tau
        d = b * (-sig(-z) * one_m - e * m + (e - lg) * dm)
    elif loss_type == "sft":
        zero = torch.zeros_like(z)
        return zero, (zero, zero, None, None)
    else:
        cw, cl = b * s_w, b * s_l
        if loss_type == "nca_pair":
            val = F.softplus(-cw) + 0.5 * F.softplus(cw) + 0.5 * F.softplus(cl)
            return val, (b * (-sig(-cw) + 0.5 * sig(cw)), 0.5 * b * sig(cl), None, None)
        if loss_type == "bco_pair":
            return F.softplus(-cw) + F.softplus(cl), (-b * sig(-cw), b * sig(cl), None, None)
        if loss_type == "sppo_hard":
            uw, ul = s_w - 0.5 / b, s_l + 0.5 / b
            return uw * uw + ul * ul, (2.0 * uw, 2.0 * ul, None, None)
        if loss_type == "apo_zero":
            return sig(-cw) + sig(cl), (-b * sig(cw) * sig(-cw), b * sig(cl) * sig(-cl), None, None)
        if loss_type == "apo_down":
            dz = b * sig(z) * sig(-z)
            return sig(cw) + sig(-z), (b * sig(cw) * sig(-cw) - dz, dz, None, None)
        raise ValueError(f"unknown per-pair loss_type {loss_type!r}")  # validated upstream
    return val, (d, -d, None, None)
