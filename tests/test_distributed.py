"""torch.distributed on CPU (gloo, 2 processes spawned on 127.0.0.1): vocab-parallel
log-probs, DDP and FSDP2 against the single-process op / fp64 oracle.

One spawn per group of checks (module fixtures): the workers save what they
computed, the tests compare it here with single-process results on the same
(fresh, random, seed passed to the workers) inputs.
"""
import copy
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import sgdpo_fast as sf
from sgdpo_fast.model.sharding import gathered_lm_head, lm_head_logprobs
from sgdpo_fast.ops.vocab_parallel import (shard_lm_head, vocab_parallel_token_logprobs,
                                           vocab_shard_range)
from oracle import SEED, logprob_oracle, rel_err

WORLD = 2
# (N, D, V, bias, transform): odd V splits unevenly (12 / 11); V=3 gives a
# one-row shard; every case has ignored positions and targets on both shards.
VP_CASES = [
    (13, 9, 23, True, {"softcap": 3.0, "temperature": 0.8, "logit_scale": 1.3}),
    (17, 8, 40, False, {}),
    (6, 5, 3, True, {}),
]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank, port):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=WORLD)


def _finish():
    """End a worker whose results are saved: no rank tears gloo down while another still
    talks to it, and the process leaves without running C++ static destructors (gloo's
    threads have aborted a worker at interpreter exit: 'terminate called without an active
    exception', seen about once in twenty runs)."""
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _vp_inputs(seed, N, D, V, bias):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / D ** 0.5 * 3
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    t[torch.rand(N, generator=g) < 0.25] = -100
    t[0], t[1] = 0, V - 1  # one target on the first shard, one on the last
    logits = h @ w.t() + (0 if b is None else b)
    t[2:4] = logits[2:4].argmax(1)  # targets that are the top-1 (is_top1 across shards)
    up = torch.randn(N, generator=g)
    return h, w, b, t, up


# ----------------------------------------------------------------------------- workers

def _vp_worker(rank, port, seed, out):
    _init(rank, port)
    res = []
    for i, (N, D, V, bias, kw) in enumerate(VP_CASES):
        h, w, b, t, up = _vp_inputs(seed + i, N, D, V, bias)
        ws, bs, start = shard_lm_head(w, b)
        ws = ws.clone().requires_grad_()
        bs = None if bs is None else bs.clone().requires_grad_()
        h = h.requires_grad_()
        lp = vocab_parallel_token_logprobs(h, ws, t, vocab_start=start, bias_shard=bs,
                                           vocab_size=V, **kw)
        (lp * up).sum().backward()
        # the metrics from the same sweep, merged across the shards (max, sums, first argmax)
        _, met = sf.ops.token_logprobs(
            h.detach(), ws.detach(), t, bias=None if bs is None else bs.detach(), **kw,
            plan=sf.LogprobPlan(metrics=sf.ops.METRICS, group=dist.group.WORLD,
                                vocab_start=start))
        # targets are checked against the whole vocabulary, with no vocab_size= needed
        errors = []
        for bad in (V, -7):
            tb = t.clone()
            tb[0] = bad
            try:
                vocab_parallel_token_logprobs(h.detach(), ws.detach(), tb, vocab_start=start,
                                              bias_shard=None if bs is None else bs.detach(), **kw)
                errors.append("accepted")
            except ValueError as e:
                errors.append(str(e))
        res.append(dict(start=start, logp=lp.detach(), dH=h.grad, dW=ws.grad,
                        db=None if bs is None else bs.grad, metrics=met, errors=errors))
    torch.save(res, os.path.join(out, f"vp{rank}.pt"))
    _finish()


def _tiny_llama(seed):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _batch(seed):
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, 37, (4, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 5:] = -100
    return ids, labels


def _mean_nll(model, ids, labels, n_total):
    """Sum of -log p over this batch's labels, divided by the *global* label count."""
    out = model(ids, labels=labels, fused_lm_head=True)
    return -out.log_probs.sum() / n_total


def _ddp_worker(rank, port, seed, out):
    _init(rank, port)
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _tiny_llama(seed)
    sf.apply_fused_lm_head(model)
    ddp = DDP(model)
    ids, labels = _batch(seed)
    n_total = (labels[:, 1:] != -100).sum()
    sl = slice(rank * 2, rank * 2 + 2)
    # DDP averages gradients over ranks: scale so the average is the full-batch gradient.
    loss = _mean_nll(ddp, ids[sl], labels[sl], n_total) * WORLD
    loss.backward()
    torch.save({n: p.grad for n, p in model.named_parameters()}, os.path.join(out, f"ddp{rank}.pt"))
    _finish()


