"""The backward driver (``sgdpo_fast/ops/sweep.py``): one recompute of each logit tile feeds
dH and dW; where the fp32 sums of bf16/fp16 gradients live (dH's own buffer, the scratch,
the tail of dW's buffer) and the in-place compaction; and an allocation trace showing that a
tile allocates nothing (the ``cuda`` path's op sequence, on CPU fp32 and on meta bf16)."""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from sgdpo_fast.ops import LogprobPlan, TileConfig, sweep
from sgdpo_fast.ops.backends import cuda_backend, epilogue_torch
from sgdpo_fast.ops.transform import LogitTransform
from oracle import eager_logprobs, logprob_oracle, rel_err


def _problem(N, D, V, dtype, seed, bias=False):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).to(dtype)
    w = (torch.randn(V, D, generator=g) / D ** 0.5 * 2).to(dtype)
    b = torch.randn(V, generator=g).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    return h, w, b, t, up


def _stats(h, w, b, t, tf=LogitTransform()):
    with torch.no_grad():
        st = sweep.forward_stats(h, w, b, t, tf, epilogue_torch, TileConfig())
    return sweep.finalize(st)


def _run(h, w, b, t, up, block_n, block_v, scratch_bytes, needs=(True, True, False)):
    lse = _stats(h, w, b, t)
    producer = sweep.EpilogueTiles(epilogue_torch, LogitTransform(), h.dtype, h.device, block_n,
                                   block_v, needs[2] and b is not None)
    return sweep.backward(h, w, b, t, lse, up, producer, block_n, block_v, scratch_bytes, *needs)


def _reference_grads(h, w, b, t, up):
    ins = [x.detach().requires_grad_() for x in (h, w) + ((b,) if b is not None else ())]
    ref = logprob_oracle(*ins[:2], t, bias=ins[2] if b is not None else None)
    eag = eager_logprobs(*ins[:2], t, bias=ins[2] if b is not None else None)
    return (torch.autograd.grad(ref, ins, up.double()), torch.autograd.grad(eag, ins, up))


def test_accumulators_regions_and_tail():
    """bf16 n=13, D=40: 6 fp32 rows fit in dH's own buffer, 2 in a 320-byte scratch, the other
    5 go to the end of dW's buffer (V=50: 4000 bytes, 800 of them borrowed, aligned to 256)."""
    n, D, V = 13, 40, 50
    dH = torch.empty(n, D, dtype=torch.bfloat16)
    dW = torch.empty(V, D, dtype=torch.bfloat16)
    scratch = torch.empty(2 * D)
    accs, stop, tail = sweep._dh_accumulators(dH, 0, D, scratch, dW=dW, cover_all=True)
    assert stop == n
    assert [(a.r0, a.r1, a.in_place) for a in accs] == [(0, 6, True), (6, 8, False), (8, 13, False)]
    off = (V * D * 2 - 5 * D * 4) // 256 * 256            # 3072: bytes before the borrowed part
    assert tail == off // (2 * D)                         # vocabulary rows [38, 50) wait for dH
    assert accs[2].view.data_ptr() == dW.data_ptr() + off
    assert accs[0].view.data_ptr() == dH.data_ptr()
    # too small a dW for the rest: a fresh buffer (beyond the budget), no tail
    accs, stop, tail = sweep._dh_accumulators(dH, 0, D, None, dW=dW[:4], cover_all=True)
    assert stop == n and tail == 4 and accs[-1].view.shape == (7, D)
    # a later row chunk starts its in-place part on an aligned byte
    accs, stop, _ = sweep._dh_accumulators(dH, 5, D, None)
    assert accs[0].r0 == 5 and (accs[0].view.data_ptr() - dH.data_ptr()) % 256 == 0


@pytest.mark.parametrize("n,D,start", [(13, 40, 0), (9, 7, 0), (100, 24, 3), (200, 3, 5)])
def test_in_place_compaction_is_exact(n, D, start):
    """fp32 sums stored in dH's own buffer round into dH exactly as ``.to(bfloat16)`` would,
    also for row starts whose fp32 part begins past the half row (alignment)."""
    dH = torch.full((n, D), 7.0, dtype=torch.bfloat16)
    before = dH[:start].clone()
    scratch = torch.empty(n * D)
    accs, stop, _ = sweep._dh_accumulators(dH, start, D, scratch)
    assert stop == n and accs[0].in_place
    want = torch.randn(n, D) * 100
    for a in accs:
        a.view.copy_(want[a.r0:a.r1])
    sweep._finish_dh(dH, accs)
    assert torch.equal(dH[start:], want[start:].bfloat16())
    assert torch.equal(dH[:start], before)


@pytest.mark.parametrize("case", ["all-in-own-buffer", "scratch+tail", "no-room-for-tail",
                                  "rows-outer", "fp32"])
