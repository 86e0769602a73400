"""``preference_loss``: the DPO loss family (every TRL 1.16 DPO loss type, SimPO) and SGDPO
on per-token log-probs.

Conventions (TRL's DPOTrainer, so results compare one to one; the differences with TRL
1.16 and Liger-Kernel 0.8.5 are listed in docs/integrations.md):

- Sequence log-probs are sums over the response tokens (``mask``), or means
  with ``average_log_prob=True`` (Liger's option; both policy and reference).
  ``ipo`` and ``sigmoid_norm`` divide the loss-side log-ratios by the answer's
  token count (TRL 1.16), while their rewards and ``logps/*`` stay sums as in TRL.
  SimPO (reference-free, TRL's CPOTrainer) always uses means, in the loss and the
  rewards.
- ``ld_alpha`` (LD-DPO, TRL's): the sequence log-probs (policy and reference, loss and
  rewards) weigh the tokens after the first ``min(len_w, len_l)`` answer tokens of a
  pair by ``ld_alpha``; the NLL / ``sft`` term keeps plain token means (TRL).
- ``f_divergence_type`` (f-DPO, TRL's): the loss side's log-ratios go through the
  f-divergence score (``formulas.f_score``) for the difference-based losses (TRL's
  list plus sgdpo).  Rewards stay ``beta * log-ratio``.
- Rewards: ``beta * (logp - ref_logp)`` per answer, detached (SimPO:
  ``beta * logp``; reference-free ``sft`` without a reference: ``beta * logp``).
- ``label_smoothing`` eps: cDPO ``(1-eps)*softplus(-z) + eps*softplus(z)`` for
  sigmoid, simpo, aot, aot_unpaired and both SGDPO terms (TRL < 1.0 / CPO form: TRL
  1.16's and Liger 0.8.5's sigmoid ignore it; pass 0 for their numbers), the
  robust-DPO form for robust (``eps < 0.5``), EXO's for exo_pair (``eps > 0``); the
  other loss types have no smoothing term (non-zero is an error).
- ``loss_type`` may be a list (TRL's multi-loss, e.g. MPO ``["sigmoid", "bco_pair",
  "sft"]``) with ``loss_weights``: the loss is ``sum_k w_k * mean(loss_k)``.
  ``sft`` is the NLL below (TRL's ``sft`` loss type).
- ``nll_alpha``: RPO, ``loss += nll_alpha * NLL`` where NLL is minus the mean
  policy log-prob over all chosen response tokens of the batch (TRL's ``sft``
  term, Liger's ``alpha`` with ``compute_nll_loss``).
- ``use_weighting`` (WPO, TRL's): each pair's loss (``sft``'s included, as in TRL;
  ``nll_alpha``'s not) is multiplied by ``exp(mean(logp - log_sum_sq_probs))`` of
  its chosen times its rejected answer (detached; ``log_sum_sq_probs`` from the
  head, a metric of the log-prob op).
- The reference log-probs are constants (no gradient flows into them).

SGDPO semantics and pilot sampling: see ``pilots.py`` and docs/design.md.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Union

import torch

from . import formulas
from .pairwise import (COL_LOGP_L, COL_LOGP_W, COL_LOSS, COL_PIL_L, COL_PIL_W, COL_REW_L,
                       COL_REW_W, COL_SUM_W, PairwiseConfig, pairwise_stats)
from .pilots import draw_pilot_masks


@dataclass
class PreferenceLossOutput:
    """What ``preference_loss`` returns.

    loss              [] mean over pairs (differentiable w.r.t. the policy log-probs)
    losses            [B] per pair (differentiable; includes ``nll_alpha * nll_loss`` and the
                      ``sft`` term); for ``aot`` / ``aot_unpaired`` entry i is the
                      loss of the i-th smallest sorted difference, not of pair i (TRL)
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


def loss_type_list(loss_type) -> tuple:
    """``loss_type`` (a name or a non-empty sequence of names) as a tuple, validated."""
    types = (loss_type,) if isinstance(loss_type, str) else loss_type
    try:
        types = tuple(types)
    except TypeError:
        raise ValueError(f"loss_type must be a name or a list of names, got {loss_type!r}") from None
    if not types:
        raise ValueError("loss_type must name at least one loss type")
    for t in types:
        if t not in formulas.LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; expected one of {formulas.LOSS_TYPES}")
    return types


