"""Triton backend of the log-prob op against the fp64 oracle, under TRITON_INTERPRET=1 on CPU.

Small blocks make tiny, odd shapes span several token, vocabulary and D tiles.
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

pytest.importorskip("triton")

import sgdpo_fast as sf  # noqa: E402
from sgdpo_fast.ops import LogprobPlan, TritonConfig  # noqa: E402
from oracle import eager_logprobs, logp_rel_err, logprob_oracle, max_or_zero, rel_err  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


# small blocks under the interpreter, the kernels' defaults on a GPU
SMALL = TritonConfig(block_n=16, block_v=32, block_d=16) if DEV == "cpu" else TritonConfig()
PLAN = LogprobPlan(backend="triton", triton=SMALL)


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    """Reproducible inputs: the global RNG (and so ``_inputs``' default seed) is seeded
    from the test's node id, parametrization included."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))


def _inputs(N, D, V, dtype=torch.float32, bias=False, seed=None):
    """Random problem; target 0 is V - 1 (never ignored), so N >= 1 has a valid target."""
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()))  # global RNG: seeded per test above
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).to(DEV).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.4).to(dtype).to(DEV).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).to(DEV).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.2] = -100
    t[0] = V - 1  # the last vocabulary entry sits in a ragged tile (and is never ignored)
    up = torch.randn(N, generator=g).to(DEV)
    return h, w, b, t.to(DEV), up


def _check_no_worse_than_eager(h, w, b, t, up, lp):
    """Low precision: error vs the fp64 oracle no worse than eager PyTorch's in the same
    dtype (forward max-abs, gradients relative norm), plus a small margin."""
    ref = logprob_oracle(h, w, t, bias=b)
    eag = eager_logprobs(h, w, t, bias=b)
    err_ours = (lp.double() - ref).abs().max().item()
    err_eager = (eag.double() - ref).abs().max().item()
    assert err_ours <= 1.25 * err_eager + 1e-3, (err_ours, err_eager)
    ins = [x for x in (h, w, b) if x is not None]
    got = torch.autograd.grad(lp, ins, up)
    want = torch.autograd.grad(ref, ins, up.double())
    ref_e = torch.autograd.grad(eag, ins, up)
    for name, a, c, e in zip("hwb", got, want, ref_e):
        assert a.dtype == h.dtype
        assert rel_err(a, c) <= 1.25 * rel_err(e, c) + 1e-3, (name, rel_err(a, c), rel_err(e, c))


@pytest.mark.parametrize("kw,bias", [
    ({}, False),
    ({"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.3}, True),
], ids=["plain", "transform+bias"])
def test_triton_fp32_matches_oracle(kw, bias):
    h, w, b, t, up = _inputs(37, 45, 301, bias=bias)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN, **kw)
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    valid = t != -100
    assert torch.all(lp[~valid] == 0)
    assert bool(valid.any())
    rel = logp_rel_err(lp, ref)[valid]
    assert max_or_zero(rel) < 1e-5, max_or_zero(rel)
    ins = [x for x in (h, w, b) if x is not None]
    got = torch.autograd.grad(lp, ins, up)
    want = torch.autograd.grad(ref, ins, up.double())
    for a, c in zip(got, want):
        assert a.dtype == torch.float32 and rel_err(a, c) < 1e-4
    assert torch.all(got[0][~valid] == 0)


def test_triton_only_bias_and_hidden_grads():
    """needs_weight False while bias needs a gradient: the dW kernel must still give db."""
    h, w, b, t, up = _inputs(21, 17, 70, bias=True)
    lp = sf.fused_token_logprobs(h, w.detach(), t, bias=b, plan=PLAN)
    ref = logprob_oracle(h, w.detach(), t, bias=b)
    got = torch.autograd.grad(lp, (h, b), up)
    want = torch.autograd.grad(ref, (h, b), up.double())
    for a, c in zip(got, want):
        assert rel_err(a, c) < 1e-4


def test_triton_all_ignored():
    h, w, b, t, up = _inputs(19, 9, 40, bias=True)
    t[:] = -100
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN)
    assert torch.all(lp == 0)
    for gr in torch.autograd.grad(lp.sum(), (h, w, b)):
        assert torch.all(gr == 0)


def test_triton_bf16_no_worse_than_eager():
    h, w, b, t, up = _inputs(40, 64, 200, dtype=torch.bfloat16, bias=True)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN)
    _check_no_worse_than_eager(h, w, b, t, up, lp)


