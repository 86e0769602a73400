"""One answer on every backend for edge inputs (issue 11, item 10).

The answer (docs/kernels.md, "Numerics at the edges"):

* non-finite inputs propagate as IEEE arithmetic on fp32 logits does, exactly as the fp64
  oracle's materialized log-softmax and its autograd: a row with a NaN logit has a NaN
  log-prob; a row with a +inf logit has ``z_t - lse = z_t - inf`` (NaN, or -inf when its target
  logit is -inf); its dH row is NaN, and dW carries NaN wherever that row touches it;
* finite, correct results wherever the math is finite: other rows are untouched, fp16 inputs
  whose logits exceed fp16's range (65504) give the oracle's values (the logits are fp32), a
  zero upstream gradient gives an exactly zero dH row;
* masked vocabularies (-inf logits) are tests/test_masked_vocab.py's.

Checked on every CPU-runnable backend (``torch``, ``cpu``, ``triton`` under the interpreter)
and, GPU-marked, on ``cuda``, ``triton`` and ``torch`` on a GPU (``make gpu-check``).
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (see conftest.py)

import pytest  # noqa: E402

import sgdpo_fast as sf  # noqa: E402
from sgdpo_fast.ops import LogprobPlan, TileConfig, TritonConfig, backends  # noqa: E402
from oracle import eager_logprobs, logprob_oracle, rel_err  # noqa: E402

CPU_BACKENDS = ["torch", "cpu", "triton"]


def _plan(backend, device):
    if backend == "triton":
        pytest.importorskip("triton")
        if not backends.triton_usable(device):
            pytest.skip("triton needs a GPU or TRITON_INTERPRET=1")
        small = TritonConfig(block_n=16, block_v=32, block_d=16) if device == "cpu" else TritonConfig()
        return LogprobPlan(backend="triton", triton=small)
    # several row blocks and vocabulary tiles, so the bad row shares a tile with good ones
    return LogprobPlan(backend=backend, tiles=TileConfig(tile_elems=8 * 64, max_block_n=8,
                                                         min_block_v=16))


def _problem(device, dtype=torch.float32, N=23, D=16, V=150, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, D, generator=g) * scale).to(dtype)
    w = (torch.randn(V, D, generator=g) * scale / D ** 0.5).to(dtype)
    t = torch.randint(0, V, (N,), generator=g)
    t[[5, 17]] = -100
    up = torch.randn(N, generator=g)
    return [x.to(device) for x in (h, w, t, up)]


def _run(backend, device, h, w, t, up):
    plan = _plan(backend, device)
    h, w = h.clone().requires_grad_(), w.clone().requires_grad_()
    lp = sf.fused_token_logprobs(h, w, t, plan=plan)
    gh, gw = torch.autograd.grad(lp, (h, w), up)
    return lp.detach(), gh, gw


def _oracle(h, w, t, up):
    h, w = h.double().requires_grad_(), w.double().requires_grad_()
    ref = logprob_oracle(h, w, t)
    gh, gw = torch.autograd.grad(ref, (h, w), up.double())
    return ref.detach(), gh, gw


def _check_non_finite_row(backend, device, bad, zero_grad=False):
    """``zero_grad``: the bad row's upstream gradient is 0; IEEE 0 * NaN is NaN, so its
    gradient is still NaN (the native epilogues' shortcut for g = 0 applies only to rows whose
    logits are all finite)."""
    h, w, t, up = _problem(device)
    k = 3
    assert t[k] != -100
    h[k, 2] = bad
    if zero_grad:
        up[k] = 0.0
    lp, gh, gw = _run(backend, device, h, w, t, up)
    ref, rh, rw = _oracle(h, w, t, up)
    assert not torch.isfinite(lp[k]) and not torch.isfinite(ref[k])
    # the same IEEE answer as the oracle, NaN positions and infinities included
    torch.testing.assert_close(lp.double(), ref, rtol=1e-5, atol=1e-5, equal_nan=True)
    assert torch.isnan(gh[k]).all()
    torch.testing.assert_close(gh.double(), rh, rtol=1e-4, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-5, equal_nan=True)
    others = torch.ones_like(t, dtype=torch.bool)
    others[k] = False
    assert torch.isfinite(lp[others]).all() and torch.isfinite(gh[others]).all()


def _check_fp16_beyond_range(backend, device):
    """fp16 inputs whose logits reach ~3e5: fp32 logits, so the oracle's values (eager fp16
    materializes the logits in fp16 and overflows)."""
    h, w, t, up = _problem(device, torch.float16, scale=200.0, seed=4)
    with torch.no_grad():
        z = h.double() @ w.double().t()
    assert z.abs().max() > 65504
    assert not torch.isfinite(eager_logprobs(h, w, t)).all()
    lp, gh, gw = _run(backend, device, h, w, t, up)
    ref, rh, rw = _oracle(h, w, t, up)
    valid = t != -100
    assert torch.isfinite(lp).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    lse_scale = z.abs().max(dim=1).values[valid]
    assert ((lp.double() - ref)[valid].abs() / lse_scale).max() < 1e-6
    assert gh.dtype == torch.float16 and rel_err(gh, rh) < 2e-3 and rel_err(gw, rw) < 2e-3


def _check_zero_upstream_gradient(backend, device):
    h, w, t, up = _problem(device, seed=7)
    up[4] = 0.0
    _, gh, gw = _run(backend, device, h, w, t, up)
    assert torch.all(gh[4] == 0)
    ref, rh, rw = _oracle(h, w, t, up)
    assert rel_err(gh, rh) < 1e-4 and rel_err(gw, rw) < 1e-4


@pytest.mark.parametrize("zero_grad", [False, True], ids=["g", "g=0"])
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")],
                         ids=["+inf", "-inf", "nan"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_non_finite_hidden_at_a_valid_row(backend, bad, zero_grad):
    _check_non_finite_row(backend, "cpu", bad, zero_grad)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp16_logits_beyond_fp16_range(backend):
    _check_fp16_beyond_range(backend, "cpu")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_zero_upstream_gradient_gives_zero_row(backend):
    _check_zero_upstream_gradient(backend, "cpu")


GPU_BACKENDS = ["cuda", "triton", "torch"]


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_edge_inputs(backend):
    if backend == "cuda":
        from sgdpo_fast.ops import native
        if native.cuda_epilogue() is None:
            pytest.fail("CUDA extension missing on a GPU machine: " + native.why_missing())
    for bad in (float("inf"), float("-inf"), float("nan")):
        for zero_grad in (False, True):
            _check_non_finite_row(backend, "cuda", bad, zero_grad)
    _check_fp16_beyond_range(backend, "cuda")
    _check_zero_upstream_gradient(backend, "cuda")
