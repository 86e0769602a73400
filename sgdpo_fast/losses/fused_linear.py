"""The fused-head preference losses: LM head + loss without the [tokens x vocab] logits.

Two classes, one implementation (:class:`FusedLinearPreferenceLoss`'s ``forward``):

- :class:`FusedLinearDPOLoss`: Liger-Kernel's ``LigerFusedLinearDPOLoss`` calling
  convention exactly (constructor order and defaults, ``loss_type="sigmoid"``, Liger's
  label-smoothing convention, ``forward(lin_weight, _input, target, bias=None,
  ref_input=None, ref_weight=None, ref_bias=None)``, ``(loss, aux)`` with Liger's aux
  tuple), so code written for Liger switches by changing the import and the class;
  plus every other loss type of ``preference_loss`` (TRL's, SimPO, SGDPO) as keywords.
- :class:`FusedLinearPreferenceLoss`: the same module with sgdpo_fast's constructor
  (``loss_type="sgdpo"`` first, SGDPO's options next; kept for existing code).

Policy per-token log-probs come from ``sgdpo_fast.ops.token_logprobs`` (with gradient),
the reference ones from the same op under ``torch.no_grad`` (nothing saved for
backward) or are given as ``ref_token_logps``; then ``preference_loss``.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional, Sequence, Union

import torch
from torch import nn

from ..ops import LogprobPlan, token_logprobs
from . import formulas
from .preference import loss_type_list, preference_loss, validate_loss_options

# loss types whose label smoothing Liger 0.8.5 (and TRL 1.16) read; Liger ignores it for
# the others (sigmoid included), sgdpo_fast's own types (simpo, sgdpo, aot*) apply it
LIGER_IGNORES_SMOOTHING = frozenset({"sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard",
                                     "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft"})

_AuxBase = namedtuple("_AuxBase", ["chosen_logps", "rejected_logps", "chosen_logits_mean",
                                   "rejected_logits_mean", "nll_loss", "chosen_rewards",
                                   "rejected_rewards"])


class PreferenceAux(_AuxBase):
    """Liger's aux tuple ``(chosen_logps [B], rejected_logps [B], chosen_logits_mean [],
    rejected_logits_mean [], nll_loss [], chosen_rewards [B], rejected_rewards [B])``, all
    detached; plus attributes ``metrics`` (TRL's names, see ``PreferenceLossOutput``),
    ``losses`` [B] (differentiable), ``output`` (the whole ``PreferenceLossOutput``) and
    ``policy_token_logps`` [2B, T] (differentiable, 0 at ignored positions).

    ``*_logits_mean`` are Liger's: the mean of all ``B*T*V`` logits of the chosen
    (rejected) rows, ignored positions included, computed without the logits as
    ``(sum of hidden rows) . (sum of weight rows) / (B*T*V) + mean(bias)``."""


def _logits_means(hidden, weight, bias, B):
    with torch.no_grad():
        T = hidden.shape[1]
        V = weight.shape[0]
        # fp32 sums without fp32 copies of the head or the hidden states
        wsum = weight.sum(0, dtype=torch.float32)
        out = []
        for rows in (slice(None, B), slice(B, None)):
            m = hidden[rows].sum((0, 1), dtype=torch.float32) @ wsum / (B * T * V)
            if bias is not None:
                m = m + bias.mean(dtype=torch.float32)
            out.append(m)
        return out


# WPO needs log(sum p^2) per token, from the same sweep as the log-probs (a constant: plans
# are frozen, and one built outside a compiled function keeps torch.compile's graph whole)
_WPO_PLAN = LogprobPlan(metrics=("log_sum_sq_probs",))


def _check_reference(ref_hidden, ref_weight, ref_bias, weight):
    """The reference pass's tensors checked under their own names (the op would say
    hidden / weight / bias)."""
    rw = weight if ref_weight is None else ref_weight
    rw_name = "weight" if ref_weight is None else "ref_weight"
    if not isinstance(rw, torch.Tensor) or rw.dim() != 2:
        raise ValueError(f"{rw_name} must be a 2-D tensor [V, D]")
    if ref_hidden.dtype != rw.dtype:
        raise ValueError(f"ref_hidden dtype {ref_hidden.dtype} differs from {rw_name} dtype "
                         f"{rw.dtype}")
    if ref_hidden.device != rw.device:
        raise ValueError(f"ref_hidden is on {ref_hidden.device} but {rw_name} is on {rw.device}")
    if ref_bias is not None:
        if not isinstance(ref_bias, torch.Tensor) or tuple(ref_bias.shape) != (rw.shape[0],):
            got = tuple(ref_bias.shape) if isinstance(ref_bias, torch.Tensor) else type(ref_bias)
            raise ValueError(f"ref_bias must have shape [V]=({rw.shape[0]},), got {got}")
        if ref_bias.dtype != rw.dtype:
            raise ValueError(f"ref_bias dtype {ref_bias.dtype} differs from {rw_name} dtype "
                             f"{rw.dtype}")


def _pick(name, ours, alias, alias_name):
    if alias is not None:
        if ours is not None:
            raise ValueError(f"pass {name} or its Liger alias {alias_name}, not both")
        return alias
    return ours


class FusedLinearPreferenceLoss(nn.Module):
    """Fused LM head + DPO-family / SGDPO loss (sgdpo_fast's constructor order).

    Args (preference ones as ``preference_loss``): loss_type ("sgdpo" default; any of
    ``formulas.LOSS_TYPES`` or a list with ``loss_weights``), beta, ignore_index,
    label_smoothing, pilot_ratio_chosen, pilot_ratio_rejected, pilot_grad, pilot_mode,
    average_log_prob, simpo_gamma, nll_alpha; backend of the log-prob op ("auto",
    "torch", "cpu", "triton", "cuda"); keywords: TRL's loss_weights, discopop_tau,
    f_divergence_type, f_alpha_divergence_coef, ld_alpha, use_weighting (WPO: the op
    also returns ``log_sum_sq_probs`` from the same sweep), and pairwise_impl.
    Liger's constructor arguments are accepted: ``compute_nll_loss=True`` with
    ``alpha`` sets the NLL weight (same NLL as Liger's), ``use_ref_model=False``
    takes the reference log-probs as 0 (as Liger does); ``compiled`` and
    ``chunk_size`` are accepted and ignored (nothing to compile or chunk here).
    Options are validated here, when the module is built.
    """

    def __init__(self, loss_type: Union[str, Sequence[str]] = "sgdpo", beta: float = 0.1,
                 ignore_index: int = -100, label_smoothing: float = 0.0,
                 pilot_ratio_chosen: float = 0.6, pilot_ratio_rejected: float = 0.9,
                 pilot_grad: bool = False, pilot_mode: str = "different",
                 average_log_prob: bool = False, simpo_gamma: float = 0.5, nll_alpha: float = 0.0,
                 backend: str = "auto", *, alpha: float = 1.0, compute_nll_loss: bool = False,
                 use_ref_model: bool = True, compiled: bool = True, chunk_size: int = 1,
                 loss_weights: Optional[Sequence[float]] = None, discopop_tau: float = 0.05,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha: Optional[float] = None, use_weighting: bool = False,
                 pairwise_impl: str = "auto"):
        super().__init__()
        types = loss_type_list(loss_type)
        if compute_nll_loss and nll_alpha:
            raise ValueError("give the NLL weight once: nll_alpha, or Liger's compute_nll_loss=True with alpha")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.loss_type = loss_type if isinstance(loss_type, str) else list(types)
        self.beta = beta
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.pilot_ratio_chosen = pilot_ratio_chosen
        self.pilot_ratio_rejected = pilot_ratio_rejected
        self.pilot_grad = pilot_grad
        self.pilot_mode = pilot_mode
        self.average_log_prob = average_log_prob
        self.simpo_gamma = simpo_gamma
        self.nll_alpha = float(alpha) if compute_nll_loss else float(nll_alpha)
        self.use_ref_model = use_ref_model
        self.backend = backend
        self.loss_weights = None if loss_weights is None else list(loss_weights)
        self.discopop_tau = discopop_tau
        self.f_divergence_type = f_divergence_type
        self.f_alpha_divergence_coef = f_alpha_divergence_coef
        self.ld_alpha = ld_alpha
        self.use_weighting = use_weighting
        self.pairwise_impl = pairwise_impl
        validate_loss_options(
            types, beta=beta, label_smoothing=self._label_smoothing(), loss_weights=loss_weights,
            simpo_gamma=simpo_gamma, nll_alpha=self.nll_alpha, discopop_tau=discopop_tau,
            f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
            ld_alpha=ld_alpha, use_weighting=use_weighting, r1=pilot_ratio_chosen,
            r2=pilot_ratio_rejected, pilot_mode=pilot_mode)

    def _label_smoothing(self) -> float:
        """The label smoothing handed to ``preference_loss`` (sgdpo_fast's convention: as given)."""
        return self.label_smoothing

    def extra_repr(self) -> str:
        return f"loss_type={self.loss_type!r}, beta={self.beta}, backend={self.backend!r}"

    def forward(self, weight=None, hidden=None, targets=None, bias=None, ref_hidden=None,
                ref_weight=None, ref_bias=None, ref_token_logps=None,
                generator: Optional[torch.Generator] = None, *, lin_weight=None, _input=None,
                target=None, ref_input=None):
        """weight [V, D]; hidden [2B, T, D] (chosen rows first); targets [2B, T] aligned with
        hidden (the caller shifts), ``ignore_index`` off the response; bias [V] or None;
        reference: ref_hidden [2B, T, D] with ref_weight [V, D] (default ``weight``) and
        ref_bias (default ``bias`` when ref_weight defaults, else None), or ref_token_logps
        [2B, T]; generator for the SGDPO pilot draw.  Liger's names (lin_weight, _input,
        target, ref_input) are accepted as aliases.  Returns ``(loss, PreferenceAux)``."""
        weight = _pick("weight", weight, lin_weight, "lin_weight")
        hidden = _pick("hidden", hidden, _input, "_input")
        targets = _pick("targets", targets, target, "target")
        ref_hidden = _pick("ref_hidden", ref_hidden, ref_input, "ref_input")
        return self._fused_loss(weight, hidden, targets, bias, ref_hidden, ref_weight, ref_bias,
                                ref_token_logps, generator)

    def _fused_loss(self, weight, hidden, targets, bias, ref_hidden, ref_weight, ref_bias,
                    ref_token_logps, generator):
        for name, val in (("weight", weight), ("hidden", hidden), ("targets", targets)):
            if val is None:
                raise ValueError(f"{name} is required")
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"hidden must be [2B, T, D], got "
                             f"{tuple(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden)}")
        if not isinstance(targets, torch.Tensor) or tuple(targets.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"targets must be [2B, T] = {tuple(hidden.shape[:2])}, got "
                             f"{tuple(targets.shape) if isinstance(targets, torch.Tensor) else type(targets)}")
        rows = hidden.shape[0]
        if rows == 0 or rows % 2:
            raise ValueError(f"hidden needs an even, non-zero number of rows (chosen then rejected), got {rows}")
        B = rows // 2
        if ref_token_logps is not None and ref_hidden is not None:
            raise ValueError("give the reference as ref_hidden (+ ref_weight) or as ref_token_logps, not both")
        if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
            raise ValueError("ref_weight / ref_bias need ref_hidden")
        if ref_hidden is not None:  # named here: the op would call it "hidden"
            rw = weight if ref_weight is None else ref_weight
            want = (*hidden.shape[:2], rw.shape[-1] if isinstance(rw, torch.Tensor) else "D")
            if not isinstance(ref_hidden, torch.Tensor) or tuple(ref_hidden.shape) != want:
                got = tuple(ref_hidden.shape) if isinstance(ref_hidden, torch.Tensor) else type(ref_hidden)
                raise ValueError(f"ref_hidden must be [2B, T, D] = {want} (2B, T of hidden; D of "
                                 f"{'weight' if ref_weight is None else 'ref_weight'}), got {got}")
            _check_reference(ref_hidden, ref_weight, ref_bias, weight)

        op = dict(ignore_index=self.ignore_index, backend=self.backend)
        plan = _WPO_PLAN if self.use_weighting else None
        policy, met = token_logprobs(hidden, weight, targets, bias=bias, plan=plan, **op)

        types = loss_type_list(self.loss_type)
        needs_ref = any(t in formulas.NEEDS_REF for t in types)
        ref = None
        if not self.use_ref_model and needs_ref:
            ref = torch.zeros_like(policy)
        elif ref_token_logps is not None:
            if not isinstance(ref_token_logps, torch.Tensor) or tuple(ref_token_logps.shape) != tuple(targets.shape):
                raise ValueError(f"ref_token_logps must be [2B, T] = {tuple(targets.shape)}")
            ref = ref_token_logps.detach()
        elif ref_hidden is not None:
            if ref_weight is None:
                ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
            with torch.no_grad():
                ref = token_logprobs(ref_hidden.detach(), ref_weight.detach(), targets,
                                     bias=None if ref_bias is None else ref_bias.detach(), **op)[0]
        elif needs_ref:
            need = [t for t in types if t in formulas.NEEDS_REF]
            raise ValueError(f"loss_type {need} needs a reference: pass ref_input (ref_hidden) "
                             f"with ref_weight, or ref_token_logps, or build the module with "
                             f"use_ref_model=False (reference log-probs taken as 0, as Liger does)")

        out = preference_loss(
            policy, ref, targets != self.ignore_index, loss_type=self.loss_type, beta=self.beta,
            label_smoothing=self._label_smoothing(), pilot_ratio_chosen=self.pilot_ratio_chosen,
            pilot_ratio_rejected=self.pilot_ratio_rejected, pilot_grad=self.pilot_grad,
            pilot_mode=self.pilot_mode, generator=generator,
            average_log_prob=self.average_log_prob, simpo_gamma=self.simpo_gamma,
            nll_alpha=self.nll_alpha, loss_weights=self.loss_weights,
            discopop_tau=self.discopop_tau, f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting, log_sum_sq_probs=met.get("log_sum_sq_probs"),
            pairwise_impl=self.pairwise_impl)
        cm, rm = _logits_means(hidden, weight, bias, B)
        aux = PreferenceAux(out.chosen_logps, out.rejected_logps, cm, rm, out.nll_loss,
                            out.chosen_rewards, out.rejected_rewards)
        aux.metrics = out.metrics
        aux.losses = out.losses
        aux.output = out
        aux.policy_token_logps = policy
        return out.loss, aux


class FusedLinearDPOLoss(FusedLinearPreferenceLoss):
    """Drop-in for Liger-Kernel's ``LigerFusedLinearDPOLoss`` (0.8.5): same constructor
    (positional order and defaults: ``ignore_index=-100, beta=0.1, alpha=1.0,
    compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False,
    chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05``), same
    ``forward(lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
    ref_bias=None)``, same result ``(loss, (chosen_logps, rejected_logps,
    chosen_logits_mean, rejected_logits_mean, nll_loss, chosen_rewards,
    rejected_rewards))`` (a :class:`PreferenceAux`, which also carries ``metrics``,
    ``losses``, ``output`` and ``policy_token_logps``).

    Liger's loss types (sigmoid, hinge, exo_pair, nca_pair, robust, bco_pair, sppo_hard,
    apo_zero, apo_down, discopop) give Liger's numbers, including its label-smoothing
    convention: ``label_smoothing`` is read by robust and exo_pair only (Liger ignores it
    for sigmoid and the rest).  Beyond Liger: ``ipo``, ``sigmoid_norm``, ``aot``,
    ``aot_unpaired``, ``sft`` (TRL 1.16's), ``simpo`` and ``sgdpo`` (with keyword options
    ``pilot_ratio_chosen``, ``pilot_ratio_rejected``, ``pilot_mode``, ``pilot_grad``),
    lists with ``loss_weights``, ``ld_alpha``, ``f_divergence_type``,
    ``use_weighting`` and the log-prob ``backend``, all as keywords.  ``compiled`` and
    ``chunk_size`` are accepted and ignored.  ``forward`` also takes keyword
    ``ref_token_logps`` (a precomputed reference) and ``generator`` (SGDPO's pilots).
    """

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0,
                 compute_nll_loss: bool = False, compiled: bool = True, use_ref_model: bool = True,
                 average_log_prob: bool = False, chunk_size: int = 1,
                 loss_type: Union[str, Sequence[str]] = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05, *, pilot_ratio_chosen: float = 0.6,
                 pilot_ratio_rejected: float = 0.9, pilot_grad: bool = False,
                 pilot_mode: str = "different", simpo_gamma: float = 0.5,
                 loss_weights: Optional[Sequence[float]] = None,
                 f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                 ld_alpha: Optional[float] = None, use_weighting: bool = False,
                 backend: str = "auto", pairwise_impl: str = "auto"):
        super().__init__(
            loss_type, beta, ignore_index, label_smoothing, pilot_ratio_chosen,
            pilot_ratio_rejected, pilot_grad, pilot_mode, average_log_prob, simpo_gamma, 0.0,
            backend, alpha=alpha, compute_nll_loss=compute_nll_loss, use_ref_model=use_ref_model,
            compiled=compiled, chunk_size=chunk_size, loss_weights=loss_weights,
            discopop_tau=discopop_tau, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, ld_alpha=ld_alpha,
            use_weighting=use_weighting, pairwise_impl=pairwise_impl)
        types = loss_type_list(loss_type)
        if label_smoothing and len(types) > 1 and any(t in LIGER_IGNORES_SMOOTHING for t in types) \
                and not all(t in LIGER_IGNORES_SMOOTHING for t in types):
            ignored = [t for t in types if t in LIGER_IGNORES_SMOOTHING]
            raise ValueError(
                f"label_smoothing={label_smoothing} with loss_type {list(types)}: Liger's convention "
                f"ignores it for {ignored} and applies it to the others; one value cannot serve "
                f"both in one combined loss (use label_smoothing=0, or FusedLinearPreferenceLoss, "
                f"which applies it to every type that reads it)")
        self.alpha = alpha                        # Liger's attributes, as Liger sets them
        self.compute_nll_loss = compute_nll_loss
        self.compiled = compiled
        self.chunk_size = chunk_size

    def _label_smoothing(self) -> float:
        """Liger's convention: label smoothing only where Liger (and TRL 1.16) read it."""
        types = loss_type_list(self.loss_type)
        if all(t in LIGER_IGNORES_SMOOTHING for t in types):
            return 0.0
        return self.label_smoothing

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None,
                ref_bias=None, *, ref_token_logps=None, generator: Optional[torch.Generator] = None):
        """Liger's forward: lin_weight [V, D], _input [2B, T, D] (chosen rows first), target
        [2B, T] (``ignore_index`` off the response), bias [V], ref_input [2B, T, D] with
        ref_weight / ref_bias (default the policy head's); or keyword ref_token_logps
        [2B, T].  Returns ``(loss, aux)`` in Liger's layout."""
        return self._fused_loss(lin_weight, _input, target, bias, ref_input, ref_weight, ref_bias,
                                ref_token_logps, generator)
