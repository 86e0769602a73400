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

from .pairwise_codes import (BATCH_LOSS_TYPES, COL_LOGP_L, COL_LOGP_W, COL_LOSS, COL_PIL_L,
                             COL_PIL_W, COL_REW_L, COL_REW_W, COL_SUM_W, FDIV_CODE, LOSS_CODE,
                             LOSS_TYPES, N_STATS)

BLOCK_T = 256          # tokens per step of the loops over a row
NUM_WARPS = 4

# loss codes as compile-time constants of the kernel (values: pairwise_codes.LOSS_CODE)
SIGMOID = tl.constexpr(LOSS_CODE["sigmoid"])
IPO = tl.constexpr(LOSS_CODE["ipo"])
HINGE = tl.constexpr(LOSS_CODE["hinge"])
ROBUST = tl.constexpr(LOSS_CODE["robust"])
SIMPO = tl.constexpr(LOSS_CODE["simpo"])
SGDPO = tl.constexpr(LOSS_CODE["sgdpo"])
EXO_PAIR = tl.constexpr(LOSS_CODE["exo_pair"])
NCA_PAIR = tl.constexpr(LOSS_CODE["nca_pair"])
BCO_PAIR = tl.constexpr(LOSS_CODE["bco_pair"])
SPPO_HARD = tl.constexpr(LOSS_CODE["sppo_hard"])
APO_ZERO = tl.constexpr(LOSS_CODE["apo_zero"])
APO_DOWN = tl.constexpr(LOSS_CODE["apo_down"])
DISCOPOP = tl.constexpr(LOSS_CODE["discopop"])
SIGMOID_NORM = tl.constexpr(LOSS_CODE["sigmoid_norm"])
SFT = tl.constexpr(LOSS_CODE["sft"])
# f-divergence codes (pairwise_codes.FDIV_CODE)
REVERSE_KL = tl.constexpr(FDIV_CODE["reverse_kl"])
FORWARD_KL = tl.constexpr(FDIV_CODE["forward_kl"])
JS_DIVERGENCE = tl.constexpr(FDIV_CODE["js_divergence"])
ALPHA_DIVERGENCE = tl.constexpr(FDIV_CODE["alpha_divergence"])
ALPHA_CLAMP = tl.constexpr(80.0)     # TRL's clamp of (alpha - 1) * x before exp (fp32)
ALPHA_ONE_TOL = tl.constexpr(1e-6)   # |alpha - 1| below this: reverse_kl (TRL)
LOG2 = tl.constexpr(0.6931471805599453)
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
def _fscore(x, FDIV: tl.constexpr, alpha):
    """f-DPO score of a log-ratio and its derivative (formulas.f_score)."""
    if FDIV == FORWARD_KL:
        e = tl.exp(-x)
        s = 1.0 - e
        ds = e
    elif FDIV == JS_DIVERGENCE:
        s = LOG2 - _softplus(-x)
        ds = _sigmoid(-x)
    elif FDIV == ALPHA_DIVERGENCE:
        am1 = alpha - 1.0
        t = am1 * x
        e = tl.exp(tl.minimum(t, ALPHA_CLAMP))
        near_one = tl.abs(am1) < ALPHA_ONE_TOL
        s = tl.where(near_one, x, (e - 1.0) / tl.where(near_one, 1.0, am1))
        ds = tl.where(near_one, 1.0, tl.where(t <= ALPHA_CLAMP, e, 0.0))
    else:  # REVERSE_KL
        s = x
        ds = tl.zeros_like(x) + 1.0
    return s, ds


@triton.jit
def _xlogx_term(q, logq, logp):
    """q * (log q - log p), 0 where q == 0 (its limit)."""
    return tl.where(q == 0.0, 0.0, q * (logq - logp))


