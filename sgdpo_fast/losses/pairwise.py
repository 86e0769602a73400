"""The pairwise step: segment sums -> per-pair loss -> per-token gradient weights.

Two implementations of the same math, both returning
``stats [B, N_STATS]`` (columns ``COL_*`` below) and ``grad [2B, T]`` =
``d loss_pair / d policy[t]`` (per pair, without the 1/B of the mean and
without the NLL term):

- ``torch``: plain tensor ops; fp64 inputs stay fp64, others compute in fp32.
  Runs anywhere; the oracle of the kernel's tests.
- ``triton``: ``kernels/pairwise_loss.py``, one launch, fp32.

``PairwiseLossFunction`` (a plain ``torch.autograd.Function``) wraps either:
forward adds the RPO NLL term and the mean over pairs, saves the per-token
weights; backward scales them by the upstream gradients (of the mean loss and,
if used, of the per-pair losses).  The reference log-probs and the pilot
subsets get no gradient (the reference is a constant).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import formulas

COL_LOSS = 0      # per-pair preference loss (no NLL term)
COL_LOGP_W = 1    # chosen policy sequence log-prob (sum, or mean with average_log_prob / simpo)
COL_LOGP_L = 2    # rejected, likewise
COL_REW_W = 3     # chosen reward  beta * (logp - ref logp), same aggregation as COL_LOGP_W
COL_REW_L = 4     # rejected reward
COL_PIL_W = 5     # beta * chosen pilot log-ratio (sgdpo; 0 otherwise)
COL_PIL_L = 6     # beta * rejected pilot log-ratio
COL_SUM_W = 7     # chosen policy log-prob summed over the response (for the NLL term)
N_STATS = 8


@dataclass(frozen=True)
class PairwiseConfig:
    loss_type: str
    beta: float
    label_smoothing: float
    simpo_gamma: float
    average_log_prob: bool
    pilot_grad: bool


def pairwise_torch(policy: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                   pilot: Optional[torch.Tensor], cfg: PairwiseConfig):
    """Torch implementation.  policy/ref [2B, T] float, mask/pilot [2B, T] bool.

    Returns ``(stats [B, N_STATS], grad [2B, T])`` in fp64 for fp64 policy, else fp32.
    Values outside ``mask`` are never read (``where``, not a product, so NaN/inf
    padding is harmless)."""
    ct = torch.float64 if policy.dtype == torch.float64 else torch.float32
    B = policy.shape[0] // 2
    zero = torch.zeros((), dtype=ct, device=policy.device)
    pol = torch.where(mask, policy.to(ct), zero)
    rf = torch.where(mask, ref.to(ct), zero) if ref is not None else torch.zeros_like(pol)
    S = pol.sum(1)
    Dr = (pol - rf).sum(1)        # log-ratio sums token by token (no cancellation of two sums)
    n = mask.sum(1).to(ct)
    one = torch.ones_like(n)

    lt = cfg.loss_type
    a_r = n if (cfg.average_log_prob or lt == "simpo") else one
    logp = S / a_r
    rew = cfg.beta * Dr / a_r
    a = n if (cfg.average_log_prob or lt in formulas.LOSS_SIDE_AVERAGED) else one
    rho = Dr / a

    pil = torch.zeros_like(rho)
    ap = one
    if lt == "sgdpo":
        ap = pilot.sum(1).to(ct) if cfg.average_log_prob else one
        pil = torch.where(pilot, pol - rf, zero).sum(1) / ap
    loss, (d_w, d_l, d_pw, d_pl) = formulas.pair_loss(
        lt, rho[:B], rho[B:], pil[:B], pil[B:], beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma)

    coef = torch.cat([d_w, d_l]) / a
    grad = torch.where(mask, coef[:, None], zero)
    if lt == "sgdpo" and cfg.pilot_grad:
        pcoef = torch.cat([d_pw, d_pl]) / ap
        grad = grad + torch.where(pilot, pcoef[:, None], zero)

    stats = torch.stack([loss, logp[:B], logp[B:], rew[:B], rew[B:],
                         cfg.beta * pil[:B], cfg.beta * pil[B:], S[:B]], dim=1)
    return stats, grad


def pairwise_triton(policy, ref, mask, pilot, cfg: PairwiseConfig):
    """Triton implementation (CUDA, or CPU under TRITON_INTERPRET=1); fp32 results."""
    from ..kernels.pairwise_loss import pairwise_loss_fwd

    def u8(m):
        return None if m is None else m.contiguous().view(torch.uint8)

    return pairwise_loss_fwd(
        policy.contiguous(), None if ref is None else ref.contiguous(), u8(mask), u8(pilot),
        loss_code=formulas.LOSS_CODE[cfg.loss_type], beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
        average_log_prob=cfg.average_log_prob, pilot_grad=cfg.pilot_grad)


_IMPLS = {"torch": pairwise_torch, "triton": pairwise_triton}


def resolve_impl(impl: str, policy: torch.Tensor) -> str:
    """``auto``: the Triton kernel for CUDA tensors (not fp64), else torch."""
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"impl must be 'auto', 'torch' or 'triton', got {impl!r}")
    from ..ops.backends import triton_usable
    if impl == "triton":
        if not triton_usable(policy.device):
            raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU) and triton")
        if policy.dtype == torch.float64:
            raise ValueError("impl='triton' computes in fp32; use impl='torch' for fp64 inputs")
        return "triton"
    if impl == "auto" and policy.is_cuda and policy.dtype != torch.float64 and triton_usable(policy.device):
        return "triton"
    return "torch"


class PairwiseLossFunction(torch.autograd.Function):
    """(policy [2B,T], ref, mask, pilot) -> loss [], losses [B], stats [B,N_STATS], nll [].

    Only ``policy`` is differentiable.  ``losses[i]`` = preference loss of pair i
    plus ``nll_alpha * nll`` (the NLL is a batch-level token mean, as TRL's
    rpo_alpha), ``loss = losses.mean()``."""

    @staticmethod
    def forward(ctx, policy, ref, mask, pilot, cfg, nll_alpha, impl):
        stats, grad = _IMPLS[impl](policy.detach(), None if ref is None else ref.detach(),
                                   mask, pilot, cfg)
        B = stats.shape[0]
        nll = torch.zeros((), dtype=stats.dtype, device=stats.device)
        n_chosen = mask[:B].sum().to(stats.dtype)
        if nll_alpha:
            nll = -stats[:, COL_SUM_W].sum() / n_chosen
        losses = stats[:, COL_LOSS] + nll_alpha * nll
        loss = losses.mean()
        ctx.save_for_backward(grad, mask, n_chosen)
        ctx.nll_alpha = float(nll_alpha)
        ctx.policy_dtype = policy.dtype
        ctx.mark_non_differentiable(stats, nll)
        return loss, losses, stats, nll

    @staticmethod
    def backward(ctx, grad_loss, grad_losses, _grad_stats, _grad_nll):
        grad, mask, n_chosen = ctx.saved_tensors
        B = grad.shape[0] // 2
        u = torch.zeros(B, dtype=grad.dtype, device=grad.device)
        if grad_loss is not None:
            u = u + grad_loss.to(grad.dtype) / B
        if grad_losses is not None:
            u = u + grad_losses.to(grad.dtype)
        g = grad * torch.cat([u, u])[:, None]
        if ctx.nll_alpha:
            nll_w = (-ctx.nll_alpha / n_chosen) * u.sum()
            g[:B] += torch.where(mask[:B], nll_w, torch.zeros((), dtype=g.dtype, device=g.device))
        return g.to(ctx.policy_dtype), None, None, None, None, None, None


def pairwise_loss(policy: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                  pilot: Optional[torch.Tensor], cfg: PairwiseConfig, nll_alpha: float = 0.0,
                  impl: str = "auto"):
    """Differentiable pairwise loss on validated inputs; see ``PairwiseLossFunction``."""
    name = resolve_impl(impl, policy)
    return PairwiseLossFunction.apply(policy, ref, mask, pilot, cfg, float(nll_alpha), name)
