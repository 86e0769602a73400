"""The CUDA epilogues (csrc/cuda, sgdpo_fast._C_cuda) and the ``cuda`` backend's driver.

GPU only (run by `make gpu-check`): the kernels against the torch epilogue on random
fp32/bf16/fp16 tiles, the driver against the fp64 oracle (fp32) and against eager
PyTorch's own error (bf16/fp16), the adapter's input checks, and stream ordering.
"""
import pytest
import torch

from sgdpo_fast.ops import LogprobPlan, TileConfig, native, sweep
from sgdpo_fast.ops.backends import cuda_backend, epilogue_torch
from sgdpo_fast.ops.transform import LogitTransform
from oracle import eager_logprobs, logprob_oracle, rel_err

pytestmark = pytest.mark.gpu

TFS = [LogitTransform(), LogitTransform(1.7, None, 0.6), LogitTransform(1.3, 4.0, 1.2)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
IDS = ["plain", "scaled", "softcap"]


@pytest.fixture(scope="module")
def ep():
    e = native.cuda_epilogue()
    if e is None:  # a GPU machine without the extension is a failure, not a skip
        pytest.fail("CUDA extension neither built nor JIT-compiled: " + native.why_missing())
    return e


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tf", TFS, ids=IDS)
def test_fold_kernel_matches_torch_epilogue(ep, dtype, tf):
    n, vt, v0 = 67, 3001, 5000  # vt not a multiple of the 256-thread block
    g = torch.Generator(device="cuda").manual_seed(0)
    targets = torch.randint(v0 - 300, v0 + vt + 300, (n,), device="cuda", generator=g)
    targets[:3] = -100
    state = [torch.full((n,), float("-inf"), device="cuda"), torch.zeros(n, device="cuda"),
             torch.full((n,), 7.0, device="cuda")]
    want = [t.clone() for t in state]
    for k in range(3):  # later tiles rescale a finite running max (up or down)
        x = (torch.randn(n, vt, device="cuda", generator=g) * (3 + 2 * k) + k).to(dtype)
        ep.fold_tile_(x, v0, targets, *state, tf)
        epilogue_torch.fold_tile_(x.float(), v0, targets, *want, tf)
    torch.cuda.synchronize()
    for a, b in zip(state, want):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
    outside = (targets < v0) | (targets >= v0 + vt)
    assert torch.all(state[2][outside] == 7.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tf", TFS, ids=IDS)
def test_fold_kernel_masked_vocabulary_tile(ep, dtype, tf):
    """All -inf raw logits (masked vocabulary) first: no NaN, and the same statistics as
    the finite tile alone (softcap: the masked logits are -softcap/T and fold normally)."""
    n, vt = 6, 300
    t = torch.tensor([3, 345, 350, -100, 599, 0], device="cuda")
    masked = torch.full((n, vt), float("-inf"), device="cuda").to(dtype)
    finite = (torch.randn(n, vt, device="cuda") * 2).to(dtype)
    got = [torch.full((n,), float("-inf"), device="cuda"), torch.zeros(n, device="cuda"),
           torch.zeros(n, device="cuda")]
    want = [x.clone() for x in got]
    ep.fold_tile_(masked, 0, t, *got, tf)
    ep.fold_tile_(finite, vt, t, *got, tf)
    if tf.softcap is not None:
        epilogue_torch.fold_tile_(masked.float(), 0, t, *want, tf)
    else:
        want[2][(t >= 0) & (t < vt)] = float("-inf")
    epilogue_torch.fold_tile_(finite.float(), vt, t, *want, tf)
    lse_got, lse_want = got[0] + got[1].log(), want[0] + want[1].log()
    assert not torch.isnan(lse_got).any()
    torch.testing.assert_close(lse_got, lse_want, rtol=2e-6, atol=2e-5)
    torch.testing.assert_close(got[2], want[2], rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tf", TFS, ids=IDS)
def test_grad_kernel_matches_torch_epilogue(ep, dtype, tf):
    n, vt, v0 = 45, 1029, 300
    g = torch.Generator(device="cuda").manual_seed(1)
    x = (torch.randn(n, vt, device="cuda", generator=g) * 3).to(dtype)
    targets = torch.randint(0, v0 + vt + 100, (n,), device="cuda", generator=g)
    lse = torch.logsumexp(tf.apply(x.float()), dim=1) + torch.rand(n, device="cuda", generator=g)
    up = torch.randn(n, device="cuda", generator=g)
    up[::4] = 0.0
    a, ref = x.clone(), x.float()
    ep.grad_tile_(a, v0, targets, lse, up, tf)
    epilogue_torch.grad_tile_(ref, v0, targets, lse, up, tf)
    torch.cuda.synchronize()
    tol = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-5),
           torch.float16: (2e-3, 1e-6)}[dtype]
    torch.testing.assert_close(a.float(), ref.to(dtype).float(), rtol=tol[0], atol=tol[1])
    assert torch.all(a[::4] == 0)


def test_kernels_on_strided_view_and_side_stream(ep):
    """A row stride larger than vt (views of the driver's flat buffer), launched on a
    non-default current stream: the adapter must pass PyTorch's current stream."""
    big = torch.randn(300, 700, device="cuda")
    view = big[:, 13:613]
    ref, left, right = view.clone(), big[:, :13].clone(), big[:, 613:].clone()
    t = torch.randint(0, 600, (300,), device="cuda")
    lse, up = torch.randn(300, device="cuda") + 8, torch.randn(300, device="cuda")
    tf = LogitTransform()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ep.grad_tile_(view, 0, t, lse, up, tf)
        out = view.clone()  # same stream: must see the kernel's result
    torch.cuda.current_stream().wait_stream(side)
    epilogue_torch.grad_tile_(ref, 0, t, lse, up, tf)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(big[:, :13], left) and torch.equal(big[:, 613:], right)  # outside the view


def test_adapter_rejects_bad_tensors(ep):
    x, t = torch.randn(4, 8, device="cuda"), torch.zeros(4, dtype=torch.long, device="cuda")
    m, s, tgt = (torch.zeros(4, device="cuda") for _ in range(3))
    tf = LogitTransform()
    with pytest.raises(ValueError, match="x dtype"):
        ep.fold_tile_(x.double(), 0, t, m, s, tgt, tf)
    with pytest.raises(ValueError, match="must be on cuda"):
        ep.fold_tile_(x, 0, t, m.cpu(), s, tgt, tf)
    with pytest.raises(ValueError, match="unit column stride"):
        ep.grad_tile_(x.t(), 0, t, m, s, tf)


def _inputs(N, D, V, dtype, seed=0, bias=True):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(N, D, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(V, D, device="cuda", generator=g) / D ** 0.5 * 3).to(dtype).requires_grad_()
    b = torch.randn(V, device="cuda", generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    t[torch.rand(N, device="cuda", generator=g) < 0.15] = -100
    t[:2] = torch.tensor([0, V - 1], device="cuda")
    up = torch.randn(N, device="cuda", generator=g)
    return h, w, b, t, up


def _driver(ep, h, w, b, t, up, tf, tiles):
    plan = LogprobPlan(tiles=tiles, transform=tf)
    valid = t != -100
    with torch.no_grad():
        st = cuda_backend.forward(h, w, b, t, plan, epilogue=ep)
        lse = sweep.finalize(st)
        logp = torch.where(valid, st.tgt - lse, torch.zeros_like(lse))
        grad = torch.where(valid, up, torch.zeros_like(up))
        grads = cuda_backend.backward(h, w, b, t, lse, grad, plan, True, True, b is not None,
                                      epilogue=ep)
    return logp, [x for x in grads if x is not None]


@pytest.mark.parametrize("kw", [{}, {"softcap": 3.0, "temperature": 0.7, "logit_scale": 1.9}],
                         ids=["plain", "transform"])
def test_cuda_driver_many_tiles_fp32_oracle(ep, kw):
    h, w, b, t, up = _inputs(301, 77, 2999, torch.float32)
    tf = LogitTransform(kw.get("logit_scale", 1.0), kw.get("softcap"), kw.get("temperature", 1.0))
    logp, grads = _driver(ep, h, w, b, t, up, tf,  # 5 token blocks x 5 tiles
                          TileConfig(tile_elems=64 * 700, max_block_n=64))
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    valid = t != -100
    assert torch.all(logp[~valid] == 0)
    assert ((logp.double() - ref).abs() / ref.abs().clamp_min(1e-6))[valid].max() < 1e-5
    for a, c in zip(grads, torch.autograd.grad(ref, (h, w, b), up.double())):
        assert rel_err(a, c) < 1e-4


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_cuda_driver_half_inputs_no_worse_than_eager(ep, dtype):
    h, w, _, t, up = _inputs(500, 256, 9001, dtype, seed=2, bias=False)
    logp, (gh, gw) = _driver(ep, h, w, None, t, up, LogitTransform(),
                             TileConfig(tile_elems=128 * 2048, max_block_n=128))
    ref = logprob_oracle(h, w, t)
    eag = eager_logprobs(h, w, t)
    assert logp.dtype == torch.float32
    assert (logp.double() - ref).abs().max() <= 1.25 * (eag.double() - ref).abs().max() + 1e-3
    want = torch.autograd.grad(ref, (h, w), up.double())
    eg = torch.autograd.grad(eag, (h, w), up)
    for a, c, e in zip((gh, gw), want, eg):
        assert a.dtype == dtype
        assert rel_err(a, c) <= 1.25 * rel_err(e, c) + 1e-3
