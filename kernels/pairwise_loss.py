"""Triton kernel: the whole pairwise preference loss of one (chosen, rejected) pair per program.

One launch computes, per pair, the segment sums of policy and reference
log-probs over the chosen response, the rejected response and (SGDPO) the two
pilot subsets; then the loss-side log-ratios, the loss, the reported
quantities, and the per-token gradient weights ``d loss_pair / d logp_t``.
The math is the same as ``sgdpo_fast/losses/formulas.py`` (the torch path,
which is also the oracle of the kernel's tests); loss codes and stats columns are
``pairwise_codes.py``'s.  Accumulation in fp32 whatever the input dtype.

Importing this module imports triton; under ``TRITON_INTERPRET=1`` it runs on
CPU tensors (tests).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .pairwise_codes import (COL_LOGP_L, COL_LOGP_W, COL_LOSS, COL_PIL_L, COL_PIL_W, COL_REW_L,
                             COL_REW_W, COL_SUM_W, LOSS_CODE, N_STATS)

BLOCK_T = 256          # tokens per step of the loops over a row
NUM_WARPS = 4

# loss codes as compile-time constants of the kernel (values: pairwise_codes.LOSS_CODE)
SIGMOID = tl.constexpr(LOSS_CODE["sigmoid"])
IPO = tl.constexpr(LOSS_CODE["ipo"])
HINGE = tl.constexpr(LOSS_CODE["hinge"])
ROBUST = tl.constexpr(LOSS_CODE["robust"])
SIMPO = tl.constexpr(LOSS_CODE["simpo"])
SGDPO = tl.constexpr(LOSS_CODE["sgdpo"])
# stats columns, likewise
C_LOSS = tl.constexpr(COL_LOSS)
C_LOGP_W = tl.constexpr(COL_LOGP_W)
C_LOGP_L = tl.constexpr(COL_LOGP_L)
C_REW_W = tl.constexpr(COL_REW_W)
C_REW_L = tl.constexpr(COL_REW_L)
C_PIL_W = tl.constexpr(COL_PIL_W)
C_PIL_L = tl.constexpr(COL_PIL_L)
C_SUM_W = tl.constexpr(COL_SUM_W)


@triton.jit
def _log1p(u):
    # accurate log(1 + u) for u >= 0 without libdevice: log(w) * u / (w - 1), w = 1 + u
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _softplus(x):
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _sigmoid(x):
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _cdpo(z, eps):
    """(1-eps)*softplus(-z) + eps*softplus(z) and its derivative in z (the eps term is
    skipped when eps = 0: 0 * softplus(+inf) would be NaN where the loss is 0)."""
    val = (1.0 - eps) * _softplus(-z) + tl.where(eps > 0, eps * _softplus(z), 0.0)
    d = -(1.0 - eps) * _sigmoid(-z) + eps * _sigmoid(z)
    return val, d


@triton.jit
def _pairwise_loss_kernel(
    POL, REF, MASK, PILOT, STATS, GRAD,
    B, T, stride_pol, stride_ref, stride_mask, stride_pilot, stride_grad,
    beta, eps, gamma,
    LOSS_TYPE: tl.constexpr, HAS_REF: tl.constexpr, AVG: tl.constexpr,
    PILOT_GRAD: tl.constexpr, N_OUT: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rw = pid          # chosen row
    rl = pid + B      # rejected row
    offs0 = tl.arange(0, BLOCK)
    IS_SGDPO: tl.constexpr = LOSS_TYPE == SGDPO

    # ---- pass 1: segment sums (vector accumulators, reduced once at the end)
    s_w = tl.zeros([BLOCK], tl.float32)
    s_l = tl.zeros([BLOCK], tl.float32)
    r_w = tl.zeros([BLOCK], tl.float32)   # sum of (policy - ref)
    r_l = tl.zeros([BLOCK], tl.float32)
    n_w = tl.zeros([BLOCK], tl.float32)
    n_l = tl.zeros([BLOCK], tl.float32)
    ps_w = tl.zeros([BLOCK], tl.float32)
    ps_l = tl.zeros([BLOCK], tl.float32)
    k_w = tl.zeros([BLOCK], tl.float32)
    k_l = tl.zeros([BLOCK], tl.float32)
    # (while loops, not range(0, T, BLOCK): the interpreter's range over a runtime
    # bound breaks with numpy >= 2.4)
    t0 = 0
    while t0 < T:
        offs = t0 + offs0
        inb = offs < T
        mw = tl.load(MASK + rw * stride_mask + offs, mask=inb, other=0) != 0
        ml = tl.load(MASK + rl * stride_mask + offs, mask=inb, other=0) != 0
        pw = tl.load(POL + rw * stride_pol + offs, mask=mw, other=0.0).to(tl.float32)
        pl = tl.load(POL + rl * stride_pol + offs, mask=ml, other=0.0).to(tl.float32)
        s_w += tl.where(mw, pw, 0.0)
        s_l += tl.where(ml, pl, 0.0)
        n_w += mw.to(tl.float32)
        n_l += ml.to(tl.float32)
        if HAS_REF:
            qw = tl.load(REF + rw * stride_ref + offs, mask=mw, other=0.0).to(tl.float32)
            ql = tl.load(REF + rl * stride_ref + offs, mask=ml, other=0.0).to(tl.float32)
        else:
            qw = tl.zeros([BLOCK], tl.float32)
            ql = tl.zeros([BLOCK], tl.float32)
        # log-ratios accumulated token by token (no cancellation of two large sums)
        r_w += tl.where(mw, pw - qw, 0.0)
        r_l += tl.where(ml, pl - ql, 0.0)
        if IS_SGDPO:
            xw = tl.load(PILOT + rw * stride_pilot + offs, mask=inb, other=0) != 0
            xl = tl.load(PILOT + rl * stride_pilot + offs, mask=inb, other=0) != 0
            # pilots lie inside the responses, so policy/ref values are already loaded
            ps_w += tl.where(xw, pw - qw, 0.0)
            ps_l += tl.where(xl, pl - ql, 0.0)
            k_w += xw.to(tl.float32)
            k_l += xl.to(tl.float32)
        t0 += BLOCK
    S_w = tl.sum(s_w, 0)
    S_l = tl.sum(s_l, 0)
    D_w = tl.sum(r_w, 0)
    D_l = tl.sum(r_l, 0)
    N_w = tl.sum(n_w, 0)
    N_l = tl.sum(n_l, 0)

    # ---- sequence log-probs on the reward side: sums, or means with AVG (SimPO always means)
    if AVG or LOSS_TYPE == SIMPO:
        lp_w = S_w / N_w
        lp_l = S_l / N_l
        dr_w = D_w / N_w
        dr_l = D_l / N_l
    else:
        lp_w = S_w
        lp_l = S_l
        dr_w = D_w
        dr_l = D_l
    # loss side: IPO and SimPO always average (TRL)
    if AVG or LOSS_TYPE == IPO or LOSS_TYPE == SIMPO:
        a_w = N_w
        a_l = N_l
    else:
        a_w = N_w * 0.0 + 1.0
        a_l = N_l * 0.0 + 1.0
    rho_w = D_w / a_w
    rho_l = D_l / a_l

    pil_w = rho_w * 0.0
    pil_l = rho_l * 0.0
    ap_w = a_w
    ap_l = a_l
    d_pw = rho_w * 0.0
    d_pl = rho_w * 0.0
    if IS_SGDPO:
        K_w = tl.sum(k_w, 0)
        K_l = tl.sum(k_l, 0)
        if AVG:
            ap_w = K_w
            ap_l = K_l
        else:
            ap_w = K_w * 0.0 + 1.0
            ap_l = K_l * 0.0 + 1.0
        pil_w = tl.sum(ps_w, 0) / ap_w
        pil_l = tl.sum(ps_l, 0) / ap_l
        v1, h1 = _cdpo(beta * (rho_w - pil_l), eps)
        v2, h2 = _cdpo(beta * (pil_w - rho_l), eps)
        loss = 0.5 * (v1 + v2)
        d_w = 0.5 * beta * h1
        d_l = -0.5 * beta * h2
        d_pw = 0.5 * beta * h2
        d_pl = -0.5 * beta * h1
    elif LOSS_TYPE == IPO:
        u = rho_w - rho_l - 1.0 / (2.0 * beta)
        loss = u * u
        d_w = 2.0 * u
        d_l = -d_w
    elif LOSS_TYPE == HINGE:
        u = 1.0 - beta * (rho_w - rho_l)
        loss = tl.maximum(u, 0.0)
        d_w = tl.where(u > 0, -beta, 0.0)
        d_l = -d_w
    elif LOSS_TYPE == ROBUST:
        z = beta * (rho_w - rho_l)
        loss = ((1.0 - eps) * _softplus(-z) - tl.where(eps > 0, eps * _softplus(z), 0.0)) \
            / (1.0 - 2.0 * eps)
        d_w = beta * (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
        d_l = -d_w
    elif LOSS_TYPE == SIMPO:
        v, h = _cdpo(beta * (rho_w - rho_l) - gamma, eps)
        loss = v
        d_w = beta * h
        d_l = -d_w
    else:  # SIGMOID
        v, h = _cdpo(beta * (rho_w - rho_l), eps)
        loss = v
        d_w = beta * h
        d_l = -d_w

    out = STATS + pid * N_OUT
    tl.store(out + C_LOSS, loss)
    tl.store(out + C_LOGP_W, lp_w)
    tl.store(out + C_LOGP_L, lp_l)
    tl.store(out + C_REW_W, beta * dr_w)
    tl.store(out + C_REW_L, beta * dr_l)
    tl.store(out + C_PIL_W, beta * pil_w)
    tl.store(out + C_PIL_L, beta * pil_l)
    tl.store(out + C_SUM_W, S_w)

    # ---- pass 2: per-token gradient weights d loss_pair / d logp_t (0 outside the response)
    c_w = d_w / a_w
    c_l = d_l / a_l
    cp_w = d_pw / ap_w
    cp_l = d_pl / ap_l
    t0 = 0
    while t0 < T:
        offs = t0 + offs0
        inb = offs < T
        mw = tl.load(MASK + rw * stride_mask + offs, mask=inb, other=0) != 0
        ml = tl.load(MASK + rl * stride_mask + offs, mask=inb, other=0) != 0
        gw = tl.where(mw, c_w, 0.0)
        gl = tl.where(ml, c_l, 0.0)
        if PILOT_GRAD:
            xw = tl.load(PILOT + rw * stride_pilot + offs, mask=inb, other=0) != 0
            xl = tl.load(PILOT + rl * stride_pilot + offs, mask=inb, other=0) != 0
            gw += tl.where(xw, cp_w, 0.0)
            gl += tl.where(xl, cp_l, 0.0)
        tl.store(GRAD + rw * stride_grad + offs, gw, mask=inb)
        tl.store(GRAD + rl * stride_grad + offs, gl, mask=inb)
        t0 += BLOCK


def pairwise_loss_fwd(policy: torch.Tensor, ref, mask: torch.Tensor, pilot, *, loss_code: int,
                      beta: float, label_smoothing: float, simpo_gamma: float,
                      average_log_prob: bool, pilot_grad: bool):
    """Launch the pairwise loss kernel, one program per pair.

    policy  [2B, T] fp32/fp16/bf16, rows [:B] chosen, [B:] rejected, unit stride in T
    ref     [2B, T] same layout (any float dtype) or None (SimPO)
    mask    [2B, T] uint8, 1 on response tokens (each row has at least one)
    pilot   [2B, T] uint8 subset of mask (SGDPO) or None
    Returns ``stats`` [B, N_STATS] fp32 (columns ``pairwise_codes.COL_*``) and
    ``grad`` [2B, T] fp32, ``d loss_pair / d policy[t]`` (no 1/B, no NLL term).
    """
    B2, T = policy.shape
    B = B2 // 2
    stats = torch.empty((B, N_STATS), dtype=torch.float32, device=policy.device)
    grad = torch.empty((B2, T), dtype=torch.float32, device=policy.device)
    if B == 0:
        return stats, grad
    has_ref = ref is not None
    ref_ = ref if has_ref else policy
    is_sgdpo = loss_code == LOSS_CODE["sgdpo"]
    if is_sgdpo and pilot is None:
        raise ValueError("pilot must be given for the sgdpo loss")
    pilot_ = pilot if pilot is not None else mask
    _pairwise_loss_kernel[(B,)](
        policy, ref_, mask, pilot_, stats, grad,
        B, T, policy.stride(0), ref_.stride(0), mask.stride(0), pilot_.stride(0), grad.stride(0),
        float(beta), float(label_smoothing), float(simpo_gamma),
        LOSS_TYPE=int(loss_code), HAS_REF=has_ref, AVG=bool(average_log_prob),
        PILOT_GRAD=bool(pilot_grad and is_sgdpo), N_OUT=N_STATS, BLOCK=BLOCK_T,
        num_warps=NUM_WARPS,
    )
    return stats, grad
