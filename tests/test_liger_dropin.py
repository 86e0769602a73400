"""Code written for Liger-Kernel's LigerFusedLinearDPOLoss runs with sgdpo_fast's
FusedLinearDPOLoss swapped in (import and class name changed, nothing else) and gives
Liger's numbers, for every loss type Liger 0.8.5 has.

Liger's chunked loss runs on CPU: ``compiled=False`` (eager) here; its
``compiled=True`` path also runs on CPU but spends ~8 s in torch.compile, which
changes nothing numerically for this comparison.  Tolerances (fp32): loss 1e-5
relative plus 2e-6 * beta * max|sequence logp| absolute, gradients 1e-4 relative
norm, aux values 1e-5.
"""
import inspect

import pytest
import torch

import sgdpo_fast as sf
from oracle import SEED, rel_err  # noqa: E402

liger_dpo = pytest.importorskip("liger_kernel.chunked_loss")
LIGER_TYPES = sorted(liger_dpo.LigerFusedLinearDPOLoss._SUPPORTED_LOSS_TYPES)


def user_code(LossCls, weight, hidden, target, ref_hidden, ref_weight, bias=None, args=(), **ctor):
    """What a Liger user writes (kept verbatim apart from the class)."""
    loss_fn = LossCls(*args, **ctor)
    loss, aux = loss_fn(weight, hidden, target, bias, ref_input=ref_hidden, ref_weight=ref_weight)
    chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, *rest = aux
    loss.backward()
    return loss.detach(), (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean,
                           nll_loss, *rest)


