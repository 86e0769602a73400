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

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "sgdpo")
SMOOTHABLE = ("sigmoid", "robust", "simpo", "sgdpo")
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

def _trl_dpo_loss(policy, ref, mask, loss_type, beta, label_smoothing):
    """Run TRL 1.16's own DPOTrainer._compute_loss (unbound, on a stand-in trainer whose model
    returns our per-token log-probs and whose reference log-probs are precomputed)."""
    from trl.trainer.dpo_trainer import DPOTrainer
    B2, T = policy.shape

    class Acc:
        device = policy.device

        def gather_for_metrics(self, x):
            return x

        gather = gather_for_metrics

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=Acc(), aux_loss_enabled=False,
        ld_alpha=None, precompute_ref_logps=True, f_divergence_type="reverse_kl",
        loss_types=[loss_type], loss_weights=[1.0], beta=beta, label_smoothing=label_smoothing,
        use_weighting=False, _metrics={"train": collections.defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    zero = torch.zeros((), dtype=policy.dtype, device=policy.device)
    log_probs = torch.where(mask, policy, zero)   # a fused head gives 0 at label -100

    def model(**_):
        z = torch.zeros(B2, T, device=policy.device)
        return types.SimpleNamespace(log_probs=log_probs, entropy=z, mean_logits=z,
                                     is_top1=z.bool(), aux_loss=None)

    ref_logps = torch.where(mask, ref, zero).sum(1)
    ones = torch.ones(B2, 1, dtype=torch.long, device=policy.device)
    inputs = dict(input_ids=torch.zeros(B2, T + 1, dtype=torch.long, device=policy.device),
                  attention_mask=torch.ones(B2, T + 1, dtype=torch.long, device=policy.device),
                  completion_mask=torch.cat([0 * ones, mask.long()], 1),  # labels shift by one
                  ref_chosen_logps=ref_logps[:B2 // 2], ref_rejected_logps=ref_logps[B2 // 2:])
    loss = DPOTrainer._compute_loss(trainer, model, inputs, False)
    return loss, {k: v[0] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("loss_type,ls", [("sigmoid", 0.0), ("ipo", 0.0), ("hinge", 0.0),
                                          ("robust", 0.2)])
def test_matches_trl_dpo_trainer(loss_type, ls):
    pytest.importorskip("trl")
    policy, ref, mask = make_batch(4, 9, seed=11)
    policy.requires_grad_(True)
    trl_loss, trl_metrics = _trl_dpo_loss(policy, ref, mask, loss_type, 0.25, ls)
    (gt,) = torch.autograd.grad(trl_loss, policy)
    out = sf.preference_loss(policy, ref, mask, loss_type=loss_type, beta=0.25, label_smoothing=ls)
    (g,) = torch.autograd.grad(out.loss, policy)
    torch.testing.assert_close(out.loss, trl_loss, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, torch.nan_to_num(gt), rtol=1e-10, atol=1e-14)
    for key, val in out.metrics.items():
        assert math.isclose(val.item(), trl_metrics[key], rel_tol=1e-6, abs_tol=1e-9), key


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


@needs_triton
@pytest.mark.parametrize("T", [5, 300])
@pytest.mark.parametrize("avg,pilot_grad", [(False, False), (True, True)])
def test_kernel_matches_torch_path(T, avg, pilot_grad):
    policy, ref, mask = make_batch(3, T, dtype=torch.float32, seed=T)
    pil = pilots.draw_pilot_masks(mask, 0.6, 0.9, "different", torch.Generator().manual_seed(0))
    for lt in LOSS_TYPES:
        cfg = pairwise.PairwiseConfig(lt, 0.2, 0.1 if lt in SMOOTHABLE else 0.0, 0.5, avg, pilot_grad)
        r = None if lt == "simpo" else ref
        s_t, g_t = pairwise.pairwise_torch(policy, r, mask, pil, cfg)
        s_k, g_k = pairwise.pairwise_triton(policy, r, mask, pil, cfg)
        assert torch.isfinite(s_k).all() and torch.isfinite(g_k).all(), lt
        torch.testing.assert_close(s_k, s_t, rtol=1e-5, atol=1e-6, msg=lt)
        torch.testing.assert_close(g_k, g_t, rtol=1e-5, atol=1e-9, msg=lt)


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
sig = {"POL": "*bf16", "REF": "*bf16", "MASK": "*u8", "PILOT": "*u8", "STATS": "*fp32",
       "GRAD": "*fp32", "B": "i32", "T": "i32", "stride_pol": "i32", "stride_ref": "i32",
       "stride_mask": "i32", "stride_pilot": "i32", "stride_grad": "i32", "beta": "fp32",
       "eps": "fp32", "gamma": "fp32"}
const = {"LOSS_TYPE": 5, "HAS_REF": True, "AVG": True, "PILOT_GRAD": True,
         "N_OUT": kp.N_STATS, "BLOCK": kp.BLOCK_T}
sig.update({k: "constexpr" for k in const})
k = triton.compile(triton.compiler.ASTSource(fn=kp._pairwise_loss_kernel, signature=sig,
                                             constexprs=const),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": kp.NUM_WARPS})
print("CUBIN", len(k.asm["cubin"]))
"""


def test_kernel_compiles_for_sm90():
    """Compile, without a GPU, the most featureful kernel variant (SGDPO, bf16, averaged,
    pilot gradients) for an H100 (sm_90) target: the real compiler, not the interpreter."""
    pytest.importorskip("triton")
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=300)
    if res.returncode and "ptxas" in res.stderr.lower() and "not found" in res.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert res.returncode == 0, res.stderr[-3000:]
    assert int(res.stdout.split("CUBIN")[1]) > 0


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
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_kernel_matches_torch_path_cuda_large(loss_type):
    """Real CUDA kernel on a training-sized batch (B=8 pairs, T=4099) against the torch path."""
    policy, ref, mask = make_batch(8, 4099, dtype=torch.float32, seed=7, device="cuda")
    pil = pilots.draw_pilot_masks(mask, 0.6, 0.9, "same", torch.Generator(device="cuda").manual_seed(0))
    for avg, pg in ((False, False), (True, True)):
        cfg = pairwise.PairwiseConfig(loss_type, 0.1, 0.1 if loss_type in SMOOTHABLE else 0.0, 0.5,
                                      avg, pg)
        r = None if loss_type == "simpo" else ref
        s_t, g_t = pairwise.pairwise_torch(policy, r, mask, pil, cfg)
        s_k, g_k = pairwise.pairwise_triton(policy, r, mask, pil, cfg)
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
