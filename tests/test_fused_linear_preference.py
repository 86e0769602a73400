"""FusedLinearPreferenceLoss end to end against an fp64 oracle (materialized logits + the
independent loss formula of test_losses), every loss type and CPU backend, bf16, the reference
paths, Liger's calling convention and Liger's own DPO loss."""
import os

import torch

if not torch.cuda.is_available():  # the triton backend runs on CPU tensors only interpreted
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402

import pytest  # noqa: E402

import sgdpo_fast as sf  # noqa: E402
from oracle import eager_logprobs, logprob_oracle  # noqa: E402
from test_losses import LOSS_TYPES, SMOOTHABLE, formula_loss, rel  # noqa: E402

IGN = -100


def make_inputs(B=2, T=7, D=16, V=45, *, dtype=torch.float32, seed=0, bias=True):
    """hidden [2B,T,D] chosen rows first, targets with an ignored prompt prefix and padding."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2 * B, T, D, generator=g)
    W = 0.4 * torch.randn(V, D, generator=g)
    b = 0.5 * torch.randn(V, generator=g) if bias else None
    rh = h + 0.3 * torch.randn(2 * B, T, D, generator=g)
    rW = W + 0.05 * torch.randn(V, D, generator=g)
    tg = torch.randint(0, V, (2 * B, T), generator=g)
    for i in range(2 * B):
        start = int(torch.randint(0, T - 2, (1,), generator=g))
        stop = int(torch.randint(start + 1, T + 1, (1,), generator=g))
        tg[i, :start] = IGN
        tg[i, stop:] = IGN
    cast = (lambda x: None if x is None else x.to(dtype))
    return dict(weight=cast(W), hidden=cast(h), targets=tg, bias=cast(b), ref_hidden=cast(rh),
                ref_weight=cast(rW))


def oracle(inp, loss_type, pilot, **kw):
    """fp64: materialized logits -> log_softmax -> gather, then the independent formula."""
    h = inp["hidden"].detach().double().requires_grad_(True)
    W = inp["weight"].detach().double().requires_grad_(True)
    b = None if inp["bias"] is None else inp["bias"].detach().double().requires_grad_(True)
    tg = inp["targets"]
    pol = logprob_oracle(h, W, tg, b, ignore_index=IGN)
    with torch.no_grad():
        ref = logprob_oracle(inp["ref_hidden"].double(), inp["ref_weight"].double(), tg, None,
                             ignore_index=IGN)
    res = formula_loss(pol, ref, tg != IGN, loss_type=loss_type, pilot=pilot, **kw)
    grads = torch.autograd.grad(res[0], [x for x in (h, W, b) if x is not None])
    return res, grads


def run_ours(inp, loss_fn, **extra):
    leaves = [inp[k].detach().clone().requires_grad_(True) for k in ("hidden", "weight", "bias")
              if inp[k] is not None]
    h, W = leaves[0], leaves[1]
    b = leaves[2] if len(leaves) > 2 else None
    loss, aux = loss_fn(W, h, inp["targets"], b, inp["ref_hidden"], inp["ref_weight"], None, **extra)
    grads = torch.autograd.grad(loss, leaves)
    return loss, aux, grads


def loss_kwargs(loss_type):
    return dict(beta=0.2, label_smoothing=0.1 if loss_type in SMOOTHABLE else 0.0, nll_alpha=0.3)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_module_matches_fp64_oracle(loss_type, backend):
    inp = make_inputs(seed=LOSS_TYPES.index(loss_type))
    kw = loss_kwargs(loss_type)
    fn = sf.FusedLinearPreferenceLoss(loss_type=loss_type, ignore_index=IGN, backend=backend, **kw)
    loss, aux, grads = run_ours(inp, fn, generator=torch.Generator().manual_seed(3))
    (want, want_losses, cr, rr, cl, rl), wgrads = oracle(inp, loss_type, aux.output.pilot_masks, **kw)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-7
    for g, w, name in zip(grads, wgrads, ("hidden", "weight", "bias")):
        assert g.dtype == torch.float32
        assert rel(g, w) < 1e-4, name
    torch.testing.assert_close(aux.losses.double(), want_losses, rtol=1e-5, atol=1e-6)
    for got, exp in zip((aux.chosen_rewards, aux.rejected_rewards, aux.chosen_logps, aux.rejected_logps),
                        (cr, rr, cl, rl)):
        torch.testing.assert_close(got.double(), exp, rtol=1e-5, atol=1e-5)
    assert "rewards/margins" in aux.metrics


@pytest.mark.skipif(importlib.util.find_spec("sgdpo_fast.ops.backends.triton_backend") is None,
                    reason="the triton backend (sgdpo_fast/ops/backends/triton_backend.py) is not there yet")
def test_module_triton_backend_small():
    from sgdpo_fast.ops.backends import triton_usable
    if not triton_usable("cpu") and not torch.cuda.is_available():
        pytest.skip("triton not usable here")
    inp = make_inputs(B=1, T=5, D=16, V=33, seed=9)
    fn = sf.FusedLinearPreferenceLoss(loss_type="sgdpo", ignore_index=IGN, backend="triton", beta=0.2)
    loss, aux, grads = run_ours(inp, fn, generator=torch.Generator().manual_seed(1))
    (want, *_), wgrads = oracle(inp, "sgdpo", aux.output.pilot_masks, beta=0.2)
    assert abs(loss.item() - want.item()) <= 1e-5 * abs(want.item()) + 1e-7
    for g, w in zip(grads, wgrads):
        assert rel(g, w) < 1e-4


@pytest.mark.parametrize("loss_type", ["sigmoid", "sgdpo"])
def test_bf16_no_worse_than_eager_bf16(loss_type):
    """bf16 hidden/weight: error against the fp64 oracle within eager bf16 PyTorch's own
    error (logits in bf16, log_softmax in fp32, same formula) plus a small margin."""
    inp = make_inputs(B=3, T=9, D=32, V=101, dtype=torch.bfloat16, seed=21)
    kw = dict(beta=0.2)
    fn = sf.FusedLinearPreferenceLoss(loss_type=loss_type, ignore_index=IGN, backend="torch", **kw)
    loss, aux, grads = run_ours(inp, fn, generator=torch.Generator().manual_seed(2))
    assert grads[0].dtype == torch.bfloat16
    pilot = aux.output.pilot_masks
    (want, *_), wgrads = oracle(inp, loss_type, pilot, **kw)
    # eager bf16
    h = inp["hidden"].detach().clone().requires_grad_(True)
    W = inp["weight"].detach().clone().requires_grad_(True)
    b = inp["bias"].detach().clone().requires_grad_(True)
    pol = eager_logprobs(h, W, inp["targets"], b, ignore_index=IGN)
    with torch.no_grad():
        ref = eager_logprobs(inp["ref_hidden"], inp["ref_weight"], inp["targets"], ignore_index=IGN)
    eager = formula_loss(pol, ref, inp["targets"] != IGN, loss_type=loss_type, pilot=pilot, **kw)[0]
    egrads = torch.autograd.grad(eager, (h, W, b))
    assert abs(loss.item() - want.item()) <= abs(eager.item() - want.item()) + 1e-4 * abs(want.item())
    for g, e, w, name in zip(grads, egrads, wgrads, ("hidden", "weight", "bias")):
        assert rel(g, w) <= 1.25 * rel(e, w) + 1e-3, name


def test_reference_paths_agree_and_take_no_gradient():
    inp = make_inputs(seed=31)
    fn = sf.FusedLinearPreferenceLoss(loss_type="sigmoid", ignore_index=IGN, backend="torch")
    rh = inp["ref_hidden"].clone().requires_grad_(True)
    rW = inp["ref_weight"].clone().requires_grad_(True)
    h = inp["hidden"].clone().requires_grad_(True)
    saved = []

    def pack(t):
        saved.append(t)
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        l1, _ = fn(inp["weight"], h, inp["targets"], inp["bias"], rh, rW)
    l1.backward()
    assert rh.grad is None and rW.grad is None
    assert not any(t.data_ptr() in (rh.data_ptr(), rW.data_ptr()) for t in saved)
    ref = sf.fused_token_logprobs(inp["ref_hidden"], inp["ref_weight"], inp["targets"], ignore_index=IGN)
    l2, _ = fn(inp["weight"], inp["hidden"], inp["targets"], inp["bias"], ref_token_logps=ref)
    torch.testing.assert_close(l2, l1.detach())
    # ref_weight (and ref_bias) default to the policy head's
    l3, _ = fn(inp["weight"], inp["hidden"], inp["targets"], inp["bias"], inp["ref_hidden"])
    l4, _ = fn(inp["weight"], inp["hidden"], inp["targets"], inp["bias"], inp["ref_hidden"],
               inp["weight"], inp["bias"])
    torch.testing.assert_close(l3, l4)
    # use_ref_model=False (Liger): reference log-probs taken as 0
    zeros = torch.zeros(inp["targets"].shape)
    l5, _ = sf.FusedLinearPreferenceLoss(loss_type="sigmoid", ignore_index=IGN, use_ref_model=False,
                                         backend="torch")(inp["weight"], inp["hidden"], inp["targets"],
                                                          inp["bias"])
    l6, _ = fn(inp["weight"], inp["hidden"], inp["targets"], inp["bias"], ref_token_logps=zeros)
    torch.testing.assert_close(l5, l6)


def test_generator_reproduces_sgdpo():
    inp = make_inputs(B=3, T=11, seed=41)
    fn = sf.FusedLinearPreferenceLoss(loss_type="sgdpo", ignore_index=IGN, backend="torch")
    a = fn(**inp, generator=torch.Generator().manual_seed(4))
    b = fn(**inp, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1].output.pilot_masks, b[1].output.pilot_masks)


def test_liger_calling_convention():
    inp = make_inputs(seed=51)
    fn = sf.FusedLinearPreferenceLoss(loss_type="sigmoid", ignore_index=IGN, backend="torch")
    pos = fn(inp["weight"], inp["hidden"], inp["targets"], inp["bias"], inp["ref_hidden"],
             inp["ref_weight"], None)
    kw = fn(lin_weight=inp["weight"], _input=inp["hidden"], target=inp["targets"], bias=inp["bias"],
            ref_input=inp["ref_hidden"], ref_weight=inp["ref_weight"], ref_bias=None)
    ours = fn(weight=inp["weight"], hidden=inp["hidden"], targets=inp["targets"], bias=inp["bias"],
              ref_hidden=inp["ref_hidden"], ref_weight=inp["ref_weight"])
    for other in (kw, ours):
        torch.testing.assert_close(other[0], pos[0], rtol=0, atol=0)
    loss, aux = pos
    assert isinstance(aux, tuple) and len(aux) == 7      # Liger's aux layout
    chosen_logps, rejected_logps, cmean, rmean, nll, cr, rr = aux
    assert chosen_logps.shape == cr.shape == (2,) and cmean.dim() == 0 and nll.dim() == 0
    with pytest.raises(ValueError, match="alias"):
        fn(inp["weight"], inp["hidden"], inp["targets"], _input=inp["hidden"])


@pytest.mark.parametrize("nll", [False, True])
def test_matches_liger_dpo_loss(nll):
    """Liger-Kernel's LigerFusedLinearDPOLoss (compiled=False: the same chunked code without
    torch.compile, which costs ~8 s here) on the same inputs: loss and gradients within
    1e-5 relative, aux entries within 1e-5 (fp32 both, different summation orders)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    inp = make_inputs(B=2, T=9, D=16, V=37, seed=61)
    args = (inp["weight"], inp["hidden"], inp["targets"], inp["bias"], inp["ref_hidden"],
            inp["ref_weight"], None)
    theirs = liger.LigerFusedLinearDPOLoss(ignore_index=IGN, beta=0.1, compiled=False,
                                           compute_nll_loss=nll, alpha=0.5)
    ours = sf.FusedLinearPreferenceLoss(loss_type="sigmoid", ignore_index=IGN, beta=0.1,
                                        compute_nll_loss=nll, alpha=0.5, backend="torch")
    results = []
    for fn in (theirs, ours):
        leaves = [a.detach().clone().requires_grad_(True) for a in args[:2]] + \
                 [args[3].detach().clone().requires_grad_(True)]
        loss, aux = fn(leaves[0], leaves[1], args[2], leaves[2], *args[4:])
        results.append((loss, aux, torch.autograd.grad(loss, leaves)))
    (l1, a1, g1), (l2, a2, g2) = results
    assert abs(l1.item() - l2.item()) <= 1e-5 * abs(l1.item())
    for x, y in zip(g1, g2):
        assert rel(y, x) < 1e-5
    for i, (x, y) in enumerate(zip(a1, a2)):
        torch.testing.assert_close(y.float(), x.float(), rtol=1e-5, atol=1e-5, msg=f"aux[{i}]")