def validate_loss_options(types, *, beta, label_smoothing, loss_weights=None, simpo_gamma=0.5,
                          nll_alpha=0.0, discopop_tau=0.05, f_divergence_type="reverse_kl",
                          f_alpha_divergence_coef=0.5, ld_alpha=None, use_weighting=False,
                          r1=0.6, r2=0.9, pilot_mode="different"):
    """The Python-scalar options of ``preference_loss`` (also checked when a module or a
    trainer is built): ``ValueError`` naming the argument."""
    _finite("beta", beta, positive=True)
    _finite("label_smoothing", label_smoothing, nonneg=True)
    if not label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5], got {label_smoothing}")
    if label_smoothing:
        bad = [t for t in types if t not in formulas.SMOOTHED and t != "sft"]
        if bad:
            raise ValueError(f"label_smoothing does not apply to loss_type {bad[0]!r} (got "
                             f"{label_smoothing}); it applies to {sorted(formulas.SMOOTHED)}")
    if "robust" in types and not label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {label_smoothing}")
    if "exo_pair" in types and not label_smoothing > 0:
        raise ValueError("label_smoothing must be > 0 for loss_type='exo_pair' (EXO's epsilon; "
                         "the paper recommends 1e-3)")
    if loss_weights is not None:
        if isinstance(loss_weights, (str, bytes)) or len(loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type ({len(types)}), got "
                             f"{loss_weights!r}")
        for w in loss_weights:
            _finite("loss_weights entries", w)
    _finite("simpo_gamma", simpo_gamma)
    _finite("nll_alpha", nll_alpha, nonneg=True)
    _finite("discopop_tau", discopop_tau, positive=True)
    if f_divergence_type not in formulas.F_DIVERGENCES:
        raise ValueError(f"f_divergence_type must be one of {formulas.F_DIVERGENCES}, got "
                         f"{f_divergence_type!r}")
    _finite("f_alpha_divergence_coef", f_alpha_divergence_coef)
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in formulas.F_DIVERGENCE_TYPES]
        if bad:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} applies to the loss types "
                             f"built on the chosen - rejected difference "
                             f"{sorted(formulas.F_DIVERGENCE_TYPES)}, not {bad}; use 'reverse_kl'")
    if ld_alpha is not None:
        _finite("ld_alpha", ld_alpha)
        if not 0.0 <= ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must lie in [0, 1] (or be None), got {ld_alpha}")
    if use_weighting and any(t in formulas.BATCH_LOSS_TYPES for t in types):
        raise ValueError("use_weighting (WPO) is not defined for 'aot' / 'aot_unpaired', which sort "
                         "the batch")
    if "sgdpo" in types:
        for name, r in (("pilot_ratio_chosen", r1), ("pilot_ratio_rejected", r2)):
            _finite(name, r)
            if not 0 < r <= 1:
                raise ValueError(f"{name} must lie in (0, 1], got {r}")
        if pilot_mode not in ("different", "same"):
            raise ValueError(f"pilot_mode must be 'different' or 'same', got {pilot_mode!r}")


def validate_preference_inputs(policy, ref, mask, *, types, pilot_masks, generator,
                               log_sum_sq_probs, use_weighting):
    """Raise ``ValueError`` naming the problem.  Only types, shapes, devices and Python
    scalars are looked at here (``torch.compile`` traces it); the checks that read tensor
    values (empty responses, pilots outside the response, masks that are not 0/1) run
    inside the pairwise op (``pairwise.check_masks``)."""
    if not isinstance(policy, torch.Tensor) or not policy.is_floating_point():
        raise ValueError("policy_token_logps must be a floating torch.Tensor [2B, T]")
    if policy.dim() != 2:
        raise ValueError(f"policy_token_logps must be 2-D [2B, T], got shape {tuple(policy.shape)}")
    rows = policy.shape[0]
    if rows == 0 or rows % 2:
        raise ValueError(f"policy_token_logps needs an even, non-zero number of rows (chosen rows "
                         f"then rejected rows), got {rows}")
    if ref is None:
        need = [t for t in types if t in formulas.NEEDS_REF]
        if need:
            raise ValueError(f"loss_type={need[0]!r} needs ref_token_logps (only "
                             f"{sorted(formulas.REFERENCE_FREE)} are reference-free)")
    else:
        if not isinstance(ref, torch.Tensor) or not ref.is_floating_point():
            raise ValueError("ref_token_logps must be a floating torch.Tensor [2B, T] or None")
        if tuple(ref.shape) != tuple(policy.shape):
            raise ValueError(f"ref_token_logps shape {tuple(ref.shape)} must equal policy_token_logps "
                             f"shape {tuple(policy.shape)}")
        if ref.device != policy.device:
            raise ValueError(f"ref_token_logps is on {ref.device} but policy_token_logps is on {policy.device}")
    _check_mask("mask", mask, policy.shape, policy.device)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if pilot_masks is not None:
        if "sgdpo" not in types:
            raise ValueError(f"pilot_masks only apply to loss_type='sgdpo' (got {list(types)})")
        _check_mask("pilot_masks", pilot_masks, policy.shape, policy.device)
    if use_weighting:
        if not isinstance(log_sum_sq_probs, torch.Tensor) or not log_sum_sq_probs.is_floating_point() \
                or tuple(log_sum_sq_probs.shape) != tuple(policy.shape):
            raise ValueError("use_weighting=True needs log_sum_sq_probs, a float tensor shaped like "
                             "policy_token_logps (the head's log sum_v p_v^2)")
        if log_sum_sq_probs.device != policy.device:
            raise ValueError(f"log_sum_sq_probs is on {log_sum_sq_probs.device} but "
                             f"policy_token_logps is on {policy.device}")


