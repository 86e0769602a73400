"""`sgdpo-fast train` / `sgpo` and the trainer over 2 processes on CPU (gloo), started the way
users start them (torchrun, accelerate launch), against one process at the same global batch.

* DDP and FSDP2, sigmoid and SGDPO: 2 ranks x batch 1 x accumulation 2 end with the weights
  of 1 process x batch 2 x accumulation 2 (<= 1e-6 in fp32, while training moves them ~1e-3).
* A 2-rank run killed and resumed ends with the uninterrupted run's weights, bit for bit:
  FSDP2's sharded checkpoints with dropout (every rank's random states), and a real SIGTERM
  to torchrun with DDP (the ranks agree on the step to save).
* An SGPO iteration under `accelerate launch` (2 ranks, sampled generation, sharded) writes
  the pairs one process writes.
* Without processes: a step's loss does not depend on how it is split (micro-batches), and
  SGDPO's pilots do not depend on the batch a pair lands in.

The launched jobs run with one thread per process; the one-process references here too, so
both sides compute with the same kernels.
"""
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from sgdpo_fast import cli
from sgdpo_fast.data.records import read_jsonl, write_jsonl
from sgdpo_fast.trainer import TrainConfig, make_objective, train
from sgdpo_fast.trainer.batches import answer_mask
from distributed_jobs import PAIRS, config
from tiny_lm import tiny_model, tiny_tokenizer

pytestmark = pytest.mark.distributed

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-6


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_DISABLE_PROGRESS_BARS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, os.path.dirname(HERE),  # bench.tiny_lm
                                                    env.get("PYTHONPATH")) if p)
    return env


def torchrun(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--master-addr", "127.0.0.1", "--master-port", _free_port(), *args]


def _run(cmd, timeout=300):
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout, cwd=HERE)
    if p.returncode != 0:  # the whole output, not an assertion repr that pytest shortens
        pytest.fail(f"exit code {p.returncode}\n--- stdout\n{p.stdout[-4000:]}\n--- stderr\n"
                    f"{p.stderr[-12000:]}", pytrace=False)
    return p


@contextlib.contextmanager
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _weights(path):
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    return load_file(path)


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """tests/distributed_jobs.py under torchrun (2 ranks): DDP / FSDP2 runs, an FSDP2 run
    killed and resumed, a one-process run resumed with two processes."""
    out = str(tmp_path_factory.mktemp("jobs"))
    one = os.path.join(out, "one-process-run")
    with one_thread():
        train(tiny_model(3), tiny_tokenizer(), PAIRS, config(loss_type="sigmoid", max_steps=1), one)
    t0 = time.perf_counter()
    _run(torchrun(os.path.join(HERE, "distributed_jobs.py"), out, one))
    print(f"distributed jobs: {time.perf_counter() - t0:.1f} s")
    return out


@pytest.fixture(scope="module")
def one_process():
    """The one-process runs at the same global batch (batch 2 x accumulation 2)."""
    cache = {}

    def get(loss_type, tmp, **kw):
        key = (loss_type, tuple(sorted(kw.items())))
        if key not in cache:
            model = tiny_model(3)
            with one_thread():
                train(model, tiny_tokenizer(), PAIRS,
                      config(loss_type=loss_type, batch_size=2, **kw), str(tmp))
            cache[key] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return cache[key]
    return get


@pytest.mark.parametrize("job,loss_type,kw", [("ddp-sgdpo", "sgdpo", {}),
                                              ("fsdp-sgdpo", "sgdpo", {}),
                                              ("fsdp-sigmoid", "sigmoid", {"max_grad_norm": None})])
def test_two_ranks_train_like_one_process(jobs, one_process, tmp_path, job, loss_type, kw):
    want = one_process(loss_type, tmp_path, **kw)
    got = _weights(os.path.join(jobs, f"{job}.safetensors"))
    moved = _max_diff(want, tiny_model(3).state_dict())
    assert moved > 1000 * TOL, moved  # training moved the weights far beyond the tolerance
    assert _max_diff(got, want) <= TOL


