"""preference_loss: every loss type against an independent fp64 formula, TRL's own loss code,
SGDPO's properties and pilot draws, the Triton pairwise kernel under the interpreter, bad input."""
import os

import torch

if not torch.cuda.is_available():  # run the Triton kernel on CPU tensors (before triton is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import collections  # noqa: E402
import math  # noqa: E402
import types  # noqa: E402

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import sgdpo_fast as sf  # noqa: E402
from sgdpo_fast.losses import pairwise, pilots  # noqa: E402

from sgdpo_fast.losses import formulas  # noqa: E402

# the loss types the independent fp64 formula below transcribes (TRL's own code checks all)
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "sgdpo")
ALL_TYPES = formulas.LOSS_TYPES
SMOOTHABLE = tuple(sorted(formulas.SMOOTHED))
DEV = "cuda" if torch.cuda.is_available() else "cpu"


# --------------------------------------------------------------------------- oracle

def formula_loss(policy, ref, mask, *, loss_type, beta=0.1, label_smoothing=0.0,
                 average_log_prob=False, simpo_gamma=0.5, nll_alpha=0.0, pilot=None,
                 pilot_grad=False):
    """Independent transcription of the loss formulas (TRL's DPOTrainer / CPOTrainer lines and
    DESIGN.md's SGDPO), differentiable by plain autograd.  Positions outside ``mask`` are
    never used.  Returns (loss, losses, chosen_rewards, rejected_rewards, chosen_logps,
    rejected_logps)."""
    B = policy.shape[0] // 2
    ls = label_smoothing
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    lp = torch.where(mask, policy, zero)
    rf = torch.where(mask, ref, zero) if ref is not None else None
    n = mask.sum(1).to(policy.dtype)
    logps = lp.sum(1)
    if loss_type == "simpo":
        logps = logps / n                                   # CPO: average_log_prob for simpo
        chosen, rejected = logps[:B], logps[B:]
        logits = chosen - rejected - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
        cr, rr = beta * chosen.detach(), beta * rejected.detach()
    else:
        ref_logps = rf.sum(1)
        if average_log_prob:
            logps, ref_logps = logps / n, ref_logps / n
        ratios = logps - ref_logps
        cw, cl = ratios[:B], ratios[B:]
        delta = cw - cl
        if loss_type == "sigmoid":
            losses = -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
        elif loss_type == "hinge":
            losses = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            sums = (lp - rf).sum(1)                          # TRL: token sums / completion length
            avg = sums / n
            losses = (avg[:B] - avg[B:] - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            clean = -(1 - ls) * F.logsigmoid(beta * delta)
            flipped = -ls * F.logsigmoid(-beta * delta)
            losses = (clean - flipped) / (1 - 2 * ls)
        elif loss_type == "sgdpo":
            k = pilot.sum(1).to(policy.dtype) if average_log_prob else torch.ones_like(n)
            P = torch.where(pilot, lp - rf, zero).sum(1) / k
            if not pilot_grad:
                P = P.detach()
            z1 = beta * (cw - P[B:])
            z2 = beta * (P[:B] - cl)

            def cdpo(z):
                return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
            losses = 0.5 * cdpo(z1) + 0.5 * cdpo(z2)
        else:
            raise AssertionError(loss_type)
        cr, rr = beta * cw.detach(), beta * cl.detach()
    if nll_alpha:
        nll = -lp[:B].sum() / mask[:B].sum()
        losses = losses + nll_alpha * nll
    return losses.mean(), losses, cr, rr, logps[:B].detach(), logps[B:].detach()


def make_batch(B, T, *, dtype=torch.float64, seed=0, lens=None, device=DEV, poison=True):
    """Random log-probs and a ragged, gappy response mask; NaN outside the mask (never read)."""
    g = torch.Generator().manual_seed(seed)
    policy = -3 * torch.rand(2 * B, T, generator=g, dtype=torch.float64)
    ref = policy + 0.5 * torch.randn(2 * B, T, generator=g, dtype=torch.float64)
    if lens is None:
        mask = torch.rand(2 * B, T, generator=g) < 0.7
        mask[torch.arange(2 * B), torch.randint(0, T, (2 * B,), generator=g)] = True
    else:
        mask = torch.zeros(2 * B, T, dtype=torch.bool)
        for i, L in enumerate(lens):
            mask[i, T - L:] = True
    if poison:
        policy = policy.masked_fill(~mask, float("nan"))
        ref = ref.masked_fill(~mask, float("nan"))
    return (policy.to(device=device, dtype=dtype), ref.to(device=device, dtype=dtype),
            mask.to(device))


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def kwargs_for(loss_type, ls=0.1):
    return {"label_smoothing": ls if loss_type in SMOOTHABLE else 0.0}


# --------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("avg,nll_alpha", [(False, 0.0), (True, 0.7)])
def test_matches_formula_fp64(loss_type, avg, nll_alpha):
    policy, ref, mask = make_batch(5, 13, seed=hash((loss_type, avg)) % 1000)
    policy.requires_grad_(True)
    kw = dict(loss_type=loss_type, beta=0.3, average_log_prob=avg, nll_alpha=nll_alpha,
              simpo_gamma=0.4, **kwargs_for(loss_type))
    out = sf.preference_loss(policy, ref, mask, generator=torch.Generator().manual_seed(1), **kw)
    (g,) = torch.autograd.grad(out.loss, policy)
    want = formula_loss(policy, None if loss_type == "simpo" else ref, mask, pilot=out.pilot_masks,
                        **kw)
    (gw,) = torch.autograd.grad(want[0], policy)
    assert out.loss.dtype == torch.float64
    torch.testing.assert_close(out.loss, want[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(out.losses, want[1], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.nan_to_num(gw), rtol=1e-10, atol=1e-14)
    assert not g[~mask].any()                                 # exactly 0 off the response
    for got, exp in zip((out.chosen_rewards, out.rejected_rewards, out.chosen_logps,
                         out.rejected_logps), want[2:]):
        torch.testing.assert_close(got, exp, rtol=1e-12, atol=1e-14)
    m = out.metrics
    torch.testing.assert_close(m["rewards/margins"], (want[2] - want[3]).mean())
    torch.testing.assert_close(m["rewards/accuracies"], (want[2] > want[3]).double().mean())
    assert set(m) >= {"rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                      "logps/chosen", "logps/rejected"}
    assert ("sgdpo/pilot_chosen" in m) == (loss_type == "sgdpo")


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_per_pair_losses_are_differentiable(loss_type):
    """Upstream gradient on out.losses (weighted pairs) and on out.loss at once, with the NLL term."""
    policy, ref, mask = make_batch(4, 11, seed=3)
    policy.requires_grad_(True)
    kw = dict(loss_type=loss_type, beta=0.2, nll_alpha=0.3, **kwargs_for(loss_type))
    w = torch.tensor([0.5, -1.0, 2.0, 0.25], dtype=torch.float64, device=DEV)
    out = sf.preference_loss(policy, ref, mask, **kw)
    (g,) = torch.autograd.grad((out.losses * w).sum() + 3 * out.loss, policy)
    want = formula_loss(policy, ref if loss_type != "simpo" else None, mask, pilot=out.pilot_masks,
                        **kw)
    (gw,) = torch.autograd.grad((want[1] * w).sum() + 3 * want[0], policy)
    torch.testing.assert_close(g, torch.nan_to_num(gw), rtol=1e-10, atol=1e-14)


def test_fp32_and_bf16_inputs():
    policy64, ref64, mask = make_batch(3, 17, seed=5)
    want = formula_loss(policy64.requires_grad_(True), ref64, mask, loss_type="sigmoid")
    (gw,) = torch.autograd.grad(want[0], policy64)
    for dt, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        p = policy64.detach().to(dt).requires_grad_(True)
        out = sf.preference_loss(p, ref64.to(dt), mask, loss_type="sigmoid")
        (g,) = torch.autograd.grad(out.loss, p)
        assert out.loss.dtype == torch.float32 and g.dtype == dt
        assert abs(out.loss.item() - want[0].item()) <= tol * abs(want[0].item())
        assert rel(g, torch.nan_to_num(gw)) < tol


# --------------------------------------------------------------------------- TRL as oracle

def _trl_dpo_loss(policy, ref, mask, loss_type, beta, label_smoothing, *, loss_weights=None,
                  ld_alpha=None, f_divergence_type="reverse_kl", f_alpha=0.5, discopop_tau=0.05,
                  use_weighting=False, log_sum_sq=None):
    """Run TRL 1.16's own DPOTrainer._compute_loss (unbound, on a stand-in trainer whose model
    and reference model return the given per-token log-probs, as a fused head does: 0 at
    label -100).  Returns (loss, metrics)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    B2, T = policy.shape
    lts = [loss_type] if isinstance(loss_type, str) else list(loss_type)

    class Acc:
        device = policy.device

        def gather_for_metrics(self, x):
            return x

        gather = gather_for_metrics

    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    log_probs = torch.where(mask, policy, zero)
    ref_log_probs = torch.where(mask, ref, zero) if ref is not None else torch.zeros_like(log_probs)
    z = torch.zeros(B2, T, device=policy.device)

    def model(**_):
        return types.SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z,
                                      is_top1=z.bool(), aux_loss=None, log_sum_sq_probs=log_sum_sq)

    def ref_model(**_):
        return types.SimpleNamespace(log_probs=ref_log_probs)

    stand_in = torch.nn.Module()          # a module: accelerate's is_peft_model inspects it
    stand_in.is_gradient_checkpointing = False
    trainer = types.SimpleNamespace(
        model=stand_in,
        ref_model=ref_model, accelerator=Acc(), aux_loss_enabled=False, ld_alpha=ld_alpha,
        precompute_ref_logps=False, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha, loss_types=lts,
        loss_weights=list(loss_weights) if loss_weights is not None else [1.0] * len(lts),
        beta=beta, label_smoothing=label_smoothing, use_weighting=use_weighting,
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        _metrics={"train": collections.defaultdict(list)}, _total_train_tokens=0, _tp_size=1)
    ones = torch.ones(B2, 1, dtype=torch.long, device=policy.device)
    inputs = dict(input_ids=torch.zeros(B2, T + 1, dtype=torch.long, device=policy.device),
                  attention_mask=torch.ones(B2, T + 1, dtype=torch.long, device=policy.device),
                  completion_mask=torch.cat([0 * ones, mask.long()], 1))  # labels shift by one
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


# label smoothing each TRL loss type reads (TRL 1.16 ignores it for the others)
TRL_SMOOTHING = {"robust": 0.2, "exo_pair": 0.1, "aot": 0.15, "aot_unpaired": 0.15}
TRL_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
             "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def _compare_with_trl(dtype=torch.float64, seed=11, B=4, T=9, tol=1e-12, **kw):
    """Our preference_loss and TRL's _compute_loss on one batch: loss, gradient, metrics."""
    pytest.importorskip("trl")
    policy, ref, mask = make_batch(B, T, seed=seed, dtype=dtype)
    policy.requires_grad_(True)
    lt = kw.pop("loss_type")
    ls = kw.pop("label_smoothing", 0.0)
    trl_kw = dict(kw)
    lss = None
    if kw.get("use_weighting"):
        g = torch.Generator().manual_seed(seed + 1)
        lss = (-1.0 - torch.rand(policy.shape, generator=g, dtype=torch.float64)).to(dtype)
        trl_kw["log_sum_sq"] = lss
    trl_loss, trl_metrics = _trl_dpo_loss(policy, ref, mask, lt, 0.25, ls, **trl_kw)
    (gt,) = torch.autograd.grad(trl_loss, policy)
    ours_kw = dict(kw)
    if "f_alpha" in ours_kw:
        ours_kw["f_alpha_divergence_coef"] = ours_kw.pop("f_alpha")
    out = sf.preference_loss(policy, ref, mask, loss_type=lt, beta=0.25, label_smoothing=ls,
                             log_sum_sq_probs=lss, **ours_kw)
    (g,) = torch.autograd.grad(out.loss, policy)
    torch.testing.assert_close(out.loss.to(trl_loss.dtype), trl_loss, rtol=tol, atol=tol * 1e-2)
    torch.testing.assert_close(g, torch.nan_to_num(gt), rtol=tol * 100, atol=tol * 1e-2)
    for key, val in out.metrics.items():
        if key == "nll_loss":
            continue
        assert math.isclose(val.item(), trl_metrics[key], rel_tol=max(tol, 1e-7) * 10,
                            abs_tol=1e-9), key
    return out


@pytest.mark.parametrize("loss_type", TRL_TYPES)
def test_every_trl_loss_type_matches_trl_dpo_trainer(loss_type):
    """Each TRL 1.16 DPO loss type against TRL's own code, fp64: loss, gradient, metrics."""
    ls = TRL_SMOOTHING.get(loss_type, 0.0)
    _compare_with_trl(loss_type=loss_type, label_smoothing=ls, tol=1e-6 if loss_type == "exo_pair" else 1e-12,
                      discopop_tau=0.3)


def test_sigmoid_label_smoothing_conventions():
    """TRL 1.16's sigmoid ignores label_smoothing; ours applies cDPO (TRL < 1.0, TRL's CPO,
    the cDPO note): label_smoothing=0 here gives TRL 1.16's number for any of its values."""
    pytest.importorskip("trl")
    policy, ref, mask = make_batch(4, 9, seed=13)
    trl_loss, _ = _trl_dpo_loss(policy, ref, mask, "sigmoid", 0.25, 0.3)
    plain = sf.preference_loss(policy, ref, mask, loss_type="sigmoid", beta=0.25).loss
    cdpo = sf.preference_loss(policy, ref, mask, loss_type="sigmoid", beta=0.25, label_smoothing=0.3).loss
    torch.testing.assert_close(plain, trl_loss, rtol=1e-12, atol=0)
    assert abs(cdpo.item() - trl_loss.item()) > 1e-3
    want = formula_loss(policy, ref, mask, loss_type="sigmoid", beta=0.25, label_smoothing=0.3)[0]
    torch.testing.assert_close(cdpo, want, rtol=1e-12, atol=0)


@pytest.mark.parametrize("types,weights", [
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),          # MPO
    (["ipo", "sft"], None),
    (["hinge", "apo_zero", "aot"], [1.0, 0.5, 2.0]),
    (["robust", "sigmoid_norm"], [0.3, 0.7]),
])
def test_loss_weight_combinations_match_trl(types, weights):
    ls = 0.1 if {"robust", "aot"} & set(types) and set(types) <= {"robust", "aot", "sft"} else 0.0
    _compare_with_trl(loss_type=types, loss_weights=weights, label_smoothing=ls)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair", ["sigmoid", "sft"], "aot_unpaired"])
def test_ld_alpha_matches_trl(loss_type, ld_alpha):
    _compare_with_trl(loss_type=loss_type, ld_alpha=ld_alpha, seed=17, T=13)


@pytest.mark.parametrize("fdiv,alpha", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                        ("alpha_divergence", 0.3), ("alpha_divergence", 1.0)])
@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "exo_pair", "robust", "discopop",
                                       "sigmoid_norm", ["sigmoid", "sft"]])