def test_triton_fp16_no_worse_than_eager():
    h, w, b, t, up = _inputs(29, 40, 150, dtype=torch.float16, bias=True)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN)
    assert lp.dtype == torch.float32
    _check_no_worse_than_eager(h, w, b, t, up, lp)


def test_triton_large_softcap_small_logits():
    """softcap=1e4 over logits ~1e-3 (tanh argument ~1e-7) at fp32 oracle tolerance."""
    g = torch.Generator().manual_seed(1234)
    N, D, V = 33, 16, 257
    h = torch.randn(N, D, generator=g).to(DEV).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 1e-3 / D ** 0.5).to(DEV).requires_grad_()
    b = (torch.randn(V, generator=g) * 1e-3).to(DEV).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    t[[3, 10]] = -100
    t = t.to(DEV)
    up = torch.randn(N, generator=g).to(DEV)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN, softcap=1e4)
    ref = logprob_oracle(h, w, t, bias=b, softcap=1e4)
    valid = t != -100
    assert max_or_zero(logp_rel_err(lp, ref)[valid]) < 1e-5, max_or_zero(logp_rel_err(lp, ref)[valid])
    spread = (ref[valid] - ref[valid].mean()).abs().max().item()
    err = (lp.double() - ref)[valid].abs().max().item()
    assert err < 1e-2 * spread, (err, spread)
    got = torch.autograd.grad(lp, (h, w, b), up)
    want = torch.autograd.grad(ref, (h, w, b), up.double())
    for name, a, c in zip("hwb", got, want):
        assert rel_err(a, c) < 1e-4, (name, rel_err(a, c))


def test_triton_split_count_does_not_change_result():
    h, w, b, t, _ = _inputs(23, 16, 250, bias=True)
    with torch.no_grad():
        outs = [sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN.replace(
            triton=TritonConfig(block_n=16, block_v=32, block_d=16, splits=s))) for s in (1, 3, 8)]
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0], outs[2], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_backward_chunks_and_splits(dtype):
    """Tiny scratch and program targets: several row chunks and several splits per launch."""
    cfg = TritonConfig(block_n=16, block_v=32, block_d=16, target_programs=6,
                       scratch_bytes=4 * 24 * 32)  # 32 rows of D=24 per chunk
    h, w, b, t, up = _inputs(70, 24, 150, dtype=dtype, bias=True)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN.replace(triton=cfg))
    if dtype != torch.float32:
        _check_no_worse_than_eager(h, w, b, t, up, lp)
        return
    ref = logprob_oracle(h, w, t, bias=b)
    got = torch.autograd.grad(lp, (h, w, b), up)
    want = torch.autograd.grad(ref, (h, w, b), up.double())
    for a, c in zip(got, want):
        assert a.dtype == dtype and rel_err(a, c) < 1e-4, rel_err(a, c)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_nan_upstream_gradient_propagates(dtype):
    """A NaN upstream gradient at one valid row: its dH row, and all of dW and db, are NaN (as
    eager autograd gives); every other dH row is the oracle's.  The rest of its token block
    has a zero upstream gradient: the old kernels skipped a block unless max |g| > 0, which
    NaN and 0 are not (tl.max drops NaN), and returned 0 there."""
    h, w, b, t, up = _inputs(21, 24, 90, dtype=dtype, bias=True)
    k = 3
    t[t == -100] = 5        # no ignored rows: the backend's first 16-row block is rows 0-15
    up[:16] = 0.0
    up[k] = float("nan")
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN)
    gh, gw, gb = torch.autograd.grad(lp, (h, w, b), up)
    assert torch.isnan(gh[k]).all() and torch.isnan(gw).all() and torch.isnan(gb).all()
    rest = torch.arange(21) != k
    assert torch.isfinite(gh[rest]).all()
    up0 = torch.where(rest, up, torch.zeros_like(up))
    ref = logprob_oracle(h, w, t, bias=b)
    (want,) = torch.autograd.grad(ref, (h,), up0.double())
    if dtype == torch.float32:
        assert rel_err(gh[rest], want[rest]) < 1e-4
    else:
        (eag,) = torch.autograd.grad(eager_logprobs(h, w, t, bias=b), (h,), up0)
        assert rel_err(gh[rest], want[rest]) <= 1.25 * rel_err(eag[rest], want[rest]) + 1e-3


