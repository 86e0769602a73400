"""``FusedLinearPreferenceLoss``: LM head + preference loss without the [tokens x vocab] logits.

Policy per-token log-probs come from ``sgdpo_fast.fused_token_logprobs`` (with
gradient), the reference ones from the same op under ``torch.no_grad`` (nothing
saved for backward) or are given as ``ref_token_logps``; then
``preference_loss``.  Calling convention of Liger-Kernel's
``LigerFusedLinearDPOLoss``: ``forward(lin_weight, _input, target, bias=None,
ref_input=None, ref_weight=None, ref_bias=None)`` positionally, Liger's keyword
names accepted as aliases, and ``(loss, aux)`` returned with ``aux`` a tuple in
Liger's order, so code written for Liger switches by changing the class.
"""
from __future__ import annotations

from collections import namedtuple
from typing import Optional

import torch
from torch import nn

from ..ops import fused_token_logprobs
from . import formulas
from .preference import preference_loss

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
        wsum = weight.float().sum(0)
        out = []
        for rows in (slice(None, B), slice(B, None)):
            m = hidden[rows].float().sum((0, 1)) @ wsum / (B * T * V)
            if bias is not None:
                m = m + bias.float().mean()
            out.append(m)
        return out


def _pick(name, ours, alias, alias_name):
    if alias is not None:
        if ours is not None:
            raise ValueError(f"pass {name} or its Liger alias {alias_name}, not both")
        return alias
    return ours


class FusedLinearPreferenceLoss(nn.Module):
    """Fused LM head + DPO-family / SGDPO loss.

    Args (preference ones as ``preference_loss``): loss_type ("sgdpo" default;
    "sigmoid", "ipo", "hinge", "robust", "simpo"), beta, ignore_index,
    label_smoothing, pilot_ratio_chosen, pilot_ratio_rejected, pilot_grad,
    pilot_mode, average_log_prob, simpo_gamma, nll_alpha; backend of the
    log-prob op ("auto", "torch", "cpu", "triton", "cuda").
    Liger's constructor arguments are accepted: ``compute_nll_loss=True`` with
    ``alpha`` sets the NLL weight (same NLL as Liger's), ``use_ref_model=False``
    takes the reference log-probs as 0 (as Liger does); ``compiled`` and
    ``chunk_size`` are accepted and ignored (nothing to compile or chunk here).
    """

    def __init__(self, loss_type: str = "sgdpo", beta: float = 0.1, ignore_index: int = -100,
                 label_smoothing: float = 0.0, pilot_ratio_chosen: float = 0.6,
                 pilot_ratio_rejected: float = 0.9, pilot_grad: bool = False,
                 pilot_mode: str = "different", average_log_prob: bool = False,
                 simpo_gamma: float = 0.5, nll_alpha: float = 0.0, backend: str = "auto", *,
                 alpha: float = 1.0, compute_nll_loss: bool = False, use_ref_model: bool = True,
                 compiled: bool = True, chunk_size: int = 1):
        super().__init__()
        if loss_type not in formulas.LOSS_TYPES:
            raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {formulas.LOSS_TYPES}")
        if compute_nll_loss and nll_alpha:
            raise ValueError("give the NLL weight once: nll_alpha, or Liger's compute_nll_loss=True with alpha")
        if not isinstance(ignore_index, int):
            raise ValueError(f"ignore_index must be an int, got {ignore_index!r}")
        self.loss_type = loss_type
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
        [2B, T]; generator for the SGDPO pilot draw.  Returns ``(loss, PreferenceAux)``."""
        weight = _pick("weight", weight, lin_weight, "lin_weight")
        hidden = _pick("hidden", hidden, _input, "_input")
        targets = _pick("targets", targets, target, "target")
        ref_hidden = _pick("ref_hidden", ref_hidden, ref_input, "ref_input")
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

        op = dict(ignore_index=self.ignore_index, backend=self.backend)
        policy = fused_token_logprobs(hidden, weight, targets, bias=bias, **op)

        needs_ref = self.loss_type in formulas.NEEDS_REF
        ref = None
        if not self.use_ref_model and needs_ref:
            ref = torch.zeros_like(policy)
        elif ref_token_logps is not None:
            if not isinstance(ref_token_logps, torch.Tensor) or tuple(ref_token_logps.shape) != tuple(targets.shape):
                raise ValueError(f"ref_token_logps must be [2B, T] = {tuple(targets.shape)}")
            ref = ref_token_logps.detach()
        elif ref_hidden is not None and needs_ref:
            if ref_weight is None:
                ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
            with torch.no_grad():
                ref = fused_token_logprobs(
                    ref_hidden.detach(), ref_weight.detach(), targets,
                    bias=None if ref_bias is None else ref_bias.detach(), **op)

        out = preference_loss(
            policy, ref, targets != self.ignore_index, loss_type=self.loss_type, beta=self.beta,
            label_smoothing=self.label_smoothing, pilot_ratio_chosen=self.pilot_ratio_chosen,
            pilot_ratio_rejected=self.pilot_ratio_rejected, pilot_grad=self.pilot_grad,
            pilot_mode=self.pilot_mode, generator=generator,
            average_log_prob=self.average_log_prob, simpo_gamma=self.simpo_gamma,
            nll_alpha=self.nll_alpha)
        cm, rm = _logits_means(hidden, weight, bias, B)
        aux = PreferenceAux(out.chosen_logps, out.rejected_logps, cm, rm, out.nll_loss,
                            out.chosen_rewards, out.rejected_rewards)
        aux.metrics = out.metrics
        aux.losses = out.losses
        aux.output = out
        aux.policy_token_logps = policy
        return out.loss, aux
