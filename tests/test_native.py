"""The C++ CPU epilogue (sgdpo_fast._C) against the torch epilogue and the fp64 oracle."""
import pytest
import torch

import sgdpo_fast as sf
from sgdpo_fast.ops import LogprobPlan, TileConfig, native, sweep
from sgdpo_fast.ops.backends import cuda_backend, epilogue_torch
from sgdpo_fast.ops.transform import LogitTransform
from oracle import eager_logprobs, logprob_oracle, rel_err

# `make test` builds the extension, so its absence is a failure here, never a skip.
EP = native.cpu_epilogue()

TFS = [LogitTransform(), LogitTransform(1.7, None, 0.6), LogitTransform(1.3, 4.0, 1.2)]


def test_extension_is_built():
    assert EP is not None, native.why_missing()


@pytest.mark.parametrize("tf", TFS, ids=["plain", "scaled", "softcap"])
def test_fold_matches_torch_epilogue(tf):
    n, vt, v0 = 37, 301, 1000
    x = torch.randn(n, vt) * 4
    targets = torch.randint(v0 - 50, v0 + vt + 50, (n,))  # some outside the tile
    targets[:3] = -100
    state = [torch.full((n,), float("-inf")), torch.zeros(n), torch.full((n,), 7.0)]
    want = [t.clone() for t in state]
    for _ in range(2):  # a second fold exercises the rescaling of a finite running max
        EP.fold_tile_(x, v0, targets, *state, tf)
        epilogue_torch.fold_tile_(x, v0, targets, *want, tf)
        x = x * 0.5 + 1.0
    for a, b in zip(state, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)
    outside = (targets < v0) | (targets >= v0 + vt)
    assert torch.all(state[2][outside] == 7.0)


@pytest.mark.parametrize("tf", TFS, ids=["plain", "scaled", "softcap"])
def test_fold_masked_vocabulary_tile(tf):
    """A tile whose raw logits are all -inf (masked vocabulary entries) adds nothing: the
    state after it and a finite tile equals the state after the finite tile alone, where
    the torch epilogue would give NaN (exp(-inf - -inf)).  Under a softcap the masked
    logits become -softcap/T, finite, and both epilogues fold them normally."""
    n, vt = 6, 40
    t = torch.tensor([3, 45, 50, -100, 79, 0])
    masked, finite = torch.full((n, vt), float("-inf")), torch.randn(n, vt) * 2
    got = [torch.full((n,), float("-inf")), torch.zeros(n), torch.zeros(n)]
    want = [x.clone() for x in got]
    EP.fold_tile_(masked, 0, t, *got, tf)
    EP.fold_tile_(finite, vt, t, *got, tf)
    if tf.softcap is not None:
        epilogue_torch.fold_tile_(masked, 0, t, *want, tf)
    else:
        want[2][(t >= 0) & (t < vt)] = float("-inf")  # targets inside the masked tile
    epilogue_torch.fold_tile_(finite, vt, t, *want, tf)
    assert not any(torch.isnan(x).any() for x in got)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("tf", TFS, ids=["plain", "scaled", "softcap"])
def test_grad_matches_torch_epilogue(tf):
    n, vt, v0 = 29, 257, 64
    x = torch.randn(n, vt) * 3
    targets = torch.randint(0, v0 + vt + 10, (n,))
    lse = torch.logsumexp(tf.apply(x), dim=1) + torch.rand(n)
    g = torch.randn(n)
    g[::4] = 0.0
    a, b = x.clone(), x.clone()
    EP.grad_tile_(a, v0, targets, lse, g, tf)
    epilogue_torch.grad_tile_(b, v0, targets, lse, g, tf)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert torch.all(a[::4] == 0)


def test_grad_on_strided_tile_view():
    """The tiled driver hands views of a flat buffer; a row stride larger than vt must work."""
    big = torch.randn(10, 40)
    view = big[:, 5:25]
    ref = view.clone()
    t = torch.randint(0, 20, (10,))
    lse, g = torch.randn(10), torch.randn(10)
    tf = LogitTransform()
    EP.grad_tile_(view, 0, t, lse, g, tf)
    epilogue_torch.grad_tile_(ref, 0, t, lse, g, tf)
    torch.testing.assert_close(view, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kw", [{}, {"softcap": 2.0, "temperature": 0.8, "logit_scale": 1.5}],
                         ids=["plain", "transform"])