def test_f_divergence_matches_trl(loss_type, fdiv, alpha):
    """fp32: TRL's alpha-divergence clamps per dtype and has no fp64 entry."""
    ls = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
    dt = torch.float32 if fdiv == "alpha_divergence" else torch.float64
    _compare_with_trl(loss_type=loss_type, label_smoothing=ls, f_divergence_type=fdiv, f_alpha=alpha,
                      dtype=dt, tol=2e-6 if dt == torch.float32 else 1e-6 if loss_type == "exo_pair" else 1e-12)


@pytest.mark.parametrize("loss_type", ["sigmoid", ["sigmoid", "bco_pair"], "apo_down"])
def test_wpo_weighting_matches_trl(loss_type):
    """(TRL 1.16 itself fails on use_weighting with 'sft': an in-place product on an expanded
    tensor; ours weights sft's per-pair copy as TRL's code means to.)"""
    _compare_with_trl(loss_type=loss_type, use_weighting=True, seed=19)


@pytest.mark.parametrize("loss_type", ["simpo", "sigmoid"])
def test_matches_trl_cpo_loss(loss_type):
    """TRL's CPOTrainer.cpo_loss: SimPO (on averaged log-probs, as CPO computes them for simpo) and
    its cDPO label smoothing, which our sigmoid applies to the DPO log-ratios."""
    pytest.importorskip("trl")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    policy, ref, mask = make_batch(4, 9, seed=12)
    policy.requires_grad_(True)
    beta, ls, gamma = 0.3, 0.15, 0.7
    cpo = types.SimpleNamespace(alpha=0.0, accelerator=types.SimpleNamespace(device=policy.device),
                                loss_type=loss_type, beta=beta, label_smoothing=ls, simpo_gamma=gamma)
    zero = torch.zeros((), dtype=policy.dtype)
    seq = torch.where(mask, policy, zero).sum(1)
    if loss_type == "simpo":
        seq = seq / mask.sum(1)
    else:
        seq = seq - torch.where(mask, ref, zero).sum(1)
    losses, cr, rr = CPOTrainer.cpo_loss(cpo, seq[:4], seq[4:])
    (gt,) = torch.autograd.grad(losses.mean(), policy)
    out = sf.preference_loss(policy, ref, mask, loss_type=loss_type, beta=beta, label_smoothing=ls,
                             simpo_gamma=gamma)
    (g,) = torch.autograd.grad(out.loss, policy)
    torch.testing.assert_close(out.losses, losses, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.nan_to_num(gt), rtol=1e-10, atol=1e-14)
    if loss_type == "simpo":
        torch.testing.assert_close(out.chosen_rewards, cr)
        torch.testing.assert_close(out.rejected_rewards, rr)


