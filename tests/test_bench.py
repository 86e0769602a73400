"""The benchmark suite (bench/): every method runs once through the runner's code path on
tiny shapes, unavailable methods are recorded with a reason, failures are rows, the
subprocess peak-RSS measurement and the fp64 references are right, and the report and
plots are written.  No timing is asserted (speed claims come from the benchmark only)."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from bench import cases, measure, methods, reference, report, runner  # noqa: E402

TINY = {"logprob": "N=45,D=24,V=397", "loss": "B=2,T=23,D=24,V=397"}
TOL = {"logprob": ("logp_max_abs", "dH_rel", "dW_rel"), "loss": ("loss_rel", "dH_rel", "dW_rel")}


def _run(workload, out, extra=()):
    argv = ["--device", "cpu", "--workload", workload, "--shapes", TINY[workload], "--out", str(out),
            "--reps", "1", "--budget", "0", "--no-isolate", *extra]
    assert runner.main(argv) == 0
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Both workloads, every method, in-process, one JSON + markdown + plots per workload."""
    out = {}
    for workload in cases.WORKLOADS:
        d = tmp_path_factory.mktemp(workload)
        out[workload] = (_run(workload, d), d)
    return out


@pytest.mark.parametrize("workload", cases.WORKLOADS)
def test_every_method_is_a_row(results, workload):
    res, _ = results[workload]
    names = [r["method"] for r in res["rows"]]
    assert names == [m.name for m in methods.methods_for(workload)]
    for row in res["rows"]:
        assert row["status"] in ("ok", "unavailable"), (row["method"], row["status"], row["reason"])
        if row["status"] == "unavailable":
            assert row["reason"].strip(), row["method"]
        else:  # a method whose check passes must run, time and be accurate (fp32)
            assert math.isfinite(row["time_ms_median"]) and row["time_ms_median"] > 0
            assert "err_failed" not in row, row
            for key in TOL[workload]:
                assert row["err"][key] < 1e-4, (row["method"], key, row["err"])
            if workload == "logprob":
                assert row["err"]["ignored_exact_zero"], row["method"]


def test_expected_availability_on_cpu(results):
    """Peers that install on CPU and run there are measured; GPU-only ones are recorded."""
    by = {r["method"]: r for w in cases.WORKLOADS for r in results[w][0]["rows"]}
    for name in ("eager", "ours_torch", "ours_cpu", "eager_dpo", "eager_sgdpo"):
        assert by[name]["status"] == "ok", by[name]
    for name in ("ours_triton", "ours_cuda"):
        assert by[name]["status"] == "unavailable" and "CUDA" in by[name]["reason"]
    for name, module in (("trl_chunked", "trl.kernels"), ("cce", "cut_cross_entropy"),
                         ("liger_dpo", "liger_kernel.chunked_loss"),
                         ("ours_dpo", "sgdpo_fast.losses"), ("ours_sgdpo", "sgdpo_fast.losses")):
        try:
            __import__(module)
        except Exception:
            assert by[name]["status"] == "unavailable"
        else:
            assert by[name]["status"] == "ok", by[name]
    assert by["liger_flce"]["status"] in ("ok", "unavailable")