def test_fsdp2_killed_and_resumed_equals_uninterrupted(jobs):
    """Dropout, tied embeddings, sharded checkpoints; the newest checkpoint damaged in rank 1's
    shard: the ranks agree to fall back to the one before, and the end is bit-exact."""
    info = json.load(open(os.path.join(jobs, "fsdp-killed.json")))
    assert info["checkpoints_after_kill"] == ["step-000002", "step-000003"] and info["steps"] == 4
    # step 3's damaged shard was found, set aside, and the run went on from step 2
    assert info["after_resume"] == ["step-000003", "step-000003.damaged", "step-000004"]
    a = _weights(os.path.join(jobs, "fsdp-dropout.safetensors"))
    b = _weights(os.path.join(jobs, "fsdp-killed.safetensors"))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the sharded checkpoint: one safetensors file per rank, listed and hashed in state.json
    ckpt = os.path.join(jobs, "fsdp-killed", "checkpoints", "step-000004")
    doc = json.load(open(os.path.join(ckpt, "state.json")))
    shards = sorted(n for n in doc["files"] if n.startswith("dcp/"))
    assert shards == sorted(f"dcp/{n}" for n in os.listdir(os.path.join(ckpt, "dcp"))) and \
        len(shards) == 2
    assert doc["world_size"] == 2
    for root, _, files in os.walk(os.path.join(jobs, "fsdp-killed")):
        assert not any(f.endswith((".pt", ".pkl", ".bin", ".metadata")) for f in files), files


def test_a_run_resumes_only_with_its_number_of_processes(jobs):
    err = json.load(open(os.path.join(jobs, "world-mismatch.json")))["error"]
    assert err and "1 process(es), now 2" in err


# --------------------------------------------------------------------------- the CLI, as users run it

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    tiny_model(21).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


CLI_TRAIN = ["--loss-type", "sigmoid", "--grad-accum", "2", "--max-steps", "40", "--lr", "1e-3",
             "--save-every", "0", "--no-progress"]


@pytest.fixture(scope="module")
def cli_run(model_dir, tmp_path_factory):
    """`python -m torch.distributed.run --nproc-per-node 2 -m sgdpo_fast.cli train ...` to the end."""
    d = tmp_path_factory.mktemp("cli")
    data = str(d / "prefs.jsonl")
    write_jsonl(data, PAIRS)
    out = str(d / "two")
    _run(torchrun("-m", "sgdpo_fast.cli", "train", "--model", model_dir, "--data", data,
                  "--out", out, "--batch-size", "1", *CLI_TRAIN))
    return data, out


def test_torchrun_cli_train_equals_one_process(model_dir, cli_run, tmp_path):
    data, out = cli_run
    one = str(tmp_path / "one")
    with one_thread():
        assert cli.main(["train", "--model", model_dir, "--data", data, "--out", one,
                         "--batch-size", "2", *CLI_TRAIN]) == 0
    two_w, one_w = _weights(os.path.join(out, "final")), _weights(os.path.join(one, "final"))
    assert _max_diff(two_w, one_w) <= TOL
    assert _max_diff(one_w, tiny_model(21).state_dict()) > 1000 * TOL
    rec = json.load(open(os.path.join(out, "config.json")))
    assert rec["world_size"] == 2 and rec["global_batch"] == 4
    two_loss = [json.loads(l)["loss"] for l in open(os.path.join(out, "metrics.jsonl"))]
    one_loss = [json.loads(l)["loss"] for l in open(os.path.join(one, "metrics.jsonl"))]
    assert len(two_loss) == 40 and two_loss == pytest.approx(one_loss, rel=1e-5)