def test_cpu_backend_native_vs_oracle(kw):
    g = torch.Generator().manual_seed(123)
    h = torch.randn(53, 33, generator=g).requires_grad_()
    w = torch.randn(611, 33, generator=g).requires_grad_()
    b = torch.randn(611, generator=g).requires_grad_()
    t = torch.randint(0, 611, (53,), generator=g)
    t[::6] = -100
    up = torch.randn(53, generator=g)
    lp = sf.fused_token_logprobs(h, w, t, bias=b, backend="cpu", **kw)
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    valid = t != -100
    assert ((lp.double() - ref).abs() / ref.abs().clamp_min(1e-6))[valid].max() < 1e-5
    for a, c in zip(torch.autograd.grad(lp, (h, w, b), up),
                    torch.autograd.grad(ref, (h, w, b), up.double())):
        assert ((a.double() - c).norm() / c.norm()).item() < 1e-4


def _problem(N, D, V, dtype=torch.float32, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, generator=g) / D ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.2] = -100
    t[:2] = torch.tensor([0, V - 1])[:N]  # first and last vocabulary entries (first and last tile)
    up = torch.randn(N, generator=g)
    return h, w, b, t, up


def _run_driver(forward, backward, h, w, b, t, up, tf, tiles):
    """A backend's driver called directly (``forward(h, w, b, t, plan)`` and
    ``backward(h, w, b, t, lse, grad, plan, ...)``): forward, then backward with
    grad = up * valid; ignored rows (-100) are simply rows with no target here."""
    plan = LogprobPlan(tiles=tiles, transform=tf)
    valid = t != -100
    with torch.no_grad():
        st = forward(h, w, b, t, plan)
        lse = sweep.finalize(st)
        logp = torch.where(valid, st.tgt - lse, torch.zeros_like(lse))
        grad = torch.where(valid, up, torch.zeros_like(up))
        grads = backward(h, w, b, t, lse, grad, plan, True, True, b is not None)
    return logp, [gr for gr in grads if gr is not None]


def _native_driver():
    fwd = lambda h, w, b, t, plan: sweep.forward_stats(h, w, b, t, plan.transform, EP,  # noqa: E731
                                                       plan.tiles)
    bwd = lambda h, w, b, t, lse, g, plan, *needs: sweep.backward_tiled(  # noqa: E731
        h, w, b, t, lse, g, plan.transform, EP, plan.tiles, *needs)
    return fwd, bwd


