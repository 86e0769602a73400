"""The C++ CPU epilogue (sgdpo_fast._C) against the torch epilogue and the fp64 oracle."""
import pytest
import torch

import sgdpo_fast as sf
from sgdpo_fast.ops import native
from sgdpo_fast.ops.backends import cpu_backend, epilogue_torch
from sgdpo_fast.ops.transform import LogitTransform
from oracle import logprob_oracle

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
def test_cpu_backend_native_vs_oracle(monkeypatch, kw):
    monkeypatch.setattr(cpu_backend, "EPILOGUE", "native")
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


@pytest.mark.parametrize("bad,match", [
    ("dtype", "x dtype"), ("targets", "targets must be"), ("stats", "m must be"),
    ("stride", "unit column stride"),
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
        "print('WARNINGS', n, 'AUTO', backends.resolve('auto', h.device))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "WARNINGS 1 AUTO torch" in res.stdout, res.stdout
