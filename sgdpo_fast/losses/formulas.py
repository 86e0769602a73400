"""Per-loss-type formulas on per-pair quantities (torch, any float dtype).

Every loss of the family is a function of per-pair *log-ratios*:

``rho_w``, ``rho_l``  chosen / rejected sequence log-ratio on the loss side
                      (``logpi - logref`` summed, or averaged, over the response;
                      SimPO has no reference so it is the policy average alone);
``pil_w``, ``pil_l``  SGDPO pilot log-ratios (sums over the pilot subsets).

``pair_loss`` returns the per-pair loss and its partial derivatives with
respect to those four quantities, in closed form: the pairwise loss (torch
path and Triton kernel, which mirrors these lines) turns them into per-token
gradient weights without autograd.

Formulas (``eps`` = label smoothing, ``b`` = beta, ``g`` = simpo_gamma,
``cdpo(z) = (1-eps)*softplus(-z) + eps*softplus(z)``):

- ``sigmoid``  ``cdpo(b*(rho_w - rho_l))``  (DPO; cDPO when eps > 0; TRL 1.16's
  sigmoid ignores label_smoothing, TRL < 1.0 and Liger apply it this way)
- ``robust``   ``((1-eps)*softplus(-z) - eps*softplus(z)) / (1-2eps)``, ``z = b*(rho_w-rho_l)``
- ``hinge``    ``relu(1 - b*(rho_w - rho_l))``
- ``ipo``      ``(rho_w - rho_l - 1/(2b))**2`` on per-token *averaged* log-ratios (TRL)
- ``simpo``    ``cdpo(b*(rho_w - rho_l) - g)`` on averaged policy log-probs (TRL's CPOTrainer)
- ``sgdpo``    ``0.5*cdpo(b*(rho_w - pil_l)) + 0.5*cdpo(b*(pil_w - rho_l))``
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.pairwise_codes import LOSS_CODE, LOSS_TYPES  # noqa: F401  (shared with the kernel)

NEEDS_REF = frozenset({"sigmoid", "ipo", "hinge", "robust", "sgdpo"})
# loss types whose loss side always uses per-token averaged log-probs (as TRL does)
LOSS_SIDE_AVERAGED = frozenset({"ipo", "simpo"})


def _eps_softplus(z: torch.Tensor, eps: float) -> torch.Tensor:
    """``eps * softplus(z)``, exactly 0 for eps = 0 (0 * softplus(+inf) would be NaN where
    the loss's limit is finite, e.g. a -inf log-prob in a rejected answer)."""
    return eps * F.softplus(z) if eps else torch.zeros_like(z)


def _cdpo(z: torch.Tensor, eps: float):
    """(1-eps)*softplus(-z) + eps*softplus(z) and its derivative in z."""
    val = (1.0 - eps) * F.softplus(-z) + _eps_softplus(z, eps)
    d = -(1.0 - eps) * torch.sigmoid(-z) + eps * torch.sigmoid(z)
    return val, d


def pair_loss(loss_type: str, rho_w: torch.Tensor, rho_l: torch.Tensor,
              pil_w: torch.Tensor | None, pil_l: torch.Tensor | None, *,
              beta: float, label_smoothing: float, simpo_gamma: float):
    """Per-pair loss [B] and ``(d_rho_w, d_rho_l, d_pil_w, d_pil_l)`` (each [B] or None)."""
    eps = float(label_smoothing)
    if loss_type == "sgdpo":
        v1, d1 = _cdpo(beta * (rho_w - pil_l), eps)
        v2, d2 = _cdpo(beta * (pil_w - rho_l), eps)
        return 0.5 * (v1 + v2), (0.5 * beta * d1, -0.5 * beta * d2, 0.5 * beta * d2, -0.5 * beta * d1)
    delta = rho_w - rho_l
    if loss_type == "sigmoid":
        val, d = _cdpo(beta * delta, eps)
        d = beta * d
    elif loss_type == "simpo":
        val, d = _cdpo(beta * delta - simpo_gamma, eps)
        d = beta * d
    elif loss_type == "robust":
        z = beta * delta
        val = ((1.0 - eps) * F.softplus(-z) - _eps_softplus(z, eps)) / (1.0 - 2.0 * eps)
        d = beta * (-(1.0 - eps) * torch.sigmoid(-z) - eps * torch.sigmoid(z)) / (1.0 - 2.0 * eps)
    elif loss_type == "hinge":
        u = 1.0 - beta * delta
        val = torch.relu(u)
        d = -beta * (u > 0).to(delta.dtype)
    elif loss_type == "ipo":
        u = delta - 1.0 / (2.0 * beta)
        val = u * u
        d = 2.0 * u
    else:  # validated upstream
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return val, (d, -d, None, None)