def test_driver_placements_match_oracle(case):
    """Every placement of dH's fp32 sums gives the oracle's gradients (within eager's own
    error for bf16, 1e-4 for fp32), with several row blocks and vocabulary blocks."""
    dtype = torch.float32 if case == "fp32" else torch.bfloat16
    N, D, V = 37, 24, 300
    h, w, b, t, up = _problem(N, D, V, dtype, seed=hash(case) % 1000, bias=True)
    needs = (True, case != "rows-outer", True)
    scratch = {"all-in-own-buffer": 1 << 20, "scratch+tail": 3 * 4 * D,
               "no-room-for-tail": 4 * D, "rows-outer": 2 * 4 * D, "fp32": 1}[case]
    w_run = w[:8] if case == "no-room-for-tail" else w
    t_run = t % w_run.shape[0]
    b_run = b[: w_run.shape[0]]
    dH, dW, db = _run(h, w_run, b_run, t_run, up, 8, 64, scratch, needs)
    (rh, rw, rb), (eh, ew, eb) = _reference_grads(h, w_run, b_run, t_run, up)
    pairs = [(dH, rh, eh), (db, rb, eb)] + ([(dW, rw, ew)] if needs[1] else [])
    for got, want, eager in pairs:
        assert got.dtype == dtype
        if dtype == torch.float32:
            assert rel_err(got, want) < 1e-4
        else:
            assert rel_err(got, want) <= 1.25 * rel_err(eager, want) + 1e-3
    if not needs[1]:
        assert dW is None


def test_tail_recompute_equals_scratch_run():
    """Borrowing dW's tail changes where dH's sum lives and re-runs the tail's tiles; the
    gradients equal a run with enough scratch (fp32 sums of the same bf16 tiles: equal up to
    one bf16 rounding step)."""
    N, D, V = 40, 32, 260
    h, w, b, t, up = _problem(N, D, V, torch.bfloat16, seed=5)
    big = _run(h, w, None, t, up, 16, 64, 1 << 20)
    small = _run(h, w, None, t, up, 16, 64, 4 * D)
    for a, c in zip(big[:2], small[:2]):
        ulp = c.float().abs() * 2.0 ** -7 + 1e-30
        assert ((a.float() - c.float()).abs() <= ulp).all()


# ----------------------------------------------------------------------------- allocations

class AllocationTrace(TorchDispatchMode):
    """Counts, per aten op, the tensors an op returns in a storage none of its inputs has
    (a new allocation).  ``paused`` excludes a region (the reference epilogue's own math)."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.paused:
            ins = {x.untyped_storage()._cdata for x in tree_leaves((args, kwargs))
                   if isinstance(x, torch.Tensor)}
            for o in tree_leaves(out):
                if isinstance(o, torch.Tensor) and o.untyped_storage()._cdata not in ins:
                    self.counts[str(func.overloadpacket)] += 1
        return out


class _PausedEpilogue:
    """The torch epilogue (or, on meta tensors, an in-place stand-in) with the trace paused:
    the test is about the driver, not the reference epilogue's temporaries."""

    def __init__(self, trace, meta):
        self.trace, self.meta = trace, meta

    def grad_tile_(self, x, v0, targets, lse, g, tf):
        self.trace.paused = True
        try:
            if self.meta:
                x.mul_(-1.0)
            else:
                epilogue_torch.grad_tile_(x, v0, targets, lse, g, tf)
        finally:
            self.trace.paused = False


def _trace_backward(device, dtype, tiles, N=48, D=16, V=96):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, D, generator=g).to(dtype).to(device)
    w = torch.randn(V, D, generator=g).to(dtype).to(device)
    b = torch.randn(V, generator=g).to(dtype).to(device)
    t = torch.randint(0, V, (N,), generator=g).to(device)
    lse = torch.randn(N, generator=g).to(device) + 5
    up = torch.randn(N, generator=g).to(device)
    plan = LogprobPlan(tiles=tiles)
    with AllocationTrace() as trace:
        out = cuda_backend.backward(h, w, b, t, lse, up, plan, True, True, True,
                                    epilogue=_PausedEpilogue(trace, device == "meta"))
    return trace.counts, out


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float32), ("meta", torch.bfloat16)],
                         ids=["cpu-fp32", "meta-bf16"])
def test_cuda_path_backward_allocates_nothing_per_tile(device, dtype):
    """The ``cuda`` backend's backward (the tiled driver) on 2 tiles and on 24 tiles makes
    exactly the same allocations: outputs, buffers and accumulators, once.  bf16 runs on meta
    tensors, whose GEMMs take ``out_dtype`` as cuBLAS does (CPU GEMMs do not), so the op
    sequence is the CUDA one: fp32 tile from the GEMM, epilogue in place, one copy into the
    half buffer, ``addmm(out_dtype=fp32, out=acc)`` and ``mm(out=dW[chunk])``."""
    assert sweep._mm_out_dtype_works("meta")
    few, _ = _trace_backward(device, dtype, TileConfig(tile_elems=24 * 48, max_block_n=24,
                                                       min_block_v=48, scratch_bytes=1 << 16))
    many, _ = _trace_backward(device, dtype, TileConfig(tile_elems=8 * 16, max_block_n=8,
                                                        min_block_v=16, scratch_bytes=1 << 16))
    assert few == many, (few, many)
    assert sum(few.values()) <= 12, few   # dH, dW, db (+ cast), tile buffers, scratch, colsum