# --------------------------------------------------------------------------- SGDPO

@pytest.mark.parametrize("pilot_mode", ["different", "same"])
@pytest.mark.parametrize("ls", [0.0, 0.1])
def test_sgdpo_unit_ratios_equal_length_is_dpo_with_half_gradient(pilot_mode, ls):
    B, T = 4, 15
    policy, ref, _ = make_batch(B, T, seed=21, poison=False)
    g = torch.Generator().manual_seed(0)
    lens = torch.randint(1, T, (B,), generator=g).repeat(2)      # chosen len == rejected len
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for i, L in enumerate(lens.tolist()):                        # different positions, same count
        mask[i, torch.randperm(T, generator=g)[:L]] = True
    mask = mask.to(DEV)
    policy.requires_grad_(True)
    dpo = sf.preference_loss(policy, ref, mask, loss_type="sigmoid", label_smoothing=ls)
    (gd,) = torch.autograd.grad(dpo.loss, policy)
    sg = sf.preference_loss(policy, ref, mask, loss_type="sgdpo", label_smoothing=ls,
                            pilot_ratio_chosen=1.0, pilot_ratio_rejected=1.0, pilot_mode=pilot_mode)
    (gs,) = torch.autograd.grad(sg.loss, policy)
    assert torch.equal(sg.pilot_masks, mask)
    torch.testing.assert_close(sg.loss, dpo.loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(gs, 0.5 * gd, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("pilot_grad", [False, True])
def test_sgdpo_explicit_pilots_by_hand(pilot_grad):
    nan = float("nan")
    policy = torch.tensor([[-1.0, -2.0, -3.0, nan], [-0.5, -4.0, nan, nan]], dtype=torch.float64)
    ref = torch.tensor([[-1.5, -1.0, -2.0, nan], [-1.0, -3.0, nan, nan]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    pilot = torch.tensor([[0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    # Dw = 0.5 - 1 - 1 = -1.5, Dl = 0.5 - 1 = -0.5, Pw = -1 (position 1), Pl = 0.5 (position 0)
    # beta = 0.5: z1 = 0.5 * (Dw - Pl) = -1, z2 = 0.5 * (Pw - Dl) = -0.25
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    loss = 0.5 * math.log1p(math.exp(1.0)) + 0.5 * math.log1p(math.exp(0.25))
    gw, gl = -0.25 * sig(1.0), 0.25 * sig(0.25)       # d/dlogp of each response token
    grad = [[gw, gw, gw, 0.0], [gl, gl, 0.0, 0.0]]
    if pilot_grad:
        grad[0][1] += -0.25 * sig(0.25)                 # through Pw (in z2)
        grad[1][0] += 0.25 * sig(1.0)                   # through Pl (in z1)
    p = policy.to(DEV).requires_grad_(True)
    out = sf.preference_loss(p, ref.to(DEV), mask.to(DEV), loss_type="sgdpo", beta=0.5,
                             pilot_masks=pilot.to(DEV), pilot_grad=pilot_grad)
    (g,) = torch.autograd.grad(out.loss, p)
    assert math.isclose(out.loss.item(), loss, rel_tol=1e-14)
    torch.testing.assert_close(g.cpu(), torch.tensor(grad, dtype=torch.float64), rtol=1e-14, atol=1e-16)
    assert math.isclose(out.metrics["sgdpo/pilot_chosen"].item(), 0.5 * -1.0)
    assert math.isclose(out.metrics["sgdpo/pilot_rejected"].item(), 0.5 * 0.5)


def test_sgdpo_pilot_grad_flows_through_pilots():
    policy, ref, mask = make_batch(4, 12, seed=31)
    policy.requires_grad_(True)
    grads = {}
    for pg in (False, True):
        out = sf.preference_loss(policy, ref, mask, loss_type="sgdpo", pilot_grad=pg,
                                 generator=torch.Generator().manual_seed(5))
        (grads[pg],) = torch.autograd.grad(out.loss, policy)
        want = formula_loss(policy, ref, mask, loss_type="sgdpo", pilot=out.pilot_masks, pilot_grad=pg)
        (gw,) = torch.autograd.grad(want[0], policy)
        torch.testing.assert_close(grads[pg], torch.nan_to_num(gw), rtol=1e-10, atol=1e-14)
    diff = (grads[True] - grads[False]) != 0
    assert diff.any() and not (diff & ~out.pilot_masks).any()   # only pilot tokens change


@pytest.mark.parametrize("pilot_mode", ["different", "same"])
def test_pilot_draws_exact_k_inside_response(pilot_mode):
    B, T = 6, 23
    _, _, mask = make_batch(B, T, seed=41)
    mask[0] = False
    mask[0, 5] = True                                                 # a one-token answer
    r1, r2 = 0.6, 0.9
    pil = pilots.draw_pilot_masks(mask, r1, r2, pilot_mode, torch.Generator().manual_seed(0))
    lens = mask.sum(1).cpu()
    m = torch.minimum(lens[:B], lens[B:])
    want_k = torch.cat([(r1 * m.double()).floor().clamp(min=1), (r2 * m.double()).floor().clamp(min=1)])
    assert torch.equal(pil.sum(1).cpu(), want_k.long())
    assert not (pil & ~mask).any()
    if pilot_mode == "same":          # offsets inside the responses: the smaller set is a prefix
        off = (mask.long().cumsum(1) - 1).cpu()
        for i in range(B):
            ow = set(off[i][pil[i].cpu()].tolist())
            ol = set(off[B + i][pil[B + i].cpu()].tolist())
            assert ow <= ol and max(ol) < m[i]
        same = pilots.draw_pilot_masks(mask, 0.5, 0.5, "same", torch.Generator().manual_seed(3))
        for i in range(B):
            assert off[i][same[i].cpu()].tolist() == off[B + i][same[B + i].cpu()].tolist()


@pytest.mark.parametrize("pilot_mode", ["different", "same"])
def test_pilot_draws_are_uniform(pilot_mode):
    """Each response token of a pair is drawn with probability k/len (many copies, one call)."""
    n, T = 3000, 12
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, [0, 2, 3, 5, 6, 7, 9, 10, 11, 4]] = True      # chosen: 10 tokens, gappy
    mask[1, 3:10] = True                                   # rejected: 7 tokens -> m = 7
    big = torch.cat([mask[:1].repeat(n, 1), mask[1:].repeat(n, 1)]).to(DEV)
    pil = pilots.draw_pilot_masks(big, 0.6, 0.9, pilot_mode, torch.Generator().manual_seed(9))
    fw = pil[:n].double().mean(0).cpu()
    fl = pil[n:].double().mean(0).cpu()
    if pilot_mode == "different":     # k_w = 4 of 10, k_l = 6 of 7
        assert torch.allclose(fw[mask[0]], torch.full((10,), 0.4, dtype=torch.float64), atol=0.04)
    else:                             # offsets 0..6 only, 4 of 7
        off = mask[0].long().cumsum(0) - 1
        inside = mask[0] & (off < 7)
        assert torch.allclose(fw[inside], torch.full((7,), 4 / 7, dtype=torch.float64), atol=0.04)
        assert not fw[mask[0] & ~inside].any()
    assert torch.allclose(fl[mask[1]], torch.full((7,), 6 / 7, dtype=torch.float64), atol=0.04)


def test_seeded_draws_reproduce_and_unseeded_differ():
    policy, ref, mask = make_batch(4, 40, seed=51)
    mask[:, :30] = True
    policy, ref = torch.nan_to_num(policy), torch.nan_to_num(ref)
    a = sf.preference_loss(policy, ref, mask, generator=torch.Generator().manual_seed(7))
    b = sf.preference_loss(policy, ref, mask, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.pilot_masks, b.pilot_masks) and torch.equal(a.loss, b.loss)
    gen = torch.Generator().manual_seed(7)
    c = sf.preference_loss(policy, ref, mask, generator=gen)
    d = sf.preference_loss(policy, ref, mask, generator=gen)        # redrawn at each call
    assert not torch.equal(c.pilot_masks, d.pilot_masks)
    e = sf.preference_loss(policy, ref, mask)
    f = sf.preference_loss(policy, ref, mask)
    assert not torch.equal(e.pilot_masks, f.pilot_masks)


# --------------------------------------------------------------------------- Triton kernel

def _triton_ok():
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    from sgdpo_fast.ops.backends import triton_usable
    return triton_usable(DEV)


needs_triton = pytest.mark.skipif(not _triton_ok(), reason="triton not importable / not usable here")


def _cfg_for(lt, avg=False, pilot_grad=False, fdiv="reverse_kl", f_alpha=0.5, beta=0.2):
    ls = (0.1 if lt in SMOOTHABLE else 0.0)
    return pairwise.PairwiseConfig(lt, beta, ls, 0.5, avg, pilot_grad, 0.3, fdiv, f_alpha)


@needs_triton
@pytest.mark.parametrize("T", [5, 300])
@pytest.mark.parametrize("avg,pilot_grad,fdiv", [(False, False, "reverse_kl"), (True, True, "reverse_kl"),
                                                 (True, True, "forward_kl"), (False, False, "js_divergence"),
                                                 (True, False, "alpha_divergence")])
def test_kernel_matches_torch_path(T, avg, pilot_grad, fdiv):
    """Every per-pair loss type of the kernel against the torch path (the kernel's oracle,
    itself checked against TRL's code and the fp64 formulas above)."""
    policy, ref, mask = make_batch(3, T, dtype=torch.float32, seed=T)
    pil = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(0))
    for lt in formulas.KERNEL_LOSS_TYPES:
        if fdiv != "reverse_kl" and lt not in formulas.F_DIVERGENCE_TYPES:
            continue
        cfg = _cfg_for(lt, avg, pilot_grad, fdiv, 0.3)
        r = None if lt in ("simpo", "sft") else ref
        s_t, g_t, o_t = pairwise.pairwise_torch(policy, r, mask, pil, cfg)
        s_k, g_k, o_k = pairwise.pairwise_triton(policy, r, mask, pil, cfg)
        assert torch.isfinite(s_k).all() and torch.isfinite(g_k).all(), lt
        torch.testing.assert_close(s_k, s_t, rtol=1e-5, atol=1e-6, msg=lt)
        # fp32 rounding relative to the gradient's scale (apo_down's d_w is a difference
        # of two close terms, so per-entry relative errors can be large)
        torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-6 * float(g_t.abs().max()) + 1e-12,
                                   msg=lt)
        assert torch.equal(o_k, o_t)


def test_batch_losses_take_the_torch_path():
    assert pairwise.resolve_impl("auto", "cuda", False, "aot") == "torch"
    assert pairwise.resolve_impl("auto", "cpu", False, "aot_unpaired") == "torch"
    with pytest.raises(ValueError, match="sorts the batch"):
        pairwise.resolve_impl("triton", "cpu", False, "aot")


# --------------------------------------------------------------------------- limits

# loss types whose limit stays finite when a rejected answer's log-prob is -inf (ipo and
# sppo_hard square it; robust / sgdpo / cDPO sigmoid with eps > 0 and aot* with eps > 0 go
# to -inf / +inf through their eps terms)
FINITE_AT_NEG_INF = ("sigmoid", "hinge", "simpo", "sgdpo", "exo_pair", "nca_pair", "bco_pair",
                     "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft", "aot", "aot_unpaired",
                     "robust")


@pytest.mark.parametrize("loss_type,impl", [(lt, impl) for impl in ("torch", "triton")
                                             for lt in FINITE_AT_NEG_INF
                                             if impl == "torch" or lt not in formulas.BATCH_LOSS_TYPES])
def test_neg_inf_rejected_logprob_gives_the_finite_limit(loss_type, impl):
    """Issue 11 item 10: a -inf log-prob in a rejected answer (a token the policy gives
    probability 0, e.g. a masked vocabulary) gives the loss's finite limit and a finite
    gradient, never NaN: the same as a very negative finite log-prob."""
    if impl == "triton" and not _triton_ok():
        pytest.skip("triton not usable here")
    dt = torch.float32 if impl == "triton" else torch.float64
    policy, ref, mask = make_batch(3, 8, seed=81, dtype=dt, poison=False)
    mask[:, 2:6] = True
    ls = 0.1 if loss_type == "exo_pair" else 0.0
    pm = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(2))
    results = []
    for val in (float("-inf"), -1e30 if dt == torch.float64 else -1e20):
        p = policy.clone()
        p[4, 3] = val                        # rejected answer of pair 1
        p.requires_grad_(True)
        out = sf.preference_loss(p, ref, mask, loss_type=loss_type, beta=0.2, label_smoothing=ls,
                                 pilot_masks=pm if loss_type == "sgdpo" else None,
                                 pairwise_impl=impl)
        (g,) = torch.autograd.grad(out.loss, p)
        assert torch.isfinite(out.loss), (loss_type, val, out.loss)
        assert torch.isfinite(out.losses).all() and torch.isfinite(g).all(), (loss_type, val)
        results.append((out.loss.detach(), g))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- aot, sgdpo options

def _aot_oracle(policy, ref, mask, loss_type, beta, ls):
    """TRL 1.16's aot lines on sums, by plain autograd: per sorted position."""
    B = policy.shape[0] // 2
    zero = torch.zeros((), dtype=policy.dtype)
    S = torch.where(mask, policy, zero).sum(1)
    R = torch.where(mask, ref, zero).sum(1)
    if loss_type == "aot":
        delta = torch.sort(S[:B] - S[B:])[0] - torch.sort(R[:B] - R[B:])[0]
    else:
        x = S - R
        delta = torch.sort(x[:B])[0] - torch.sort(x[B:])[0]
    return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_per_position_losses_are_differentiable(loss_type):
    """A non-uniform upstream gradient on ``losses`` reaches the pair at each sorted position."""
    policy, ref, mask = make_batch(5, 7, seed=91)
    policy.requires_grad_(True)
    out = sf.preference_loss(policy, ref, mask, loss_type=loss_type, beta=0.3, label_smoothing=0.1)
    want = _aot_oracle(policy, ref, mask, loss_type, 0.3, 0.1)
    torch.testing.assert_close(out.losses, want, rtol=1e-12, atol=1e-14)
    w = torch.tensor([0.5, -1.0, 2.0, 0.25, 3.0], dtype=torch.float64)
    (g,) = torch.autograd.grad((out.losses * w).sum(), policy)
    (gw,) = torch.autograd.grad((want * w).sum(), policy)
    torch.testing.assert_close(g, torch.nan_to_num(gw), rtol=1e-10, atol=1e-14)


def _sgdpo_oracle(policy, ref, mask, pilot, beta, ls, fdiv, alpha, ld_alpha):
    """SGDPO by plain autograd with an f-divergence score on the four log-ratios and LD-DPO
    token weights (docs/integrations.md's definition)."""
    B = policy.shape[0] // 2
    zero = torch.zeros((), dtype=policy.dtype)
    w = torch.ones_like(policy)
    if ld_alpha is not None:
        m = mask.long()
        shared = torch.minimum(m.sum(1)[:B], m.sum(1)[B:]).repeat(2)
        w = torch.where(m.cumsum(1) > shared[:, None], ld_alpha, 1.0).double()
    d = torch.where(mask, (policy - ref) * w, zero)
    x = d.sum(1)
    P = torch.where(pilot, d, zero).sum(1).detach()

    def f(v):
        if fdiv == "forward_kl":
            return 1 - torch.exp(-v)
        if fdiv == "js_divergence":
            return math.log(2) + F.logsigmoid(v)
        if fdiv == "alpha_divergence":
            return (torch.exp((alpha - 1) * v) - 1) / (alpha - 1)
        return v

    def cdpo(z):
        return -(1 - ls) * F.logsigmoid(z) - ls * F.logsigmoid(-z)
    return (0.5 * cdpo(beta * (f(x[:B]) - f(P[B:]))) + 0.5 * cdpo(beta * (f(P[:B]) - f(x[B:])))).mean()


@pytest.mark.parametrize("fdiv,ld_alpha", [("forward_kl", None), ("js_divergence", 0.3),
                                           ("alpha_divergence", None), ("reverse_kl", 0.0)])
def test_sgdpo_with_f_divergence_and_ld_alpha(fdiv, ld_alpha):
    policy, ref, mask = make_batch(4, 11, seed=93)
    policy.requires_grad_(True)
    pm = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(4))
    out = sf.preference_loss(policy, ref, mask, loss_type="sgdpo", beta=0.3, label_smoothing=0.1,
                             pilot_masks=pm, f_divergence_type=fdiv, f_alpha_divergence_coef=0.4,
                             ld_alpha=ld_alpha)
    want = _sgdpo_oracle(policy, ref, mask, pm, 0.3, 0.1, fdiv, 0.4, ld_alpha)
    (g,) = torch.autograd.grad(out.loss, policy)
    (gw,) = torch.autograd.grad(want, policy)
    torch.testing.assert_close(out.loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.nan_to_num(gw), rtol=1e-10, atol=1e-14)


def test_sgdpo_with_sft_is_sgdpo_plus_nll():
    policy, ref, mask = make_batch(3, 10, seed=95)
    pm = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(1))
    a = sf.preference_loss(policy, ref, mask, loss_type=["sgdpo", "sft"], loss_weights=[1.0, 0.4],
                           pilot_masks=pm)
    b = sf.preference_loss(policy, ref, mask, loss_type="sgdpo", nll_alpha=0.4, pilot_masks=pm)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-14, atol=0)
    assert "sgdpo/pilot_chosen" in a.metrics and "nll_loss" in a.metrics