def _bad_module_cases():
    inp = make_inputs(seed=71)
    odd = {**inp, "hidden": inp["hidden"][:3], "targets": inp["targets"][:3],
           "ref_hidden": inp["ref_hidden"][:3]}
    no_chosen = inp["targets"].clone()
    no_chosen[0] = IGN
    return [
        ("odd rows", odd, "even"),
        ("targets shape", {**inp, "targets": inp["targets"][:, :5]}, "targets"),
        ("hidden 2-D", {**inp, "hidden": inp["hidden"][0], "targets": inp["targets"][0]}, "hidden"),
        ("empty chosen", {**inp, "targets": no_chosen}, "pair 0 has no response token in its chosen"),
        ("both references", {**inp, "ref_token_logps": torch.zeros(inp["targets"].shape)}, "not both"),
        ("ref logps shape", {**inp, "ref_hidden": None, "ref_weight": None,
                             "ref_token_logps": torch.zeros(4, 3)}, "ref_token_logps"),
        ("no reference", {**inp, "ref_hidden": None, "ref_weight": None}, "ref_token_logps"),
        ("ref_weight alone", {**inp, "ref_hidden": None}, "ref_hidden"),
        ("weight D", {**inp, "weight": inp["weight"][:, :5]}, "D="),
    ]