def _inputs(B, T, D, V, bias, scale=2.0):
    g = torch.Generator().manual_seed(SEED)
    h = torch.randn(2 * B, T, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5 * scale
    b = torch.randn(V, generator=g) if bias else None
    rh = h + 0.3 * torch.randn(2 * B, T, D, generator=g)
    rw = w + 0.1 * torch.randn(V, D, generator=g)
    t = torch.randint(0, V, (2 * B, T), generator=g)
    for r in range(2 * B):  # a prompt prefix and some right padding, varying per row
        p = int(torch.randint(1, T // 2, (1,), generator=g))
        t[r, :p] = -100
        t[r, T - int(torch.randint(0, 3, (1,), generator=g)):] = -100
    return h, w, b, rh, rw, t


def _run(LossCls, inp, args=(), **ctor):
    h, w, b, rh, rw, t = inp
    h = h.clone().requires_grad_()
    w = w.clone().requires_grad_()
    b = None if b is None else b.clone().requires_grad_()
    loss, aux = user_code(LossCls, w, h, t, rh, rw, bias=b, args=args, **ctor)
    return loss, aux, h.grad, w.grad, None if b is None else b.grad


def _assert_same(ours, theirs, beta):
    assert torch.isfinite(theirs[0])
    # The loss sees the sequence log-probs through beta: fp32 sums of |logp| ~ 30 carry
    # ~1e-6 relative error in both implementations, so a loss that is a difference (hinge,
    # apo) needs an absolute term scaled by beta * |logp|.
    logp_scale = float(torch.cat([theirs[1][0], theirs[1][1]]).abs().max())
    atol = 2e-6 * beta * max(logp_scale, 1.0 / beta)
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=atol), (ours[0], theirs[0])
    for a, e in zip(ours[2:], theirs[2:]):  # dH, dW, db
        if e is not None:
            assert rel_err(a, e) < 1e-4 or (a - e).abs().max() < 1e-7
    assert len(ours[1]) == len(theirs[1])  # aux in Liger's order: logps, logits means, nll, rewards
    for i, (a, e) in enumerate(zip(ours[1], theirs[1])):
        assert torch.allclose(torch.as_tensor(a).double(), torch.as_tensor(e).double(),
                              rtol=1e-5, atol=1e-5), i


@pytest.mark.parametrize("loss_type", LIGER_TYPES)
@pytest.mark.parametrize("bias", [False, True])
def test_every_liger_loss_type_gives_liger_numbers(loss_type, bias):
    """label_smoothing=0.1 throughout: Liger reads it for robust and exo_pair only (and
    so does FusedLinearDPOLoss); discopop_tau=0.3 (read by discopop)."""
    inp = _inputs(B=3, T=9, D=12, V=37, bias=bias)
    ctor = dict(beta=0.1, loss_type=loss_type, label_smoothing=0.1, discopop_tau=0.3)
    theirs = _run(liger_dpo.LigerFusedLinearDPOLoss, inp, compiled=False, **ctor)
    ours = _run(sf.FusedLinearDPOLoss, inp, compiled=False, **ctor)
    _assert_same(ours, theirs, 0.1)


@pytest.mark.parametrize("ctor", [
    dict(beta=0.1),                                     # Liger's defaults: DPO (sigmoid)
    dict(beta=0.05, loss_type="hinge"),
    dict(beta=0.1, compute_nll_loss=True, alpha=0.7),
    dict(beta=0.1, average_log_prob=True, loss_type="apo_zero"),
    dict(beta=0.2, use_ref_model=False, loss_type="bco_pair"),
    dict(beta=0.1, loss_type="discopop"),               # Liger's default discopop_tau
    dict(beta=0.1, loss_type="exo_pair", label_smoothing=1e-3, compute_nll_loss=True),
])
def test_liger_options_give_liger_numbers(ctor):
    inp = _inputs(B=2, T=11, D=16, V=29, bias=True)
    theirs = _run(liger_dpo.LigerFusedLinearDPOLoss, inp, compiled=False, **ctor)
    ours = _run(sf.FusedLinearDPOLoss, inp, **ctor)
    _assert_same(ours, theirs, ctor["beta"])


def test_positional_constructor_and_defaults_are_liger_s():
    """LigerFusedLinearDPOLoss(-100, 0.1, ...) means ignore_index, beta, ...: the same
    names, order and defaults; swapping only the class keeps Liger's DPO (sigmoid)."""
    theirs = inspect.signature(liger_dpo.LigerFusedLinearDPOLoss.__init__).parameters
    ours = inspect.signature(sf.FusedLinearDPOLoss.__init__).parameters
    positional = [p for p in ours.values() if p.kind == p.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.default) for p in positional] == [(p.name, p.default) for p in theirs.values()]
    f_theirs = inspect.signature(liger_dpo.LigerFusedLinearDPOLoss.forward).parameters
    f_ours = inspect.signature(sf.FusedLinearDPOLoss.forward).parameters
    assert [(p.name, p.default) for p in f_ours.values() if p.kind == p.POSITIONAL_OR_KEYWORD] == \
           [(p.name, p.default) for p in f_theirs.values()]
    assert sf.FusedLinearDPOLoss().loss_type == "sigmoid"
    inp = _inputs(B=2, T=8, D=12, V=31, bias=False)
    args = (-100, 0.2, 0.5, True)       # ignore_index, beta, alpha, compute_nll_loss
    theirs = _run(liger_dpo.LigerFusedLinearDPOLoss, inp, args=args + (False,))
    ours = _run(sf.FusedLinearDPOLoss, inp, args=args)
    _assert_same(ours, theirs, 0.2)


def test_beyond_liger_sgdpo_and_trl_types():
    """The drop-in also runs what Liger lacks: SGDPO with its options, TRL's ipo, and a
    weighted list; its numbers equal FusedLinearPreferenceLoss's (one implementation)."""
    h, w, b, rh, rw, t = _inputs(B=2, T=8, D=12, V=31, bias=True)
    g = torch.Generator().manual_seed(3)
    a = sf.FusedLinearDPOLoss(loss_type="sgdpo", pilot_ratio_chosen=0.5, label_smoothing=0.1)(
        w, h, t, b, rh, rw, generator=g)[0]
    c = sf.FusedLinearPreferenceLoss("sgdpo", 0.1, -100, 0.1, 0.5)(
        w, h, t, b, rh, rw, generator=torch.Generator().manual_seed(3))[0]
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    for lt, kw in (("ipo", {}), (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
                   ("aot_unpaired", {})):
        loss, aux = sf.FusedLinearDPOLoss(loss_type=lt, **kw)(w, h, t, b, rh, rw)
        assert torch.isfinite(loss) and len(aux) == 7


def test_liger_config_errors_at_construction():
    with pytest.raises(ValueError, match="exo_pair"):
        sf.FusedLinearDPOLoss(loss_type="exo_pair")                 # Liger: label_smoothing > 0
    with pytest.raises(ValueError, match="robust"):
        sf.FusedLinearDPOLoss(loss_type="robust", label_smoothing=0.5)
    with pytest.raises(ValueError, match="loss_type"):
        sf.FusedLinearDPOLoss(loss_type="kto")


def test_mixed_list_with_label_smoothing_is_refused():
    """Liger's convention reads label_smoothing for some types only: a combined loss of both
    kinds cannot honour it and is refused when built."""
    with pytest.raises(ValueError, match="label_smoothing=0.2 with loss_type"):
        sf.FusedLinearDPOLoss(loss_type=["sigmoid", "robust"], loss_weights=[1.0, 0.0],
                              label_smoothing=0.2)
    sf.FusedLinearDPOLoss(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.0],
                          label_smoothing=0.2)  # both ignore it: fine


def test_missing_reference_names_the_liger_arguments():
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(11, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    t = torch.randint(0, 11, (4, 5), generator=g)
    with pytest.raises(ValueError, match="ref_input .* use_ref_model=False"):
        sf.FusedLinearDPOLoss()(w, h, t)
