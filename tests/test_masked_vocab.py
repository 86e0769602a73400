"""Masked vocabulary: whole -inf vocabulary tiles / splits (e.g. a -inf bias over padded
entries) must not turn the online log-sum-exp into NaN (exp(-inf - -inf)).

Every CPU-runnable backend is forced onto small tiles so that the masked entries cover
whole vocabulary tiles (and, for Triton, whole vocabulary splits) at the end of the
vocabulary and at its start, where the running max itself is still -inf.  Forward and
gradients are compared to the fp64 oracle; nothing may be NaN.  (A row whose whole
vocabulary is -inf has no defined log-prob and is not tested.)
"""
import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported (see test_triton_*)

import pytest  # noqa: E402

import sgdpo_fast as sf  # noqa: E402
from sgdpo_fast.ops import LogprobPlan, TileConfig, TritonConfig, backends, sweep  # noqa: E402
from sgdpo_fast.ops.transform import LogitTransform  # noqa: E402
from oracle import logp_rel_err, logprob_oracle, rel_err  # noqa: E402

N, D, V = 13, 24, 203
TILE_V = 32              # vocabulary tile of the cpu and triton backends below
K = 75                   # masked entries: more than two whole tiles of 32 at either end

# (backend, setting): for Triton the forward's target_programs, which sets the number of
# vocabulary splits: 1 -> one split sweeping all 7 tiles (masked tiles inside the in-kernel
# loop), 2 -> two splits of 4 tiles (with K at the end the second split is entirely -inf),
# default -> one tile per split (masked splits in the combine)
CONFIGS = [
    ("torch", None),
    ("cpu", None),
    ("triton", 1),
    ("triton", 2),
    ("triton", None),
]
TRANSFORMS = [{}, {"logit_scale": 1.3, "temperature": 0.7}, {"softcap": 3.0}]


def _ids(c):
    return c[0] if c[1] is None else f"{c[0]}-{c[1]}"


def _plan(backend, setting):
    """Small tiles so the masked entries cover whole vocabulary tiles (and splits)."""
    if backend == "triton":
        pytest.importorskip("triton")
        if not backends.triton_usable("cpu"):
            pytest.skip("triton needs TRITON_INTERPRET=1 on CPU")
        return LogprobPlan(triton=TritonConfig(block_n=16, block_v=TILE_V, block_d=16,
                                               target_programs=setting))
    tiles = TileConfig(tile_elems=5 * TILE_V, max_block_n=5, min_block_v=7)
    assert tiles.shape(N, V) == (5, TILE_V)
    return LogprobPlan(tiles=tiles)


def _inputs(where, seed):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = (torch.randn(V, D, generator=g) * 0.5).requires_grad_()
    b = torch.randn(V, generator=g)
    finite = torch.ones(V, dtype=torch.bool)
    if where == "last":
        finite[V - K:] = False
    else:
        finite[:K] = False
    b[~finite] = float("-inf")
    b.requires_grad_()
    ok = finite.nonzero().squeeze(1)
    t = ok[torch.randint(0, ok.numel(), (N,), generator=g)]
    t[[2, 7]] = -100
    up = torch.randn(N, generator=g)
    return h, w, b, t, up, finite


@pytest.mark.parametrize("kw", TRANSFORMS, ids=lambda k: ",".join(k) or "plain")
@pytest.mark.parametrize("where", ["last", "first"])
@pytest.mark.parametrize("config", CONFIGS, ids=_ids)
def test_masked_vocab_tiles_match_oracle(config, where, kw):
    backend, setting = config
    plan = _plan(backend, setting).replace(backend=backend)
    h, w, b, t, up, finite = _inputs(where, zlib.crc32(f"{config}{where}{kw}".encode()))
    valid = t != -100

    # the backend's own lse is finite too (it feeds the backward)
    with torch.no_grad():
        tf = LogitTransform(kw.get("logit_scale", 1.0), kw.get("softcap"), kw.get("temperature", 1.0))
        st = backends.get(backend).forward(h, w, b, t, plan.replace(transform=tf))
        lse0 = sweep.finalize(st)
    assert torch.isfinite(lse0).all() and torch.isfinite(st.tgt).all(), (st, lse0)

    lp = sf.fused_token_logprobs(h, w, t, bias=b, plan=plan, **kw)
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    assert torch.isfinite(lp).all(), lp
    assert torch.isfinite(ref).all()
    assert torch.all(lp[~valid] == 0)
    rel = logp_rel_err(lp, ref)[valid]
    assert rel.numel() > 0 and rel.max().item() < 1e-5, rel.max().item()

    gh, gw, gb = torch.autograd.grad(lp, (h, w, b), up)
    rh, rw, rb = torch.autograd.grad(ref, (h, w, b), up.double())
    for name, a in (("h", gh), ("w", gw), ("b", gb)):
        assert torch.isfinite(a).all(), (name, a)
    assert rel_err(gh, rh) < 1e-4, ("h", rel_err(gh, rh))
    assert rel_err(gw, rw) < 1e-4, ("w", rel_err(gw, rw))
    assert rel_err(gb[finite], rb[finite]) < 1e-4, ("b", rel_err(gb[finite], rb[finite]))
    assert torch.all(gh[~valid] == 0)
    if kw.get("softcap") is None:
        # masked entries have softmax 0: (almost) no gradient flows into them
        assert gw[~finite].abs().max().item() < 1e-30 and gb[~finite].abs().max().item() < 1e-30


def test_merge_skips_masked_ranges():
    """The combine of per-range partials (Triton's vocabulary splits, vocab-parallel ranks):
    a range with m = -inf, s = 0 adds nothing."""
    inf = float("inf")
    m = torch.tensor([[-inf, 1.0, 0.5], [2.0, -inf, 0.5], [-inf, -inf, 0.5]])
    s = torch.tensor([[0.0, 1.0, 1.0], [3.0, 0.0, 2.0], [0.0, 0.0, 4.0]])
    z = torch.zeros_like(m)
    got = sweep.finalize(sweep.merge_stats(sweep.TokenStats(m, s, z)))
    want = torch.stack([torch.log(torch.tensor(3.0)) + 2.0, torch.tensor(1.0),
                        torch.log(torch.tensor(7.0)) + 0.5])
    torch.testing.assert_close(got, want)
    # a row with no finite logit at all has lse = -inf (its log-prob is undefined), not NaN
    one = sweep.TokenStats(torch.full((2, 1), -inf), torch.zeros(2, 1), torch.zeros(2, 1))
    assert sweep.finalize(sweep.merge_stats(one)).item() == -inf