# slab / accumulator layouts of the backward (sgdpo_fast/ops/sweep.py) with the Triton
# gradient-tile kernel as the producer: (slab_bytes, scratch_bytes, weight needs a gradient)
LAYOUTS = {
    "one-slab": (1 << 20, 1 << 20, True),
    "row-blocks": (16 * 96 * 4, 1 << 20, True),       # 16 tokens x 96 ids per slab
    "dW-tail": (1 << 20, 4 * 32, True),               # dH's sum borrows dW's end: tail re-run
    "frozen-head": (16 * 96 * 4, 4 * 32, False),      # no dW: row chunks
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_backward_layouts(layout, dtype):
    slab, scratch, weight_grad = LAYOUTS[layout]
    cfg = TritonConfig(block_n=16, block_v=32, block_d=16, slab_bytes=slab,
                       scratch_bytes=scratch)
    h, w, b, t, up = _inputs(45, 32, 1100, dtype=dtype, bias=True)   # D = 2 x block_d: EVEN_D
    w_in = w if weight_grad else w.detach()
    kw = {"temperature": 0.9} if dtype == torch.float32 else {}
    lp = sf.fused_token_logprobs(h, w_in, t, bias=b, plan=PLAN.replace(triton=cfg), **kw)
    ins = (h, w, b) if weight_grad else (h, b)
    got = torch.autograd.grad(lp, ins, up)
    ref = logprob_oracle(h, w_in, t, bias=b, **kw)
    want = torch.autograd.grad(ref, ins, up.double())
    if dtype == torch.float32:
        for a, c in zip(got, want):
            assert rel_err(a, c) < 1e-4
    else:   # no worse than eager bf16 (plus a margin), as the numerics contract asks
        eag = torch.autograd.grad(eager_logprobs(h, w_in, t, bias=b), ins, up)
        for a, c, e in zip(got, want, eag):
            assert a.dtype == dtype and rel_err(a, c) <= 1.25 * rel_err(e, c) + 1e-3


def test_triton_launch_order_does_not_change_results():
    """The grouped launch order only permutes independent programs: bitwise equal results
    (db, summed with atomics, up to the order of its fp32 additions)."""
    h, w, b, t, up = _inputs(70, 24, 300, bias=True)
    outs = []
    for group in (1, 3, 8):
        cfg = TritonConfig(block_n=16, block_v=32, block_d=16, group_n=group, splits=2,
                           slab_bytes=32 * 300 * 4)
        lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN.replace(triton=cfg))
        outs.append((lp.detach(),) + torch.autograd.grad(lp, (h, w, b), up))
    for o in outs[1:]:
        for a, c in zip(o[:3], outs[0][:3]):
            assert torch.equal(a, c)
        torch.testing.assert_close(o[3], outs[0][3], rtol=1e-6, atol=1e-7)


def _eager_transformed(h, w, b, t, softcap, temperature):
    """Eager in the inputs' dtype: bf16 logits (+ bias), then the transform and log_softmax in
    fp32 (what a user writes for a softcapped head)."""
    x = (h @ w.t() + b).float()
    x = softcap * torch.tanh(x / softcap) / temperature
    lp = torch.log_softmax(x, -1)
    valid = t != -100
    out = lp.gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


def test_triton_bf16_softcap_bias_temperature_no_worse_than_eager():
    """The rich-epilogue kernels (softcap; bias with db's atomics) in bf16, odd sizes, ignored
    rows: error against fp64 no worse than eager bf16's (plus a margin)."""
    kw = dict(softcap=4.0, temperature=0.8)
    h, w, b, t, up = _inputs(43, 40, 333, dtype=torch.bfloat16, bias=True)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=PLAN, **kw)
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    eag = _eager_transformed(h, w, b, t, **kw)
    assert (lp.double() - ref).abs().max() <= 1.25 * (eag.double() - ref).abs().max() + 1e-3
    got = torch.autograd.grad(lp, (h, w, b), up)
    want = torch.autograd.grad(ref, (h, w, b), up.double())
    egot = torch.autograd.grad(eag, (h, w, b), up)
    for a, c, e in zip(got, want, egot):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, c) <= 1.25 * rel_err(e, c) + 1e-3, (rel_err(a, c), rel_err(e, c))