@needs_triton
@pytest.mark.parametrize("loss_type", ["sgdpo", "ipo"])
def test_preference_loss_through_kernel(loss_type):
    """preference_loss end to end through the kernel's autograd path (bf16 inputs, NLL term,
    gradients of both the mean and the per-pair losses) against the fp64 formula."""
    p64, r64, mask = make_batch(3, 19, seed=61)
    p = p64.to(torch.bfloat16).requires_grad_(True)
    kw = dict(loss_type=loss_type, beta=0.2, nll_alpha=0.4, pilot_grad=True,
              **kwargs_for(loss_type))
    out = sf.preference_loss(p, r64.to(torch.bfloat16), mask, pairwise_impl="triton", **kw)
    w = torch.tensor([1.0, -0.5, 2.0], device=DEV)
    (g,) = torch.autograd.grad(out.loss + (out.losses * w).sum(), p)
    pq = p.detach().double().requires_grad_(True)
    want = formula_loss(pq, r64.to(torch.bfloat16).double(), mask, pilot=out.pilot_masks, **kw)
    (gw,) = torch.autograd.grad(want[0] + (want[1] * w.double()).sum(), pq)
    assert g.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss.double(), want[0], rtol=1e-5, atol=1e-6)
    assert rel(g, torch.nan_to_num(gw)) < 1e-2            # bf16 output rounding


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from sgdpo_fast.kernels import pairwise_loss as kp
from sgdpo_fast.kernels.pairwise_codes import FDIV_CODE, KERNEL_LOSS_TYPES, LOSS_CODE
F_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "sgdpo"}
sig = {"POL": "*bf16", "REF": "*bf16", "MASK": "*u8", "PILOT": "*u8", "STATS": "*fp32",
       "GRAD": "*fp32", "B": "i32", "T": "i32", "stride_pol": "i32", "stride_ref": "i32",
       "stride_mask": "i32", "stride_pilot": "i32", "stride_grad": "i32", "beta": "fp32",
       "eps": "fp32", "gamma": "fp32", "tau": "fp32", "f_alpha": "fp32"}