@pytest.mark.parametrize("case", _bad_module_cases(), ids=lambda c: c[0])
def test_module_bad_input(case):
    _, args, words = case
    fn = sf.FusedLinearPreferenceLoss(loss_type="sigmoid", ignore_index=IGN, backend="torch")
    with pytest.raises(ValueError, match=words):
        fn(**args)


def test_module_bad_config():
    with pytest.raises(ValueError, match="loss_type"):
        sf.FusedLinearPreferenceLoss(loss_type="dpo")
    with pytest.raises(ValueError, match="NLL weight"):
        sf.FusedLinearPreferenceLoss(nll_alpha=0.1, compute_nll_loss=True)


def _oracle_logps(inp):
    h = inp["hidden"].detach().double().requires_grad_(True)
    W = inp["weight"].detach().double().requires_grad_(True)
    b = inp["bias"].detach().double().requires_grad_(True)
    tg = inp["targets"]
    pol = logprob_oracle(h, W, tg, b, ignore_index=IGN)
    with torch.no_grad():
        ref = logprob_oracle(inp["ref_hidden"].double(), inp["ref_weight"].double(), tg, None,
                             ignore_index=IGN)
        x = h @ W.t() + b
        lss = torch.logsumexp(2 * torch.log_softmax(x, -1), -1)   # log sum_v p_v^2
    return (h, W, b), pol, ref, lss