def ld_token_weights(mask: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO token weights [2B, T] (float32): 1 on the first ``min(len_w, len_l)`` answer
    tokens of each row (its pair's shared length), ``ld_alpha`` on the later ones, 0 off
    the answer (TRL 1.16's ``shared_mask + ld_alpha * tail_mask``)."""
    m = mask.long()
    pos = m.cumsum(1)
    lens = m.sum(1)
    B = lens.shape[0] // 2
    shared = torch.minimum(lens[:B], lens[B:]).repeat(2)
    w = torch.where(pos > shared[:, None], float(ld_alpha), 1.0)
    return torch.where(mask, w, 0.0).float()


def _weighted(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``x * w`` with weight-0 tokens exactly 0 (a -inf log-prob there adds nothing)."""
    return torch.where(w == 0, torch.zeros((), dtype=x.dtype, device=x.device), x * w.to(x.dtype))


def preference_loss(
    policy_token_logps: torch.Tensor,
    ref_token_logps: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    loss_type: Union[str, Sequence[str]] = "sgdpo",
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
    loss_weights: Optional[Sequence[float]] = None,
    discopop_tau: float = 0.05,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    ld_alpha: Optional[float] = None,
    use_weighting: bool = False,
    log_sum_sq_probs: Optional[torch.Tensor] = None,
    pairwise_impl: str = "auto",
) -> PreferenceLossOutput:
    """Preference loss of ``B`` pairs from per-token log-probs.

    policy_token_logps [2B, T] float (any float dtype; fp64 stays fp64 on the
    torch path, others compute in fp32), rows ``[:B]`` chosen answers, ``[B:]``
    the rejected answers of the same pairs; ref_token_logps [2B, T] or None
    (reference-free ``simpo`` and ``sft`` only; ignored by ``simpo``); mask [2B, T]
    bool (or 0/1) marking response tokens, at least one per row.  Values outside
    ``mask`` are never read.

    ``loss_type``: one of ``formulas.LOSS_TYPES`` (sigmoid, ipo, hinge, robust, simpo,
    sgdpo, exo_pair, nca_pair, bco_pair, sppo_hard, apo_zero, apo_down, discopop,
    sigmoid_norm, sft, aot, aot_unpaired) or a list of them with ``loss_weights``
    (formulas in ``formulas.py``, conventions in this module's docstring).  SGDPO: pilots
    drawn afresh at each call (``pilot_ratio_*``, ``pilot_mode``, ``generator``)
    unless ``pilot_masks`` [2B, T] fixes them; pilots are constants unless
    ``pilot_grad=True``.  With ``average_log_prob=True`` SGDPO divides each sum by
    its own token count (responses by their lengths, pilots by ``k``).
    ``discopop_tau``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``ld_alpha``,
    ``use_weighting`` (with ``log_sum_sq_probs`` [2B, T]): TRL's DPOConfig options.

    ``pairwise_impl``: ``"auto"`` runs the pairwise math in one Triton kernel (fp32) on
    CUDA and in torch elsewhere (and for the batch-sorting aot losses); ``"torch"`` or
    ``"triton"`` force one.  ``torch.compile(fullgraph=True)`` traces it (with
    ``pilot_masks`` given: drawing pilots from a ``torch.Generator`` is outside what the
    compiler traces).
    """
    types = loss_type_list(loss_type)
    validate_loss_options(
        types, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
        simpo_gamma=simpo_gamma, nll_alpha=nll_alpha, discopop_tau=discopop_tau,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        ld_alpha=ld_alpha, use_weighting=use_weighting, r1=pilot_ratio_chosen,
        r2=pilot_ratio_rejected, pilot_mode=pilot_mode)
    validate_preference_inputs(policy_token_logps, ref_token_logps, mask, types=types,
                               pilot_masks=pilot_masks, generator=generator,
                               log_sum_sq_probs=log_sum_sq_probs, use_weighting=use_weighting)
    weights = [1.0] * len(types) if loss_weights is None else [float(w) for w in loss_weights]
    bmask = mask if mask.dtype == torch.bool else mask != 0
    pilot = None
    if "sgdpo" in types:
        pilot = pilot_masks if pilot_masks is not None else draw_pilot_masks(
            bmask, pilot_ratio_chosen, pilot_ratio_rejected, pilot_mode, generator)
    policy, ref = policy_token_logps, ref_token_logps
    if ld_alpha is not None:
        w_tok = ld_token_weights(bmask, ld_alpha)
        policy = _weighted(policy, w_tok)
        ref = None if ref is None else _weighted(ref, w_tok)

    pair_types = [t for t in types if t != "sft"] or ["sft"]
    stats_of = {}
    for t in dict.fromkeys(pair_types):      # each distinct loss type once
        cfg = PairwiseConfig(t, float(beta), float(label_smoothing) if t in formulas.SMOOTHED else 0.0,
                             float(simpo_gamma), bool(average_log_prob), bool(pilot_grad),
                             float(discopop_tau), f_divergence_type, float(f_alpha_divergence_coef))
        stats_of[t] = pairwise_stats(policy, None if t == "simpo" else ref, mask,
                                     pilot if t == "sgdpo" else None, cfg, impl=pairwise_impl)
    stats = stats_of[pair_types[0]]
    B = stats.shape[0]

    pair_w = None
    if use_weighting:  # WPO (TRL): exp of the mean of logp - log sum p^2, chosen * rejected
        with torch.no_grad():
            ct = stats.dtype
            zero = torch.zeros((), dtype=ct, device=stats.device)
            d = torch.where(bmask, policy_token_logps.detach().to(ct) - log_sum_sq_probs.to(ct), zero)
            wseq = torch.exp(d.sum(1) / bmask.sum(1).clamp(min=1).to(ct))
            pair_w = wseq[:B] * wseq[B:]

    sft_w = sum(w for t, w in zip(types, weights) if t == "sft")
    nll = torch.zeros((), dtype=stats.dtype, device=stats.device)
    if nll_alpha or sft_w:
        # minus the mean policy log-prob over all chosen response tokens (TRL's sft, rpo_alpha)
        n_chosen = bmask[:B].sum().to(stats.dtype)
        if ld_alpha is None:
            nll = -stats[:, COL_SUM_W].sum() / n_chosen
        else:  # the op saw LD-weighted log-probs: the NLL takes the plain ones
            zero = torch.zeros((), dtype=stats.dtype, device=stats.device)
            nll = -torch.where(bmask[:B], policy_token_logps[:B].to(stats.dtype), zero).sum() / n_chosen
    losses = None
    for t, w in zip(types, weights):
        if t == "sft":
            continue
        term = stats_of[t][:, COL_LOSS]
        term = w * (term if pair_w is None else term * pair_w)
        losses = term if losses is None else losses + term
    if losses is None:
        losses = torch.zeros_like(stats[:, COL_LOSS])
    if sft_w:
        losses = losses + sft_w * (nll if pair_w is None else nll * pair_w)
    if nll_alpha:
        losses = losses + float(nll_alpha) * nll
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
    if "sgdpo" in types:
        sg = stats_of["sgdpo"].detach()
        metrics["sgdpo/pilot_chosen"] = sg[:, COL_PIL_W].mean()
        metrics["sgdpo/pilot_rejected"] = sg[:, COL_PIL_L].mean()
    if nll_alpha or sft_w:
        metrics["nll_loss"] = nll.detach()
    return PreferenceLossOutput(
        loss=loss, losses=losses, chosen_rewards=cr, rejected_rewards=rr,
        chosen_logps=stats[:, COL_LOGP_W], rejected_logps=stats[:, COL_LOGP_L],
        nll_loss=nll.detach(), pilot_masks=None if pilot is None else pilot != 0,
        metrics=metrics)
