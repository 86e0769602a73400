"""The pairwise step: segment sums -> per-pair loss -> per-token gradient weights.

Two implementations of the same math, both returning ``stats [B, N_STATS]`` (columns
``COL_*`` of ``kernels/pairwise_codes.py``), ``grad [2B, T]`` = ``d loss_pair /
d policy[t]`` (per pair, without the 1/B of the mean and without the NLL term) and
``owner [2B]`` (the stats row whose loss each row's gradient belongs to):

- ``torch``: plain tensor ops; fp64 inputs stay fp64, others compute in fp32.
  Runs anywhere; the oracle of the kernel's tests.  Every loss type.
- ``triton``: ``kernels/pairwise_loss.py``, one launch, fp32.  Every per-pair loss type
  (``KERNEL_LOSS_TYPES``: all but ``aot`` / ``aot_unpaired``, which sort the batch and
  so are not a one-program-per-pair computation; :func:`resolve_impl` routes them to
  the torch path, on whatever device the tensors are).

Both run inside the custom op ``sgdpo_fast::pairwise_loss`` (``torch.library``: a fake
implementation and registered autograd), so ``torch.compile(fullgraph=True)`` sees one
node; its checks that read tensor values (a response with no token, pilots outside the
response, masks that are not 0/1) run inside it.  Of the ``stats`` columns only
``COL_LOSS`` and ``COL_SUM_W`` carry gradients (through ``grad`` and the chosen mask);
the others are reported values (``preference_loss`` detaches them).  The reference
log-probs and the pilot subsets get no gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional, Tuple

import torch

from ..kernels.pairwise_codes import (COL_LOGP_L, COL_LOGP_W, COL_LOSS, COL_PIL_L,  # noqa: F401
                                      COL_PIL_W, COL_REW_L, COL_REW_W, COL_SUM_W, FDIV_CODE,
                                      KERNEL_LOSS_TYPES, LOSS_CODE, N_STATS)
from ..ops.first_order import first_order
from . import formulas

IMPLS = ("auto", "torch", "triton")


@dataclass(frozen=True)
class PairwiseConfig:
    """The pairwise step's options (``preference_loss``'s, validated there)."""
    loss_type: str
    beta: float
    label_smoothing: float
    simpo_gamma: float
    average_log_prob: bool
    pilot_grad: bool
    discopop_tau: float = 0.05
    f_divergence: str = "reverse_kl"
    f_alpha: float = 0.5


def _ranks(order: torch.Tensor) -> torch.Tensor:
    """Inverse permutation: ``rank[order[i]] = i``."""
    return torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))


def _aot(lt, x, S, R, a, cfg, B):
    """AOT (TRL 1.16): cDPO of the difference of two *sorted* batch vectors.  ``aot_unpaired``
    sorts the chosen and the rejected log-ratios separately; ``aot`` the policy's
    chosen - rejected log-prob differences and the reference's.  Returns the loss at each
    sorted position i [B], ``d loss_i / d x`` for every row [2B] and the sorted position
    whose loss each row feeds (``owner`` [2B])."""
    if lt == "aot_unpaired":
        ow, ol = torch.argsort(x[:B]), torch.argsort(x[B:])
        delta = x[:B][ow] - x[B:][ol]
        rw, rl = _ranks(ow), _ranks(ol)
    else:
        lw = S[:B] / a[:B] - S[B:] / a[B:]
        lr = R[:B] / a[:B] - R[B:] / a[B:]
        op, oq = torch.argsort(lw), torch.argsort(lr)
        delta = lw[op] - lr[oq]
        rw = rl = _ranks(op)
    val, d = formulas.cdpo(cfg.beta * delta, cfg.label_smoothing)
    d = cfg.beta * d
    return val, torch.cat([d[rw], -d[rl]]), torch.cat([rw, rl])


def pairwise_torch(policy: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                   pilot: Optional[torch.Tensor], cfg: PairwiseConfig):
    """Torch implementation.  policy/ref [2B, T] float, mask/pilot [2B, T] bool.

    Returns ``(stats [B, N_STATS], grad [2B, T], owner [2B] int64)`` (stats and grad in
    fp64 for fp64 policy, else fp32; ``owner[r]``: the stats row whose ``COL_LOSS`` row
    ``r``'s gradient belongs to, ``r mod B`` except for the sorting aot losses).  Values
    outside ``mask`` are never read (``where``, not a product, so NaN/inf padding is
    harmless)."""
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
    a = n if (cfg.average_log_prob or lt in formulas.ALWAYS_AVERAGED) else one
    logp = S / a
    x = Dr / a
    rew = cfg.beta * x
    owner = torch.arange(B, device=policy.device).repeat(2)

    pil = torch.zeros_like(x)
    if lt in formulas.BATCH_LOSS_TYPES:
        loss, d_x, owner = _aot(lt, x, S, rf.sum(1), a, cfg, B)
        grad = torch.where(mask, (d_x / a)[:, None], zero)
    else:
        c = n if (lt in formulas.LENGTH_NORMALIZED and not cfg.average_log_prob) else one
        s, ds = formulas.f_score(x, cfg.f_divergence, cfg.f_alpha)
        s, ds = s / c, ds / c
        sp = dsp = ap = None
        if lt == "sgdpo":
            ap = pilot.sum(1).to(ct) if cfg.average_log_prob else one
            pil = torch.where(pilot, pol - rf, zero).sum(1) / ap
            sp, dsp = formulas.f_score(pil, cfg.f_divergence, cfg.f_alpha)
        loss, (d_w, d_l, d_pw, d_pl) = formulas.pair_loss(
            lt, s[:B], s[B:], None if sp is None else sp[:B], None if sp is None else sp[B:],
            beta=cfg.beta, label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
            discopop_tau=cfg.discopop_tau)
        # zero derivatives stay 0 where ds is infinite (a -inf log-prob's limit)
        d_x = torch.cat([d_w, d_l])
        coef = torch.where(d_x == 0, zero, d_x * ds) / a
        grad = torch.where(mask, coef[:, None], zero)
        if lt == "sgdpo" and cfg.pilot_grad:
            d_p = torch.cat([d_pw, d_pl])
            pcoef = torch.where(d_p == 0, zero, d_p * dsp) / ap
            grad = grad + torch.where(pilot, pcoef[:, None], zero)

    stats = torch.stack([loss, logp[:B], logp[B:], rew[:B], rew[B:],
                         cfg.beta * pil[:B], cfg.beta * pil[B:], S[:B]], dim=1)
    return stats, grad, owner


def pairwise_triton(policy, ref, mask, pilot, cfg: PairwiseConfig):
    """Triton implementation (CUDA, or CPU under TRITON_INTERPRET=1) of the per-pair loss
    types (``KERNEL_LOSS_TYPES``); fp32 results, the same triple as :func:`pairwise_torch`."""
    from ..kernels.pairwise_loss import pairwise_loss_fwd

    def u8(m):
        return None if m is None else m.contiguous().view(torch.uint8)

    stats, grad = pairwise_loss_fwd(
        policy.contiguous(), None if ref is None else ref.contiguous(), u8(mask), u8(pilot),
        loss_code=LOSS_CODE[cfg.loss_type], beta=cfg.beta,
        label_smoothing=cfg.label_smoothing, simpo_gamma=cfg.simpo_gamma,
        average_log_prob=cfg.average_log_prob, pilot_grad=cfg.pilot_grad,
        discopop_tau=cfg.discopop_tau, fdiv_code=FDIV_CODE[cfg.f_divergence],
        f_alpha=cfg.f_alpha)
    B = stats.shape[0]
    return stats, grad, torch.arange(B, device=policy.device).repeat(2)


_IMPLS = MappingProxyType({"torch": pairwise_torch, "triton": pairwise_triton})


@torch.compiler.assume_constant_result
def resolve_impl(impl: str, device_type: str, is_fp64: bool, loss_type: str = "sigmoid") -> str:
    """``auto``: the Triton kernel for CUDA tensors (not fp64) and the per-pair loss types,
    else torch.  The batch-level ``aot`` / ``aot_unpaired`` sort the batch's log-ratios,
    which a one-program-per-pair kernel cannot: they always take the torch path (on the
    tensors' device; the sort costs O(B log B) on [B] vectors)."""
    if impl not in IMPLS:
        raise ValueError(f"pairwise_impl must be one of {IMPLS}, got {impl!r}")
    from ..ops.backends import triton_usable
    in_kernel = loss_type in KERNEL_LOSS_TYPES
    if impl == "triton":
        if not in_kernel:
            raise ValueError(f"pairwise_impl='triton' does not compute loss_type={loss_type!r} (it "
                             f"sorts the batch); use 'auto' or 'torch'")
        if not triton_usable(device_type):
            raise ValueError("pairwise_impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 "
                             "on CPU) and triton")
        if is_fp64:
            raise ValueError("pairwise_impl='triton' computes in fp32; use 'torch' for fp64 inputs")
        return "triton"
    if impl == "auto" and in_kernel and device_type == "cuda" and not is_fp64 \
            and triton_usable(device_type):
        return "triton"
    return "torch"


def _as_bool(name: str, m: torch.Tensor) -> torch.Tensor:
    """A bool mask from a bool or 0/1 tensor; any other value (0.5, NaN, -1, 2) is an error."""
    if m.dtype == torch.bool:
        return m
    if bool(((m != 0) & (m != 1)).any()):
        bad = m[(m != 0) & (m != 1)].flatten()[0].item()
        raise ValueError(f"{name} must be bool or hold only 0 and 1, found {bad}")
    return m != 0


def check_masks(mask: torch.Tensor, pilot: Optional[torch.Tensor]):
    """Value checks of the masks (bool or 0/1 tensors ``[2B, T]``): every answer has a
    response token; pilots lie inside the response and are not empty.  Returns them as
    bool tensors."""
    mask = _as_bool("mask", mask)
    B = mask.shape[0] // 2
    counts = mask.sum(1)
    if bool((counts == 0).any()):
        row = int((counts == 0).nonzero()[0, 0])
        side = "chosen" if row < B else "rejected"
        raise ValueError(f"pair {row % B} has no response token in its {side} answer (mask row {row} "
                         f"is all False)")
    if pilot is not None:
        pilot = _as_bool("pilot_masks", pilot)
        if bool((pilot & ~mask).any()):
            raise ValueError("pilot_masks marks positions outside the response (mask)")
        if bool((pilot.sum(1) == 0).any()):
            row = int((pilot.sum(1) == 0).nonzero()[0, 0])
            raise ValueError(f"pilot_masks row {row} is empty: every answer needs at least one "
                             f"pilot token")
    return mask, pilot


@torch.library.custom_op("sgdpo_fast::pairwise_loss", mutates_args=())
def _pairwise_op(policy: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                 pilot: Optional[torch.Tensor], loss_type: str, beta: float,
                 label_smoothing: float, simpo_gamma: float, average_log_prob: bool,
                 pilot_grad: bool, impl: str, discopop_tau: float, f_divergence: str,
                 f_alpha: float) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mask, pilot = check_masks(mask, pilot)
    cfg = PairwiseConfig(loss_type, beta, label_smoothing, simpo_gamma, average_log_prob,
                         pilot_grad, discopop_tau, f_divergence, f_alpha)
    stats, grad, owner = _IMPLS[impl](policy.detach(), None if ref is None else ref.detach(),
                                      mask, pilot, cfg)
    return stats, grad.contiguous(), owner


@_pairwise_op.register_fake
def _pairwise_fake(policy, ref, mask, pilot, loss_type, beta, label_smoothing, simpo_gamma,
                   average_log_prob, pilot_grad, impl, discopop_tau, f_divergence, f_alpha):
    ct = torch.float64 if (policy.dtype == torch.float64 and impl == "torch") else torch.float32
    B2, T = policy.shape
    return (policy.new_empty((B2 // 2, N_STATS), dtype=ct),
            policy.new_empty((B2, T), dtype=ct),
            policy.new_empty((B2,), dtype=torch.int64))


N_OP_ARGS = 14


def _pairwise_setup(ctx, inputs, output):
    policy, _, mask = inputs[:3]
    ctx.save_for_backward(output[1], mask, output[2], policy)
    ctx.policy_dtype = policy.dtype


def _pairwise_backward(ctx, grad_stats, _grad_grad, _grad_owner):
    grad, mask, owner, policy = ctx.saved_tensors
    if grad_stats is None:
        return (None,) * N_OP_ARGS
    B = grad.shape[0] // 2
    gs = grad_stats.to(grad.dtype)
    # each row's gradient scales with the upstream gradient of the loss it feeds
    g = grad * gs[:, COL_LOSS][owner][:, None]
    # COL_SUM_W is the plain sum of the chosen policy log-probs over the response
    zero = torch.zeros((), dtype=g.dtype, device=g.device)
    chosen = torch.cat([torch.ones(B, dtype=torch.bool, device=g.device),
                        torch.zeros(B, dtype=torch.bool, device=g.device)])
    g = g + torch.where((mask != 0) & chosen[:, None], torch.cat([gs[:, COL_SUM_W]] * 2)[:, None],
                        zero)
    # closed-form first-order weights: a second-order gradient through them is an error
    (g,) = first_order((g.to(ctx.policy_dtype),), (policy, grad_stats), "preference_loss")
    return (g,) + (None,) * (N_OP_ARGS - 1)


_pairwise_op.register_autograd(_pairwise_backward, setup_context=_pairwise_setup)


def pairwise_stats(policy: torch.Tensor, ref: Optional[torch.Tensor], mask: torch.Tensor,
                   pilot: Optional[torch.Tensor], cfg: PairwiseConfig,
                   impl: str = "auto") -> torch.Tensor:
    """``stats [B, N_STATS]`` of shape-checked inputs, differentiable w.r.t. ``policy``
    through ``COL_LOSS`` and ``COL_SUM_W`` (see the module docstring)."""
    name = resolve_impl(impl, policy.device.type, policy.dtype == torch.float64, cfg.loss_type)
    stats, _, _ = torch.ops.sgdpo_fast.pairwise_loss(
        policy, ref, mask, pilot, cfg.loss_type, float(cfg.beta), float(cfg.label_smoothing),
        float(cfg.simpo_gamma), bool(cfg.average_log_prob), bool(cfg.pilot_grad), name,
        float(cfg.discopop_tau), cfg.f_divergence, float(cfg.f_alpha))
    return stats