def test_sigterm_to_torchrun_saves_one_step_and_resume_is_exact(model_dir, cli_run, tmp_path):
    """A real kill: torchrun forwards SIGTERM to both ranks, they agree on the step to finish
    and save; --resume (torchrun again) ends bit-equal to the uninterrupted 2-rank run."""
    data, full = cli_run
    out = str(tmp_path / "killed")
    args = ["-m", "sgdpo_fast.cli", "train", "--model", model_dir, "--data", data, "--out", out,
            "--batch-size", "1", *CLI_TRAIN]
    proc = subprocess.Popen(torchrun(*args), env=_env(), cwd=HERE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode != 0
    assert err.count("rerun with --resume") == 2, err[-3000:]  # both ranks stopped cleanly
    done = len(open(metrics).read().splitlines())
    assert 2 <= done < 40
    assert os.listdir(os.path.join(out, "checkpoints")) == [f"step-{done:06d}"]
    _run(torchrun(*args, "--resume"))
    assert [json.loads(l)["step"] for l in open(metrics)] == list(range(1, 41))
    a, b = _weights(os.path.join(full, "final")), _weights(os.path.join(out, "final"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_accelerate_launch_sgpo_writes_the_pairs_of_one_process(model_dir, tmp_path):
    """One SGPO iteration (sampled drafts, improver SFT, answers, improvements, perplexity,
    filters, SGDPO) under `accelerate launch` on 2 ranks, against one process: the same
    generated texts and decisions, perplexities equal to float rounding."""
    data = str(tmp_path / "sft.jsonl")
    write_jsonl(data, [{"prompt": f"Q{i}: repeat {w}", "response": w} for i, w in
                       enumerate(["cat", "dog", "sun", "tree", "blue", "seven", "map", "owl",
                                  "red", "one"])])
    common = ["sgpo", "--model", model_dir, "--data", data, "--max-new-tokens", "6",
              "--gen-batch-size", "3", "--temperature", "1.0", "--keep-truncated",
              "--grad-accum", "2", "--max-steps", "2", "--improver-grad-accum", "2",
              "--improver-max-steps", "2", "--lr", "1e-3", "--improver-lr", "1e-3",
              "--no-progress"]
    two = str(tmp_path / "two")
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
          "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "--main_process_port", _free_port(), "-m", "sgdpo_fast.cli", *common, "--out", two,
          "--batch-size", "1", "--improver-batch-size", "1"])
    one = str(tmp_path / "one")
    with one_thread():
        assert cli.main([*common, "--out", one, "--batch-size", "2",
                         "--improver-batch-size", "2"]) == 0
    for name in ("drafts.jsonl", "kept.jsonl"):
        assert read_jsonl(os.path.join(two, "iter-0", name)) == \
            read_jsonl(os.path.join(one, "iter-0", name)), name
    p2, p1 = (read_jsonl(os.path.join(d, "iter-0", "pairs.jsonl")) for d in (two, one))
    assert len(p1) == 10 and sum(p["kept"] for p in p1) >= 3
    for a, b in zip(p2, p1):
        ppl_a, ppl_b = a.pop("ppl"), b.pop("ppl")
        for k in ("fence_lo", "fence_hi"):
            fa, fb = a.pop(k), b.pop(k)
            assert (fa is None and fb is None) or fa == pytest.approx(fb, rel=1e-5)
        assert a == b
        assert ppl_a == pytest.approx(ppl_b, rel=1e-5)
    s2 = json.load(open(os.path.join(two, "iter-0", "summary.json")))
    assert s2["preference"]["steps"] == 2 and s2["improver"]["steps"] == 2
    assert _max_diff(_weights(os.path.join(two, "final")), _weights(os.path.join(one, "final"))) <= TOL


# --------------------------------------------------------------------------- invariance, in one process

@pytest.mark.parametrize("loss_type,extra", [("sft", {}), ("sgdpo", {"nll_alpha": 0.7}),
                                             ("sigmoid", {"ld_alpha": 0.5})])
def test_a_step_loss_does_not_depend_on_how_it_is_split(loss_type, extra):
    """The micro-batches' shares (loss and gradient) of one step add up to the same numbers
    however the step is split: token-weighted SFT, pair-weighted preferences, the RPO NLL as a
    token mean over the whole step; SGDPO pilots drawn per pair."""
    tok = tiny_tokenizer()
    recs = PAIRS if loss_type != "sft" else [{"prompt": p["prompt"], "response": p["chosen"] * (i + 1)}
                                             for i, p in enumerate(PAIRS)]
    obj = make_objective(recs, tok, TrainConfig(loss_type=loss_type, reference="copy", **extra))
    model = tiny_model(5)
    obj.prepare(tiny_model(6), "")  # a reference other than the policy
    step, idx = 3, [4, 0, 2, 1]
    tot = obj.totals(idx)

    def run(parts):
        model.zero_grad()
        loss = sum(obj.loss(model, p, step=step, totals=tot)[0] for p in parts)
        loss.backward()
        return loss.item(), torch.cat([p.grad.reshape(-1) for p in model.parameters()])

    whole, g_whole = run([idx])
    for parts in ([[4], [0, 2, 1]], [[4, 0], [2, 1]], [[2], [1], [4], [0]]):
        split, g_split = run(parts)
        assert split == pytest.approx(whole, rel=1e-6)
        assert torch.allclose(g_split, g_whole, rtol=1e-5, atol=1e-7)
    # and a micro-batch alone (no totals) is its own mean, as before
    mean = obj.loss(model, idx, step=step)[0].item()
    assert mean == pytest.approx(whole, rel=1e-6)


def test_sgdpo_pilots_do_not_depend_on_the_batch():
    tok = tiny_tokenizer()
    obj = make_objective(PAIRS, tok, TrainConfig(loss_type="sgdpo"))

    def pilots(idx, step):
        m = answer_mask(obj.batch(idx)["labels"])
        p = obj.pilot_masks(idx, m, step)
        assert (p <= m).all()
        B = len(idx)
        return {i: (p[r][m[r]], p[B + r][m[B + r]]) for r, i in enumerate(idx)}

    alone = {i: pilots([i], 7)[i] for i in range(len(PAIRS))}
    for idx in ([3, 1, 4], [0, 2], [4, 3, 2, 1, 0]):  # other neighbours, other padding
        for i, (c, r) in pilots(idx, 7).items():
            assert torch.equal(c, alone[i][0]) and torch.equal(r, alone[i][1])
    other_step = pilots(list(range(len(PAIRS))), 8)
    assert any(not torch.equal(other_step[i][0], alone[i][0]) for i in alone)