@pytest.mark.parametrize("loss_type,kw", [
    ("exo_pair", dict(label_smoothing=0.01)), ("nca_pair", {}), ("bco_pair", {}),
    ("sppo_hard", {}), ("apo_zero", {}), ("apo_down", {}), ("discopop", dict(discopop_tau=0.2)),
    ("sigmoid_norm", {}), ("aot", dict(label_smoothing=0.1)), ("aot_unpaired", {}),
    (["sigmoid", "bco_pair", "sft"], dict(loss_weights=[0.8, 0.2, 1.0])),
    ("sigmoid", dict(ld_alpha=0.3, f_divergence_type="js_divergence")),
    ("ipo", dict(use_weighting=True)),
])
def test_module_trl_types_match_fp64_oracle(loss_type, kw):
    """Every other loss type / option through the fused module: the fp64 materialized
    log-probs (and log sum p^2 for WPO) fed to preference_loss (itself checked against
    TRL's code in test_losses)."""
    inp = make_inputs(B=3, seed=81)
    fn = sf.FusedLinearPreferenceLoss(loss_type=loss_type, ignore_index=IGN, backend="cpu", beta=0.2, **kw)
    loss, aux, grads = run_ours(inp, fn)
    leaves, pol, ref, lss = _oracle_logps(inp)
    want = sf.preference_loss(pol, ref, inp["targets"] != IGN, loss_type=loss_type, beta=0.2,
                              log_sum_sq_probs=lss if kw.get("use_weighting") else None, **kw)
    wgrads = torch.autograd.grad(want.loss, leaves)
    assert abs(loss.item() - want.loss.item()) <= 1e-5 * abs(want.loss.item()) + 1e-7
    for g, w, name in zip(grads, wgrads, ("hidden", "weight", "bias")):
        assert rel(g, w) < 1e-4, name
    torch.testing.assert_close(aux.losses.double(), want.losses, rtol=1e-5, atol=1e-6)


