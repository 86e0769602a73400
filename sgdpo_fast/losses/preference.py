"""``preference_loss``: DPO-family losses and SGDPO on per-token log-probs.

Conventions (TRL's DPOTrainer, so results compare one to one):

- Sequence log-probs are sums over the response tokens (``mask``), or means
  with ``average_log_prob=True``.  IPO's loss always uses per-token means (TRL
  1.16 divides the log-ratios by the completion length for IPO), while its
  rewards and ``logps/*`` stay sums as in TRL.  SimPO (reference-free, TRL's
  CPOTrainer) always uses means, in the loss and the rewards.
- Rewards: ``beta * (logp - ref_logp)`` per answer, detached (SimPO:
  ``beta * logp``).
- ``label_smoothing`` eps: cDPO ``(1-eps)*softplus(-z) + eps*softplus(z)`` for
  sigmoid, simpo and both SGDPO terms (TRL < 1.0 / Liger / CPO form: TRL 1.16's
  sigmoid no longer reads it), the robust-DPO form for robust (``eps < 0.5``);
  hinge and ipo take none (non-zero is an error; TRL ignores it there).
- ``nll_alpha``: RPO, ``loss += nll_alpha * NLL`` where NLL is minus the mean
  policy log-prob over all chosen response tokens of the batch (TRL's rpo_alpha,
  Liger's ``alpha`` with ``compute_nll_loss``).
- The reference log-probs are constants (no gradient flows into them).

SGDPO semantics and pilot sampling: see ``pilots.py`` and DESIGN.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch

from . import formulas
from .pairwise import (COL_LOGP_L, COL_LOGP_W, COL_LOSS, COL_PIL_L, COL_PIL_W, COL_REW_L,
                       COL_REW_W, COL_SUM_W, PairwiseConfig, pairwise_stats)
from .pilots import draw_pilot_masks


@dataclass
class PreferenceLossOutput:
    """What ``preference_loss`` returns.

    loss              [] mean over pairs (differentiable w.r.t. the policy log-probs)
    losses            [B] per pair (differentiable; includes ``nll_alpha * nll_loss``)
    chosen_rewards    [B] detached, ``beta * (logp - ref_logp)`` of the chosen answers
    rejected_rewards  [B] detached, likewise for the rejected answers
    chosen_logps      [B] detached policy sequence log-probs (sum, or mean, see module doc)
    rejected_logps    [B] detached
    nll_loss          [] detached RPO NLL (0 unless ``nll_alpha > 0``)
    pilot_masks       [2B, T] bool pilot subsets used (sgdpo) or None
    metrics           TRL's names -> detached 0-dim tensors (``.item()`` to log):
                      rewards/chosen, rewards/rejected, rewards/margins,
                      rewards/accuracies, logps/chosen, logps/rejected; sgdpo adds
                      sgdpo/pilot_chosen, sgdpo/pilot_rejected (means of
                      ``beta * Pw`` and ``beta * Pl``, in reward units); nll_loss
                      when ``nll_alpha > 0``.
    """
    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll_loss: torch.Tensor
    pilot_masks: Optional[torch.Tensor] = None
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)


def _finite(name, val, *, positive=False, nonneg=False):
    if not isinstance(val, (int, float)) or isinstance(val, bool) or not math.isfinite(val):
        raise ValueError(f"{name} must be a finite number, got {val!r}")
    if positive and not val > 0:
        raise ValueError(f"{name} must be > 0, got {val!r}")
    if nonneg and val < 0:
        raise ValueError(f"{name} must be >= 0, got {val!r}")


def _check_mask(name: str, m, shape, device) -> None:
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(m).__name__}")
    if m.is_complex():
        raise ValueError(f"{name} must be a bool or 0/1 tensor, got {m.dtype}")
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} shape {tuple(m.shape)} must equal policy_token_logps shape {tuple(shape)}")
    if m.device != device:
        raise ValueError(f"{name} is on {m.device} but policy_token_logps is on {device}")


def validate_preference_inputs(policy, ref, mask, *, loss_type, beta, label_smoothing, r1, r2,
                               pilot_masks, pilot_mode, generator, simpo_gamma, nll_alpha):
    """Raise ``ValueError`` naming the problem.  Only types, shapes, devices and Python
    scalars are looked at here (``torch.compile`` traces it); the checks that read tensor
    values (empty responses, pilots outside the response, masks that are not 0/1) run
    inside the pairwise op (``pairwise.check_masks``)."""
    if loss_type not in formulas.LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {formulas.LOSS_TYPES}")
    if not isinstance(policy, torch.Tensor) or not policy.is_floating_point():
        raise ValueError("policy_token_logps must be a floating torch.Tensor [2B, T]")
    if policy.dim() != 2:
        raise ValueError(f"policy_token_logps must be 2-D [2B, T], got shape {tuple(policy.shape)}")
    rows = policy.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"policy_token_logps needs an even, non-zero number of rows (chosen rows "
                         f"then rejected rows), got {rows}")
    if ref is None:
        if loss_type in formulas.NEEDS_REF:
            raise ValueError(f"loss_type={loss_type!r} needs ref_token_logps (only 'simpo' is reference-free)")
    else:
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            raise ValueError("ref_token_logps must be a floating torch.Tensor [2B, T] or None")
        if tuple(ref.shape) != tuple(policy.shape):
            raise ValueError(f"ref_token_logps shape {tuple(ref.shape)} must equal policy_token_logps "
                             f"shape {tuple(policy.shape)}")
        if ref.device != policy.device:
            raise ValueError(f"ref_token_logps is on {ref.device} but policy_token_logps is on {policy.device}")
    _check_mask("mask", mask, policy.shape, policy.device)
    _finite("beta", beta, positive=True)
    _finite("label_smoothing", label_smoothing, nonneg=True)
    if loss_type == "robust" and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0:
        raise ValueError(f"label_smoothing does not apply to loss_type={loss_type!r} (got {label_smoothing})")
    if not label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    for name, r in (("pilot_ratio_chosen", r1), ("pilot_ratio_rejected", r2)):
        _finite(name, r)
        if not 0 < r <= 1:
            raise ValueError(f"{name} must lie in (0, 1], got {r}")
    if pilot_mode not in ("different", "same"):
        raise ValueError(f"pilot_mode must be 'different' or 'same', got {pilot_mode!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    _finite("simpo_gamma", simpo_gamma)
    _finite("nll_alpha", nll_alpha, nonneg=True)
    if pilot_masks is not None:
        if loss_type != "sgdpo":
            raise ValueError(f"pilot_masks only apply to loss_type='sgdpo' (got {loss_type!r})")
        _check_mask("pilot_masks", pilot_masks, policy.shape, policy.device)


def preference_loss(
    policy_token_logps: torch.Tensor,
    ref_token_logps: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    loss_type: str = "sgdpo",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    pilot_ratio_chosen: float = 0.6,
    pilot_ratio_rejected: float = 0.9,
    pilot_masks: Optional[torch.Tensor] = None,
    pilot_grad: bool = False,
    pilot_mode: str = "different",
    generator: Optional[torch.Generator] = None,
    average_log_prob: bool = False,
    simpo_gamma: float = 0.5,
    nll_alpha: float = 0.0,
    pairwise_impl: str = "auto",
) -> PreferenceLossOutput:
    """Preference loss of ``B`` pairs from per-token log-probs.

    policy_token_logps [2B, T] float (any float dtype; fp64 stays fp64 on the
    torch path, others compute in fp32), rows ``[:B]`` chosen answers, ``[B:]``
    the rejected answers of the same pairs; ref_token_logps [2B, T] or None
    (SimPO only; ignored by SimPO); mask [2B, T] bool (or 0/1) marking response
    tokens, at least one per row.  Values outside ``mask`` are never read.

    ``loss_type``: sigmoid, ipo, hinge, robust, simpo, sgdpo (formulas in
    ``formulas.py``, conventions in this module's docstring).  SGDPO: pilots
    drawn afresh at each call (``pilot_ratio_*``, ``pilot_mode``, ``generator``)
    unless ``pilot_masks`` [2B, T] fixes them; pilots are constants unless
    ``pilot_grad=True``.  With ``average_log_prob=True`` SGDPO divides each sum by
    its own token count (responses by their lengths, pilots by ``k``).

    ``pairwise_impl``: ``"auto"`` runs the pairwise math in one Triton kernel (fp32) on
    CUDA and in torch elsewhere; ``"torch"`` or ``"triton"`` force one.
    ``torch.compile(fullgraph=True)`` traces it (with ``pilot_masks`` given: drawing
    pilots from a ``torch.Generator`` is outside what the compiler traces).
    """
    validate_preference_inputs(
        policy_token_logps, ref_token_logps, mask, loss_type=loss_type, beta=beta,
        label_smoothing=label_smoothing, r1=pilot_ratio_chosen, r2=pilot_ratio_rejected,
        pilot_masks=pilot_masks, pilot_mode=pilot_mode, generator=generator,
        simpo_gamma=simpo_gamma, nll_alpha=nll_alpha)
    pilot = None
    if loss_type == "sgdpo":
        pilot = pilot_masks if pilot_masks is not None else draw_pilot_masks(
            mask if mask.dtype == torch.bool else mask != 0, pilot_ratio_chosen,
            pilot_ratio_rejected, pilot_mode, generator)
    ref = None if loss_type == "simpo" else ref_token_logps
    cfg = PairwiseConfig(loss_type, float(beta), float(label_smoothing), float(simpo_gamma),
                         bool(average_log_prob), bool(pilot_grad))
    stats = pairwise_stats(policy_token_logps, ref, mask, pilot, cfg, impl=pairwise_impl)
    B = stats.shape[0]
    nll = torch.zeros((), dtype=stats.dtype, device=stats.device)
    if nll_alpha:
        # TRL's rpo_alpha: minus the mean policy log-prob over all chosen response tokens
        nll = -stats[:, COL_SUM_W].sum() / (mask[:B] != 0).sum().to(stats.dtype)
    losses = stats[:, COL_LOSS] + float(nll_alpha) * nll
    loss = losses.mean()
    stats = stats.detach()
    cr, rr = stats[:, COL_REW_W], stats[:, COL_REW_L]
    metrics = {
        "rewards/chosen": cr.mean(),
        "rewards/rejected": rr.mean(),
        "rewards/margins": (cr - rr).mean(),
        "rewards/accuracies": (cr > rr).to(cr.dtype).mean(),
        "logps/chosen": stats[:, COL_LOGP_W].mean(),
        "logps/rejected": stats[:, COL_LOGP_L].mean(),
    }
    if loss_type == "sgdpo":
        metrics["sgdpo/pilot_chosen"] = stats[:, COL_PIL_W].mean()
        metrics["sgdpo/pilot_rejected"] = stats[:, COL_PIL_L].mean()
    if nll_alpha:
        metrics["nll_loss"] = nll.detach()
    return PreferenceLossOutput(
        loss=loss, losses=losses, chosen_rewards=cr, rejected_rewards=rr,
        chosen_logps=stats[:, COL_LOGP_W], rejected_logps=stats[:, COL_LOGP_L],
        nll_loss=nll.detach(), pilot_masks=None if pilot is None else pilot != 0,
        metrics=metrics)
