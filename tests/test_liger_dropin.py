"""Code written for Liger-Kernel's LigerFusedLinearDPOLoss runs with sgdpo_fast's class
swapped in and gives Liger's DPO loss.

Liger's chunked loss runs on CPU: ``compiled=False`` (eager) here; its
``compiled=True`` path also runs on CPU but spends ~8 s in torch.compile, which
changes nothing numerically for this comparison.  Tolerances (fp32): loss 1e-5
relative plus 2e-6 * beta * max|sequence logp| absolute, gradients 1e-4 relative
norm, aux values 1e-5.
"""
import pytest
import torch

import sgdpo_fast as sf
from oracle import SEED, rel_err  # noqa: E402

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss")


def user_code(LossCls, weight, hidden, target, ref_hidden, ref_weight, bias=None, **ctor):
    """What a Liger user writes (kept verbatim apart from the class)."""
    loss_fn = LossCls(**ctor)
    loss, aux = loss_fn(weight, hidden, target, bias, ref_input=ref_hidden, ref_weight=ref_weight)
    chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, *rest = aux
    loss.backward()
    return loss.detach(), (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
                           nll_loss, *rest)


def _inputs(B, T, D, V, bias):
    g = torch.Generator().manual_seed(SEED)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    b = torch.randn(V, generator=g) if bias else None
    rh = h + 0.3 * torch.randn(2 * B, T, D, generator=g)
    rw = w + 0.1 * torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):  # a prompt prefix and some right padding, varying per row
        p = int(torch.randint(1, T // 2, (1,), generator=g))
        t[r, :p] = -100
        t[r, T - int(torch.randint(0, 3, (1,), generator=g)):] = -100
    return h, w, b, rh, rw, t


def _run(LossCls, inp, **ctor):
    h, w, b, rh, rw, t = inp
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss, aux = user_code(LossCls, w, h, t, rh, rw, bias=b, **ctor)
    return loss, aux, h.grad, w.grad, None if b is None else b.grad


@pytest.mark.parametrize("ctor", [
    dict(beta=0.1),
    dict(beta=0.05, loss_type="hinge"),
    dict(beta=0.2, loss_type="robust", label_smoothing=0.1),
    dict(beta=0.1, compute_nll_loss=True, alpha=0.7),
    dict(beta=0.1, average_log_prob=True),
])
@pytest.mark.parametrize("bias", [False, True])
def test_liger_user_code_gives_liger_dpo_loss(ctor, bias):
    inp = _inputs(B=3, T=9, D=12, V=37, bias=bias)
    theirs = _run(liger_dpo.LigerFusedLinearDPOLoss, inp, compiled=False, **ctor)
    # the swap: same user code, our class; DPO is loss_type="sigmoid" (our default is "sgdpo")
    ours = _run(sf.FusedLinearPreferenceLoss, inp, **{"loss_type": "sigmoid", **ctor})
    assert torch.isfinite(theirs[0])
    if ctor.get("loss_type") != "hinge":  # hinge is exactly 0 when every pair clears the margin
        assert theirs[0] > 0
    # The loss sees the sequence log-probs through beta: fp32 sums of |logp| ~ 30 carry
    # ~1e-6 relative error in both implementations, so a small hinge loss (relu of a
    # difference) needs an absolute term scaled by beta * |logp|.
    logp_scale = float(torch.cat([theirs[1][0], theirs[1][1]]).abs().max())
    atol = 2e-6 * ctor["beta"] * logp_scale
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=atol), (ours[0], theirs[0])
    for a, e in zip(ours[2:], theirs[2:]):  # dH, dW, db
        if e is not None:
            assert rel_err(a, e) < 1e-4
    # aux in Liger's order: logps, logits means, nll, rewards
    for i, (a, e) in enumerate(zip(ours[1], theirs[1])):
        assert torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(e).double(),
                              rtol=1e-5, atol=1e-5), i