def test_forward_makes_no_fp32_copy_of_the_head():
    """The Liger-style aux (mean logits) is summed in fp32 without an fp32 copy of the
    bf16 head: nothing of the head's size is allocated but what the op itself needs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Big(TorchDispatchMode):
        def __init__(self, limit):
            super().__init__()
            self.limit, self.seen = limit, []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in (out if isinstance(out, (tuple, list)) else [out]):
                if isinstance(o, torch.Tensor) and o.numel() * o.element_size() >= self.limit:
                    self.seen.append((str(func), tuple(o.shape), o.dtype))
            return out

    g = torch.Generator().manual_seed(0)
    V, D = 4096, 64
    w = (torch.randn(V, D, generator=g) * 0.1).bfloat16()
    h = torch.randn(4, 6, D, generator=g).bfloat16()
    t = torch.randint(0, V, (4, 6), generator=g)
    loss_fn = sf.FusedLinearDPOLoss(use_ref_model=False)
    with torch.no_grad(), Big(V * D * 2) as mode:
        loss_fn(w, h, t)
    assert not mode.seen, mode.seen


@pytest.mark.parametrize("bad,match", [
    ("ref_dtype", "ref_hidden dtype"), ("ref_bias_shape", "ref_bias must have shape"),
    ("ref_weight_dtype", "ref_hidden dtype .* differs from ref_weight"),
])
def test_reference_tensors_are_named_in_errors(bad, match):
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(11, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    t = torch.randint(0, 11, (4, 5), generator=g)
    kw = dict(ref_input=h.clone())
    if bad == "ref_dtype":
        kw["ref_input"] = h.bfloat16()
    elif bad == "ref_bias_shape":
        kw.update(ref_weight=w.clone(), ref_bias=torch.zeros(7))
    else:
        kw.update(ref_weight=w.double())
    with pytest.raises(ValueError, match=match):
        sf.FusedLinearDPOLoss()(w, h, t, **kw)


def test_wpo_module_compiles_fullgraph():
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    w, h = torch.randn(11, 8, generator=g), torch.randn(4, 5, 8, generator=g)
    t = torch.randint(0, 11, (4, 5), generator=g)
    loss_fn = sf.FusedLinearDPOLoss(use_ref_model=False, use_weighting=True)
    f = torch.compile(lambda w, h, t: loss_fn(w, h, t)[0], fullgraph=True)
    torch.testing.assert_close(f(w, h, t), loss_fn(w, h, t)[0])