def _fsdp_worker(rank, port, seed, out):
    _init(rank, port)
    from torch.distributed.fsdp import fully_shard
    model = _tiny_llama(seed)
    sf.apply_fused_lm_head(model)
    for layer in model.model.layers:
        fully_shard(layer)
    # lm_head as its own FSDP unit: inside the root forward its weight is a DTensor
    # shard, which lm_head_logprobs makes whole with full_tensor().
    fully_shard(model.lm_head)
    fully_shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    refused = False
    try:  # a sharded DTensor weight with grad, outside FSDP's hooks: refused, not silently wrong
        lm_head_logprobs(torch.randn(2, 16), model.lm_head.weight, torch.tensor([1, 2]))
    except ValueError:
        refused = True
    ids, labels = _batch(seed)
    n_total = (labels[:, 1:] != -100).sum()
    sl = slice(rank * 2, rank * 2 + 2)
    # FSDP2 averages gradients over ranks, like DDP.
    loss = _mean_nll(model, ids[sl], labels[sl], n_total) * WORLD
    loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    opt.step()
    params = {n: p.detach().full_tensor() for n, p in model.named_parameters()}
    # gathered_lm_head on an FSDPModule: unshard / reshard around a no-grad use
    with torch.no_grad(), gathered_lm_head(model.lm_head) as (w, b):
        full_w = w.detach().clone()
        still_whole = not hasattr(model.lm_head.weight, "full_tensor")
    resharded = hasattr(model.lm_head.weight, "full_tensor")
    torch.save(dict(grads=grads, params=params, loss=loss.detach(), full_w=full_w,
                    still_whole=still_whole, resharded=resharded, refused=refused),
               os.path.join(out, f"fsdp{rank}.pt"))
    _finish()


def _zero3_worker(rank, port, seed, out):
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    import deepspeed
    from deepspeed.utils import safe_get_full_grad
    deepspeed.init_distributed(dist_backend="gloo")
    cfg = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": 0},
        "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "zero_allow_untested_optimizer": True}
    model = _tiny_llama(seed)
    sf.apply_fused_lm_head(model)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    partitioned = model.lm_head.weight.numel() == 0  # the head is really sharded away
    ids, labels = _batch(seed)
    n_total = (labels[:, 1:] != -100).sum()
    sl = slice(rank * 2, rank * 2 + 2)
    out_ = engine(ids[sl], labels=labels[sl], fused_lm_head=True)
    engine.backward(-out_.log_probs.sum() / n_total * WORLD)
    grads = {n: safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()}
    torch.save(dict(grads=grads, partitioned=partitioned), os.path.join(out, f"z3{rank}.pt"))
    _finish()


def _spawn(fn, seed, out):
    out = str(out)
    mp.spawn(fn, args=(_free_port(), seed, out), nprocs=WORLD, join=True)
    return out


@pytest.fixture(scope="module")
def seed():
    return SEED


@pytest.fixture(scope="module")
def vp_results(seed, tmp_path_factory):
    out = _spawn(_vp_worker, seed, tmp_path_factory.mktemp("vp"))
    return seed, [torch.load(os.path.join(out, f"vp{r}.pt")) for r in range(WORLD)]


# ----------------------------------------------------------------------------- tests