sizes = []
for name in KERNEL_LOSS_TYPES:
    fdiv = FDIV_CODE["alpha_divergence" if name in F_TYPES else "reverse_kl"]
    const = {"LOSS_TYPE": LOSS_CODE[name], "FDIV": fdiv, "HAS_REF": name != "simpo",
             "AVG": True, "AVG_LOSS": True, "NORM": name == "ipo", "PILOT_GRAD": name == "sgdpo",
             "N_OUT": kp.N_STATS, "BLOCK": kp.BLOCK_T}
    k = triton.compile(triton.compiler.ASTSource(
        fn=kp._pairwise_loss_kernel, signature=dict(sig, **{c: "constexpr" for c in const}),
        constexprs=const), target=GPUTarget("cuda", 90, 32), options={"num_warps": kp.NUM_WARPS})
    sizes.append(len(k.asm["cubin"]))
print("CUBIN", min(sizes), len(sizes))
"""


def test_kernel_compiles_for_sm90():
    """Compile, without a GPU, every loss code of the kernel (bf16, averaged; the
    alpha-divergence score where the loss takes one, pilot gradients for SGDPO) for an
    H100 (sm_90) target: the real compiler, not the interpreter."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=600)
    if res.returncode and "ptxas" in res.stderr.lower() and "not found" in res.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert res.returncode == 0, res.stderr[-3000:]
    smallest, count = map(int, res.stdout.split("CUBIN")[1].split())
    assert smallest > 0 and count == len(formulas.KERNEL_LOSS_TYPES)