def test_report_files(results):
    for workload in cases.WORKLOADS:
        res, d = results[workload]
        files = set(os.listdir(d))
        assert {"results.json", "results.md", f"{workload}_time.png"} <= files, files
        md = open(os.path.join(d, "results.md")).read()
        for row in res["rows"]:
            assert f"| {row['method']} |" in md
            if row["status"] == "unavailable":
                assert "unavailable: " in md
        with open(os.path.join(d, f"{workload}_time.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_isolated_case_measures_peak_rss():
    """The subprocess path (python -m bench.one): eager materializes [N, V] fp32 logits,
    log-softmax and their gradient, so its extra peak is at least the logits' size."""
    shape = dict(N=256, D=32, V=8192)
    spec = dict(workload="logprob", method="eager", shape=shape, dtype="fp32", device="cpu",
                reps=1, budget_s=0, accuracy=True)
    row, outputs = measure.execute_isolated(spec, timeout_s=120)
    logits = shape["N"] * shape["V"] * 4
    assert row["mem_method"].startswith("peak RSS")
    assert logits <= row["mem_extra_bytes"] < 12 * logits, row
    assert outputs["sub_dW"].shape == (shape["V"], shape["D"])


def test_rss_peak_sees_a_freed_allocation():
    n = 48 * 2 ** 20
    with measure.RssPeak() as rss:
        x = torch.ones(n // 4)
        del x
    assert 0.9 * n <= rss.above < 1.5 * n + 16 * 2 ** 20, rss.above


def test_failures_are_rows_not_dropped(monkeypatch, tmp_path):
    def boom(device, accuracy=False):
        def fn(hidden, weight, targets):
            raise RuntimeError("CUDA out of memory. Tried to allocate 1 GiB")
        return fn

    def broken(device, accuracy=False):
        raise ValueError("kaputt")

    extra = [methods.Method("fake_oom", "logprob", "fake", lambda d: None, boom),
             methods.Method("fake_err", "logprob", "fake", lambda d: None, broken),
             methods.Method("fake_na", "logprob", "fake", lambda d: "not on this machine", broken)]
    monkeypatch.setattr(methods, "METHODS", methods.METHODS + extra)
    for m in extra:
        monkeypatch.setitem(methods.BY_NAME, m.name, m)
    res = _run("logprob", tmp_path, ["--methods", "eager", "fake_oom", "fake_err", "fake_na"])
    by = {r["method"]: r for r in res["rows"]}
    assert by["eager"]["status"] == "ok"
    assert by["fake_oom"]["status"] == "OOM"
    assert by["fake_err"]["status"] == "error" and "kaputt" in by["fake_err"]["reason"]
    assert by["fake_na"] == {**by["fake_na"], "status": "unavailable", "reason": "not on this machine"}
    md = report.markdown(res)
    assert "| OOM |" in md and "error: ValueError: kaputt" in md


def test_reference_chunking_matches_plain_fp64(monkeypatch):
    """The chunked fp64 reference (odd chunk sizes) equals plain fp64 autograd."""
    monkeypatch.setattr(reference, "ROW_CHUNK", 7)
    monkeypatch.setattr(reference, "VOCAB_CHUNK", 13)
    inp = cases.make_logprob_inputs(dict(N=30, D=9, V=50), seed=3)
    h = inp["hidden"].detach().double().requires_grad_()
    w = inp["weight"].detach().double().requires_grad_()
    t, g = inp["targets"], inp["grad"].double()
    valid = t != cases.IGNORE_INDEX
    lp = torch.log_softmax(h @ w.t(), -1).gather(1, t.clamp(min=0)[:, None]).squeeze(1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    lp.backward(g)
    ref, lse = reference.logprob64(inp["hidden"].detach(), inp["weight"].detach(), t)
    dH, num2, den2 = reference.backward64(inp["hidden"].detach(), inp["weight"].detach(), t, lse, g,
                                          dW_cmp=w.grad)
    torch.testing.assert_close(ref, lp.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dH, h.grad, rtol=1e-12, atol=1e-12)
    assert num2.sqrt() / den2.sqrt() < 1e-12
    # and a wrong dW is seen as wrong
    _, num2, den2 = reference.backward64(inp["hidden"].detach(), inp["weight"].detach(), t, lse, g,
                                         dW_cmp=w.grad * 1.01)
    assert abs(num2.sqrt() / den2.sqrt() - 0.01) < 1e-9


def test_pilot_draw_follows_design():
    t = cases.make_loss_inputs(dict(B=3, T=40, D=4, V=11), seed=2)["targets"]
    mask = t != cases.IGNORE_INDEX
    gen = torch.Generator().manual_seed(0)
    pil = methods.draw_pilot_masks(mask, 0.6, 0.9, gen)
    B = 3
    lens = mask.sum(-1)
    m = torch.minimum(lens[:B], lens[B:])
    assert not (pil & ~mask).any()
    assert torch.equal(pil.sum(-1)[:B], torch.clamp((0.6 * m).floor(), min=1).long())
    assert torch.equal(pil.sum(-1)[B:], torch.clamp((0.9 * m).floor(), min=1).long())


def test_shapes_and_names():
    assert cases.parse_shape("n=8,D=4,V=16", "logprob") == {"N": 8, "D": 4, "V": 16}
    for bad in ("N=8,D=4", "N=8,D=4,V=x", "N=0,D=4,V=16", "N8"):
        with pytest.raises(ValueError):
            cases.parse_shape(bad, "logprob")
    name = runner.machine_name("cpu")
    assert name.startswith("cpu-") and name.endswith(f"-{os.cpu_count()}c")
    assert measure.classify_error(MemoryError())[0] == "OOM"
    assert measure.classify_error(RuntimeError("boom"))[0] == "error"
    inp = cases.make_logprob_inputs(dict(N=4000, D=4, V=10))
    frac = (inp["targets"] == cases.IGNORE_INDEX).float().mean().item()
    assert 0.03 < frac < 0.07


@pytest.mark.gpu
@pytest.mark.parametrize("workload", cases.WORKLOADS)
def test_runner_on_cuda(tmp_path, workload):
    """The GPU path of the runner (in-process cases, CUDA events, max_memory_allocated, fp64
    references on the device) on tiny bf16 shapes; every method is a row."""
    shape = {"logprob": "N=301,D=64,V=1999", "loss": "B=2,T=37,D=64,V=1999"}[workload]
    assert runner.main(["--device", "cuda", "--workload", workload, "--shapes", shape,
                        "--out", str(tmp_path), "--reps", "2", "--budget", "0"]) == 0
    with open(os.path.join(tmp_path, "results.json")) as f:
        res = json.load(f)
    assert [r["method"] for r in res["rows"]] == [m.name for m in methods.methods_for(workload)]
    for row in res["rows"]:
        assert row["status"] in ("ok", "unavailable"), row
        if row["status"] != "ok":
            continue
        assert row["mem_method"] == "cuda.max_memory_allocated" and row["mem_extra_bytes"] >= 0, row
        assert row["time_ms_median"] > 0 and "err_failed" not in row, row
        if row["method"].startswith(("eager", "ours")):  # bf16 inputs, fp32 statistics
            assert row["err"]["dH_rel"] < 2e-2 and row["err"]["dW_rel"] < 2e-2, row
    assert {"eager", "eager_dpo"} & {r["method"] for r in res["rows"] if r["status"] == "ok"}
