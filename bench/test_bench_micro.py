"""pytest-benchmark micro cases: ``pytest bench/ --benchmark-only``.

Small shapes (fast to run on a laptop CPU), every method through the same builders the
runner uses (``bench.methods``), fwd+bwd per call.  Not collected by ``make test``
(pytest.ini's testpaths is tests/).  A method that cannot run here is skipped with its
reason; the full comparison (memory, accuracy, plots) is ``python -m bench``.
"""
from __future__ import annotations

import pytest
import torch

from bench import cases
from bench.methods import methods_for

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32
LOGPROB_SHAPES = [dict(N=512, D=256, V=8192)] if DEVICE == "cpu" else [dict(N=4096, D=4096, V=32000)]
LOSS_SHAPES = [dict(B=2, T=128, D=256, V=8192)] if DEVICE == "cpu" else [dict(B=2, T=1024, D=4096, V=32000)]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _runner(method, workload, shape):
    why = method.check(DEVICE)
    if why:
        pytest.skip(f"unavailable: {why}")
    inputs = cases.make_inputs(workload, shape, DTYPE, DEVICE)
    fn = method.build(DEVICE)
    h, w = inputs["hidden"], inputs["weight"]

    def once():
        h.grad = w.grad = None
        if workload == "logprob":
            fn(h, w, inputs["targets"]).backward(inputs["grad"])
        else:
            fn(inputs).backward()
        _sync()

    once()  # warm-up (compilation, autotuning)
    return once


@pytest.mark.parametrize("shape", LOGPROB_SHAPES, ids=cases.shape_str)
@pytest.mark.parametrize("method", methods_for("logprob"), ids=lambda m: m.name)
def test_logprob_fwd_bwd(benchmark, method, shape):
    benchmark.group = f"logprob {cases.shape_str(shape)}"
    benchmark.pedantic(_runner(method, "logprob", shape), rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("shape", LOSS_SHAPES, ids=cases.shape_str)
@pytest.mark.parametrize("method", methods_for("loss"), ids=lambda m: m.name)
def test_loss_fwd_bwd(benchmark, method, shape):
    benchmark.group = f"loss {cases.shape_str(shape)}"
    benchmark.pedantic(_runner(method, "loss", shape), rounds=5, warmup_rounds=1)