# --------------------------------------------------------------------------- bad input

def _bad_cases():
    P, R, M = make_batch(2, 6, seed=71, poison=False)
    M[:] = True
    no_chosen = M.clone()
    no_chosen[1] = False
    no_rejected = M.clone()
    no_rejected[3] = False
    outside = M.clone()
    outside[0, 0] = False
    return [
        ("odd number of rows", dict(policy=P[:3], ref=R[:3], mask=M[:3]), "even"),
        ("empty chosen", dict(mask=no_chosen), "pair 1 has no response token in its chosen"),
        ("empty rejected", dict(mask=no_rejected), "pair 1 has no response token in its rejected"),
        ("r1 zero", dict(kw=dict(pilot_ratio_chosen=0.0)), "pilot_ratio_chosen"),
        ("r1 above one", dict(kw=dict(pilot_ratio_chosen=1.5)), "pilot_ratio_chosen"),
        ("r2 negative", dict(kw=dict(pilot_ratio_rejected=-0.2)), "pilot_ratio_rejected"),
        ("r2 nan", dict(kw=dict(pilot_ratio_rejected=float("nan"))), "pilot_ratio_rejected"),
        ("unknown loss", dict(kw=dict(loss_type="kto")), "loss_type"),
        ("missing ref", dict(ref=None, kw=dict(loss_type="sigmoid")), "ref_token_logps"),
        ("missing ref sgdpo", dict(ref=None), "ref_token_logps"),
        ("ref shape", dict(ref=R[:, :5]), "ref_token_logps shape"),
        ("mask shape", dict(mask=M[:, :5]), "mask shape"),
        ("policy 3-D", dict(policy=P[:, :, None], ref=R[:, :, None], mask=M[:, :, None]), "2-D"),
        ("policy integer", dict(policy=P.long()), "floating"),
        ("pilot shape", dict(kw=dict(pilot_masks=M[:, :4])), "pilot_masks shape"),
        ("pilot outside", dict(mask=outside, kw=dict(pilot_masks=M)), "outside the response"),
        ("pilot empty", dict(kw=dict(pilot_masks=no_rejected)), "pilot_masks row"),
        ("robust smoothing", dict(kw=dict(loss_type="robust", label_smoothing=0.5)), "label_smoothing"),
        ("ipo smoothing", dict(kw=dict(loss_type="ipo", label_smoothing=0.1)), "label_smoothing"),
        ("beta", dict(kw=dict(beta=0.0)), "beta"),
        ("pilot mode", dict(kw=dict(pilot_mode="shared")), "pilot_mode"),
        ("generator", dict(kw=dict(generator=7)), "generator"),
        ("exo without smoothing", dict(kw=dict(loss_type="exo_pair")), "exo_pair"),
        ("bco smoothing", dict(kw=dict(loss_type="bco_pair", label_smoothing=0.1)), "label_smoothing"),
        ("loss_weights length", dict(kw=dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0])),
         "loss_weights"),
        ("empty loss list", dict(kw=dict(loss_type=[])), "at least one"),
        ("unknown in list", dict(kw=dict(loss_type=["sigmoid", "dpo"])), "loss_type"),
        ("f-div on bco", dict(kw=dict(loss_type="bco_pair", f_divergence_type="forward_kl")),
         "f_divergence_type"),
        ("unknown f-div", dict(kw=dict(loss_type="sigmoid", f_divergence_type="kl")), "f_divergence_type"),
        ("ld_alpha range", dict(kw=dict(loss_type="sigmoid", ld_alpha=1.5)), "ld_alpha"),
        ("wpo without lss", dict(kw=dict(loss_type="sigmoid", use_weighting=True)), "log_sum_sq_probs"),
        ("wpo aot", dict(kw=dict(loss_type="aot", use_weighting=True)), "aot"),
        ("discopop tau", dict(kw=dict(loss_type="discopop", discopop_tau=0.0)), "discopop_tau"),
        ("triton aot", dict(kw=dict(loss_type="aot", pairwise_impl="triton")), "sorts the batch"),
        ("sft alone needs no reference", dict(ref=None, kw=dict(loss_type=["sft", "ipo"])),
         "'ipo' needs ref_token_logps"),
    ]