@pytest.mark.parametrize("kw", [{}, {"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.9}],
                         ids=["plain", "transform"])
def test_tiled_driver_many_tiles_native_vs_oracle(kw):
    """Odd sizes split into several token blocks and vocabulary tiles (incl. a ragged last
    one), so the online fold across tiles and the fp32 accumulation across blocks run."""
    h, w, b, t, up = _problem(53, 29, 611, seed=1)
    tf = LogitTransform(kw.get("logit_scale", 1.0), kw.get("softcap"), kw.get("temperature", 1.0))
    tiles = TileConfig(tile_elems=16 * 300, max_block_n=16)
    assert tiles.shape(53, 611) == (16, 300)  # blocks of 16, 16, 16, 5 tokens; tiles of 300, 300, 11
    logp, grads = _run_driver(*_native_driver(), h, w, b, t, up, tf, tiles)
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    valid = t != -100
    assert torch.all(logp[~valid] == 0)
    assert ((logp.double() - ref).abs() / ref.abs().clamp_min(1e-6))[valid].max() < 1e-5
    want = torch.autograd.grad(ref, (h, w, b), up.double())
    for a, c in zip(grads, want):
        assert rel_err(a, c) < 1e-4


def test_cpu_backend_native_all_masked_and_tiny():
    h, w, b, t, _ = _problem(7, 5, 3)  # V below the minimum tile width
    t[:] = -100
    lp = sf.fused_token_logprobs(h, w, t, bias=b, backend="cpu")
    assert torch.all(lp == 0)
    gh, gw, gb = torch.autograd.grad(lp.sum(), (h, w, b))
    for gr in (gh, gw, gb):
        assert torch.isfinite(gr).all() and torch.all(gr == 0)
    h1, w1, b1, t1, up1 = _problem(1, 5, 3, seed=4)
    t1[:] = 1
    lp1 = sf.fused_token_logprobs(h1, w1, t1, bias=b1, backend="cpu")
    ref1 = logprob_oracle(h1, w1, t1, bias=b1)
    assert (lp1.double() - ref1).abs().max() < 1e-5 * ref1.abs().max() + 1e-7


def _cuda_driver_with_torch_epilogue():
    """The cuda backend's code with the reference epilogue (runs on CPU tensors)."""
    fwd = lambda h, w, b, t, plan: cuda_backend.forward(h, w, b, t, plan,  # noqa: E731
                                                        epilogue=epilogue_torch)
    bwd = lambda *a: cuda_backend.backward(*a, epilogue=epilogue_torch)  # noqa: E731
    return fwd, bwd


def test_cuda_driver_on_cpu_fp32_vs_oracle():
    """The cuda backend's driver with a reference epilogue."""
    h, w, b, t, up = _problem(41, 23, 523, seed=2)
    tf = LogitTransform(1.2, 5.0, 0.9)
    logp, grads = _run_driver(*_cuda_driver_with_torch_epilogue(), h, w, b, t, up, tf,
                              TileConfig(tile_elems=16 * 260, max_block_n=16))
    ref = logprob_oracle(h, w, t, bias=b, logit_scale=1.2, softcap=5.0, temperature=0.9)
    valid = t != -100
    assert ((logp.double() - ref).abs() / ref.abs().clamp_min(1e-6))[valid].max() < 1e-5
    for a, c in zip(grads, torch.autograd.grad(ref, (h, w, b), up.double())):
        assert a.dtype == torch.float32 and rel_err(a, c) < 1e-4


def test_cuda_driver_on_cpu_bf16_no_worse_than_eager():
    """bf16 inputs, fp32 logit tiles, fp32 accumulation: error against the fp64 oracle
    within eager bf16's own error (plus a margin), as the numerics contract asks."""
    h, w, _, t, up = _problem(48, 64, 1500, dtype=torch.bfloat16, seed=3, bias=False)
    logp, (gh, gw) = _run_driver(*_cuda_driver_with_torch_epilogue(), h, w, None, t, up,
                                 LogitTransform(), TileConfig(tile_elems=16 * 512, max_block_n=16))
    ref = logprob_oracle(h, w, t)
    eag = eager_logprobs(h, w, t)
    assert (logp.double() - ref).abs().max() <= 1.25 * (eag.double() - ref).abs().max() + 1e-3
    want = torch.autograd.grad(ref, (h, w), up.double())
    eg = torch.autograd.grad(eag, (h, w), up)
    for a, c, e in zip((gh, gw), want, eg):
        assert a.dtype == torch.bfloat16
        assert rel_err(a, c) <= 1.25 * rel_err(e, c) + 1e-3


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x dtype"), ("targets", "targets must be"), ("stats", "m must be"),
    ("stride", "unit column stride"), ("overlap", "non-overlapping rows"),
])
def test_adapter_rejects_bad_tensors(bad, match):
    x, t = torch.randn(4, 8), torch.zeros(4, dtype=torch.long)
    m, s, tgt = torch.zeros(4), torch.zeros(4), torch.zeros(4)
    if bad == "dtype":
        x = x.double()
    elif bad == "targets":
        t = t.int()
    elif bad == "stats":
        m = torch.zeros(5)
    elif bad == "stride":
        x = torch.randn(8, 4).t()
    elif bad == "overlap":
        x = torch.randn(40).as_strided((4, 8), (3, 1))
    with pytest.raises(ValueError, match=match):
        EP.fold_tile_(x, 0, t, m, s, tgt, LogitTransform())


def test_without_extension_falls_back_to_torch_and_warns_once():
    import subprocess
    import sys
    code = (
        "import sys, warnings; sys.modules['sgdpo_fast._C'] = None\n"
        "import torch, sgdpo_fast as sf\n"
        "from sgdpo_fast.ops import backends\n"
        "h = torch.randn(5, 8, requires_grad=True); w = torch.randn(11, 8)\n"
        "t = torch.randint(0, 11, (5,))\n"
        "with warnings.catch_warnings(record=True) as rec:\n"
        "    warnings.simplefilter('always')\n"
        "    for _ in range(3):\n"
        "        sf.fused_token_logprobs(h, w, t).sum().backward()\n"
        "n = sum('C++ extension not available' in str(r.message) for r in rec)\n"
        "print('WARNINGS', n, 'AUTO', backends.resolve('auto', h.device.type))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WARNINGS 1 AUTO torch" in res.stdout, res.stdout