@triton.jit
def _pair_loss(s_w, s_l, p_w, p_l, beta, eps, gamma, tau, LOSS_TYPE: tl.constexpr):
    """Per-pair loss and its derivatives in (s_w, s_l, p_w, p_l): formulas.pair_loss."""
    z = beta * (s_w - s_l)
    cw = beta * s_w
    cl = beta * s_l
    zero = tl.zeros_like(z)   # (not z * 0.0: z may be infinite)
    d_pw = zero
    d_pl = zero
    if LOSS_TYPE == SGDPO:
        v1, h1 = _cdpo(beta * (s_w - p_l), eps)
        v2, h2 = _cdpo(beta * (p_w - s_l), eps)
        loss = 0.5 * (v1 + v2)
        d_w = 0.5 * beta * h1
        d_l = -0.5 * beta * h2
        d_pw = 0.5 * beta * h2
        d_pl = -0.5 * beta * h1
    elif LOSS_TYPE == IPO:
        u = s_w - s_l - 1.0 / (2.0 * beta)
        loss = u * u
        d_w = 2.0 * u
        d_l = -d_w
    elif LOSS_TYPE == HINGE:
        u = 1.0 - z
        loss = tl.maximum(u, 0.0)
        d_w = tl.where(u > 0, -beta, 0.0)
        d_l = -d_w
    elif LOSS_TYPE == ROBUST:
        loss = ((1.0 - eps) * _softplus(-z) - tl.where(eps > 0, eps * _softplus(z), 0.0)) \
            / (1.0 - 2.0 * eps)
        d_w = beta * (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
        d_l = -d_w
    elif LOSS_TYPE == SIMPO:
        loss, h = _cdpo(z - gamma, eps)
        d_w = beta * h
        d_l = -d_w
    elif LOSS_TYPE == SIGMOID_NORM:
        loss = _softplus(-z)
        d_w = -beta * _sigmoid(-z)
        d_l = -d_w
    elif LOSS_TYPE == EXO_PAIR:
        qw = _sigmoid(z)
        ql = _sigmoid(-z)
        lpw = tl.log(1.0 - eps)
        lpl = tl.log(eps)
        loss = _xlogx_term(qw, -_softplus(-z), lpw) + _xlogx_term(ql, -_softplus(z), lpl)
        d_w = beta * tl.where(tl.abs(z) == float("inf"), 0.0, qw * ql * (z - (lpw - lpl)))
        d_l = -d_w
    elif LOSS_TYPE == DISCOPOP:
        m = _sigmoid(z / tau)
        one_m = _sigmoid(-z / tau)
        lg = _softplus(-z)
        e = tl.exp(-z)
        loss = lg * one_m + e * m
        d_w = beta * (-_sigmoid(-z) * one_m - e * m + (e - lg) * (m * one_m / tau))
        d_l = -d_w
    elif LOSS_TYPE == NCA_PAIR:
        loss = _softplus(-cw) + 0.5 * _softplus(cw) + 0.5 * _softplus(cl)
        d_w = beta * (-_sigmoid(-cw) + 0.5 * _sigmoid(cw))
        d_l = 0.5 * beta * _sigmoid(cl)
    elif LOSS_TYPE == BCO_PAIR:
        loss = _softplus(-cw) + _softplus(cl)
        d_w = -beta * _sigmoid(-cw)
        d_l = beta * _sigmoid(cl)
    elif LOSS_TYPE == SPPO_HARD:
        uw = s_w - 0.5 / beta
        ul = s_l + 0.5 / beta
        loss = uw * uw + ul * ul
        d_w = 2.0 * uw
        d_l = 2.0 * ul
    elif LOSS_TYPE == APO_ZERO:
        loss = _sigmoid(-cw) + _sigmoid(cl)
        d_w = -beta * _sigmoid(cw) * _sigmoid(-cw)
        d_l = beta * _sigmoid(cl) * _sigmoid(-cl)
    elif LOSS_TYPE == APO_DOWN:
        dz = beta * _sigmoid(z) * _sigmoid(-z)
        loss = _sigmoid(cw) + _sigmoid(-z)
        d_w = beta * _sigmoid(cw) * _sigmoid(-cw) - dz
        d_l = dz
    elif LOSS_TYPE == SFT:
        loss = zero
        d_w = zero
        d_l = zero
    else:  # SIGMOID
        loss, h = _cdpo(z, eps)
        d_w = beta * h
        d_l = -d_w
    return loss, d_w, d_l, d_pw, d_pl


@triton.jit
def _pairwise_loss_kernel(
    POL, REF, MASK, PILOT, STATS, GRAD,
    B, T, stride_pol, stride_ref, stride_mask, stride_pilot, stride_grad,
    beta, eps, gamma, tau, f_alpha,
    LOSS_TYPE: tl.constexpr, FDIV: tl.constexpr, HAS_REF: tl.constexpr, AVG: tl.constexpr,
    AVG_LOSS: tl.constexpr, NORM: tl.constexpr, PILOT_GRAD: tl.constexpr, N_OUT: tl.constexpr,
    BLOCK: tl.constexpr,
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

    # ---- sequence log-ratios x: sums, or means with AVG_LOSS (AVG, or SimPO's always-means)
    if AVG_LOSS:
        a_w = N_w
        a_l = N_l
    else:
        a_w = N_w * 0.0 + 1.0
        a_l = N_l * 0.0 + 1.0
    lp_w = S_w / a_w
    lp_l = S_l / a_l
    x_w = D_w / a_w
    x_l = D_l / a_l
    # ---- loss-side scores: f-divergence, then / token count for ipo / sigmoid_norm (NORM)
    s_w, g_w = _fscore(x_w, FDIV, f_alpha)
    s_l, g_l = _fscore(x_l, FDIV, f_alpha)
    if NORM:
        s_w = s_w / N_w
        s_l = s_l / N_l
        g_w = g_w / N_w
        g_l = g_l / N_l

    pil_w = tl.zeros_like(x_w)
    pil_l = tl.zeros_like(x_l)
    sp_w = pil_w
    sp_l = pil_l
    gp_w = pil_w
    gp_l = pil_l
    ap_w = a_w
    ap_l = a_l
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
        sp_w, gp_w = _fscore(pil_w, FDIV, f_alpha)
        sp_l, gp_l = _fscore(pil_l, FDIV, f_alpha)
    loss, d_w, d_l, d_pw, d_pl = _pair_loss(s_w, s_l, sp_w, sp_l, beta, eps, gamma, tau, LOSS_TYPE)

    out = STATS + pid * N_OUT
    tl.store(out + C_LOSS, loss)
    tl.store(out + C_LOGP_W, lp_w)
    tl.store(out + C_LOGP_L, lp_l)
    tl.store(out + C_REW_W, beta * x_w)
    tl.store(out + C_REW_L, beta * x_l)
    tl.store(out + C_PIL_W, beta * pil_w)
    tl.store(out + C_PIL_L, beta * pil_l)
    tl.store(out + C_SUM_W, S_w)

    # ---- pass 2: per-token gradient weights d loss_pair / d logp_t (0 outside the response)
    # chain rule through the score (a zero derivative stays 0 where the score's is infinite)
    c_w = tl.where(d_w == 0.0, 0.0, d_w * g_w) / a_w
    c_l = tl.where(d_l == 0.0, 0.0, d_l * g_l) / a_l
    cp_w = tl.where(d_pw == 0.0, 0.0, d_pw * gp_w) / ap_w
    cp_l = tl.where(d_pl == 0.0, 0.0, d_pl * gp_l) / ap_l
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
                      average_log_prob: bool, pilot_grad: bool, discopop_tau: float = 0.05,
                      fdiv_code: int = 0, f_alpha: float = 0.5):
    """Launch the pairwise loss kernel, one program per pair.

    policy  [2B, T] fp32/fp16/bf16, rows [:B] chosen, [B:] rejected, unit stride in T
    ref     [2B, T] same layout (any float dtype) or None (SimPO, sft)
    mask    [2B, T] uint8, 1 on response tokens (each row has at least one)
    pilot   [2B, T] uint8 subset of mask (SGDPO) or None
    loss_code  a per-pair code of ``pairwise_codes.LOSS_CODE`` (not aot / aot_unpaired)
    fdiv_code  ``pairwise_codes.FDIV_CODE`` of the f-divergence, f_alpha its alpha
    Returns ``stats`` [B, N_STATS] fp32 (columns ``pairwise_codes.COL_*``) and
    ``grad`` [2B, T] fp32, ``d loss_pair / d policy[t]`` (no 1/B, no NLL term).
    """
    if LOSS_TYPES[loss_code] in BATCH_LOSS_TYPES:
        raise ValueError(f"the pairwise kernel computes per-pair losses, not {LOSS_TYPES[loss_code]!r}")
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
    avg_loss = bool(average_log_prob) or loss_code == LOSS_CODE["simpo"]
    norm = loss_code in (LOSS_CODE["ipo"], LOSS_CODE["sigmoid_norm"]) and not average_log_prob
    _pairwise_loss_kernel[(B,)](
        policy, ref_, mask, pilot_, stats, grad,
        B, T, policy.stride(0), ref_.stride(0), mask.stride(0), pilot_.stride(0), grad.stride(0),
        float(beta), float(label_smoothing), float(simpo_gamma), float(discopop_tau),
        float(f_alpha),
        LOSS_TYPE=int(loss_code), FDIV=int(fdiv_code), HAS_REF=has_ref,
        AVG=bool(average_log_prob), AVG_LOSS=avg_loss, NORM=norm,
        PILOT_GRAD=bool(pilot_grad and is_sgdpo), N_OUT=N_STATS, BLOCK=BLOCK_T,
        num_warps=NUM_WARPS,
    )
    return stats, grad