@pytest.mark.parametrize("case", _bad_cases(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(case):
    _, over, words = case
    P, R, M = make_batch(2, 6, seed=71, poison=False)
    M[:] = True
    args = dict(policy=P, ref=R, mask=M)
    args.update({k: v for k, v in over.items() if k != "kw"})
    with pytest.raises(ValueError, match=words):
        sf.preference_loss(args["policy"], args["ref"], args["mask"], **over.get("kw", {}))


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type", formulas.KERNEL_LOSS_TYPES)
def test_kernel_matches_torch_path_cuda_large(loss_type):
    """Real CUDA kernel on a training-sized batch (B=8 pairs, T=4099) against the torch path."""
    policy, ref, mask = make_batch(8, 4099, dtype=torch.float32, seed=7, device="cuda")
    pil = pilots.draw_pilot_masks(mask, 0.6, 0.9, "same", torch.Generator(device="cuda").manual_seed(0))
    for avg, pg in ((False, False), (True, True)):
        cfg = pairwise.PairwiseConfig(loss_type, 0.1, 0.1 if loss_type in SMOOTHABLE else 0.0, 0.5,
                                      avg, pg)
        r = None if loss_type in ("simpo", "sft") else ref
        s_t, g_t, _ = pairwise.pairwise_torch(policy, r, mask, pil, cfg)
        s_k, g_k, _ = pairwise.pairwise_triton(policy, r, mask, pil, cfg)
        torch.testing.assert_close(s_k, s_t, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("bad", [0.5, float("nan"), -1.0, 2.0])
@pytest.mark.parametrize("which", ["mask", "pilot_masks"])
def test_masks_must_be_bool_or_0_1(bad, which):
    """Issue 11, item 9: a float mask holding 0.5, NaN, -1 or 2 was taken as True; it is a
    ValueError naming the mask (the docs say bool or 0/1)."""
    P, R, M = make_batch(2, 6, seed=72, poison=False)
    M[:] = True
    m = M.to(P.dtype)
    m[1, 2] = bad
    kw = dict(pilot_masks=m) if which == "pilot_masks" else {}
    with pytest.raises(ValueError, match=f"{which} must be bool or hold only 0 and 1"):
        sf.preference_loss(P, R, M if which == "pilot_masks" else m, **kw)