def test_vocab_shard_range_covers_vocab_unevenly():
    for V in (1, 2, 3, 23, 40, 49157):
        for world in (1, 2, 3, 8):
            if V < world:
                continue
            ranges = [vocab_shard_range(V, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == V
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            sizes = [e - s for s, e in ranges]
            assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ValueError, match="rank"):
        vocab_shard_range(10, 2, 2)


def test_vocab_parallel_requires_process_group():
    h, w, b, t, _ = _vp_inputs(0, 4, 3, 5, False)
    with pytest.raises(ValueError, match="process group"):
        vocab_parallel_token_logprobs(h, w, t, vocab_start=0)


@pytest.mark.parametrize("case", range(len(VP_CASES)))
def test_vocab_parallel_matches_single_process(vp_results, case):
    seed, per_rank = vp_results
    N, D, V, bias, kw = VP_CASES[case]
    h, w, b, t, up = _vp_inputs(seed + case, N, D, V, bias)
    h.requires_grad_(), w.requires_grad_()
    if b is not None:
        b.requires_grad_()
    # fp64 oracle and the single-process op on the same inputs
    ref = logprob_oracle(h, w, t, bias=b, **kw)
    (ref * up.double()).sum().backward()
    ref_grads = (h.grad.clone(), w.grad.clone(), None if b is None else b.grad.clone())
    for p in (h, w, b):
        if p is not None:
            p.grad = None
    single = sf.fused_token_logprobs(h, w, t, bias=b, backend="torch", **kw)
    (single * up).sum().backward()
    rs = [per_rank[r][case] for r in range(WORLD)]
    for r in range(WORLD):
        assert rs[r]["start"] == vocab_shard_range(V, r, WORLD)[0]
        assert rel_err(rs[r]["logp"], ref) < 1e-5
        assert torch.allclose(rs[r]["logp"], single.detach(), rtol=1e-5, atol=1e-6)
        assert (rs[r]["logp"][t == -100] == 0).all()
        assert rel_err(rs[r]["dH"], ref_grads[0]) < 1e-4          # dH all-reduced: same on every rank
        assert rel_err(rs[r]["dH"], h.grad) < 1e-5
    _, met = sf.ops.token_logprobs(h.detach(), w.detach(), t, bias=None if b is None else b.detach(),
                                   backend="torch", plan=sf.LogprobPlan(metrics=sf.ops.METRICS), **kw)
    for r in range(WORLD):
        assert [f"outside [0, {V})" in e for e in rs[r]["errors"]] == [True, True], rs[r]["errors"]
        for k, v in met.items():
            torch.testing.assert_close(rs[r]["metrics"][k], v, rtol=1e-5, atol=1e-5, msg=k)
    dW = torch.cat([rs[r]["dW"] for r in range(WORLD)])         # dW stays local to each shard
    assert dW.shape == w.shape
    assert rel_err(dW, ref_grads[1]) < 1e-4
    assert rel_err(dW, w.grad) < 1e-5
    if b is not None:
        db = torch.cat([rs[r]["db"] for r in range(WORLD)])
        assert rel_err(db, ref_grads[2]) < 1e-4


def test_ddp_gradients_equal_single_process(seed, tmp_path):
    out = _spawn(_ddp_worker, seed, tmp_path)
    g0 = torch.load(os.path.join(out, "ddp0.pt"))
    g1 = torch.load(os.path.join(out, "ddp1.pt"))
    model = _tiny_llama(seed)
    sf.apply_fused_lm_head(model)
    ids, labels = _batch(seed)
    n_total = (labels[:, 1:] != -100).sum()
    _mean_nll(model, ids, labels, n_total).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(g0[n], g1[n]), n  # all-reduced: identical on both ranks
        assert rel_err(g0[n], p.grad) < 1e-5, n


def test_fsdp2_training_step_matches_single_process(seed, tmp_path):
    out = _spawn(_fsdp_worker, seed, tmp_path)
    r0 = torch.load(os.path.join(out, "fsdp0.pt"))
    model = _tiny_llama(seed)
    init = copy.deepcopy(model.lm_head.weight.detach())
    sf.apply_fused_lm_head(model)
    ids, labels = _batch(seed)
    n_total = (labels[:, 1:] != -100).sum()
    _mean_nll(model, ids, labels, n_total).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    for n, p in model.named_parameters():
        assert rel_err(r0["grads"][n], grads[n]) < 1e-5, n
        assert rel_err(r0["params"][n], p.detach()) < 1e-6, n
    assert not torch.allclose(r0["params"]["lm_head.weight"], init)  # the step moved the head
    assert r0["still_whole"] and r0["resharded"] and r0["refused"]
    assert torch.equal(r0["full_w"], r0["params"]["lm_head.weight"])


def test_lm_head_logprobs_plain_tensors_is_the_op():
    h, w, b, t, up = _vp_inputs(3, 7, 6, 11, True)
    a = lm_head_logprobs(h, w, t, bias=b, softcap=2.0)
    e = sf.fused_token_logprobs(h, w, t, bias=b, softcap=2.0)
    assert torch.equal(a, e)
    # a head held in fp32 under a bf16 hidden: computed in bf16, gradient back in fp32
    wq = w.clone().requires_grad_()
    lp = lm_head_logprobs(h.bfloat16(), wq, t)
    lp.sum().backward()
    assert wq.grad.dtype == torch.float32
    assert rel_err(lp, logprob_oracle(h.bfloat16(), w.bfloat16(), t)) < 2e-2


def test_deepspeed_zero3_gradients_equal_single_process(seed, tmp_path):
    """Runs where DeepSpeed imports with its CPU accelerator (not in the default
    requirements: e.g. `pip install --target DIR deepspeed hjson msgpack einops`
    and PYTHONPATH=DIR); skipped otherwise."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    pytest.importorskip("deepspeed")
    out = _spawn(_zero3_worker, seed, tmp_path)
    r0 = torch.load(os.path.join(out, "z30.pt"))
    assert r0["partitioned"]
    model = _tiny_llama(seed)
    sf.apply_fused_lm_head(model)
    ids, labels = _batch(seed)
    _mean_nll(model, ids, labels, (labels[:, 1:] != -100).sum()).backward()
    for n, p in model.named_parameters():
        assert rel_err(r0["grads"][n], p.grad) < 1e-5, n
