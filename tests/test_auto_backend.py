"""``backend="auto"`` on CUDA: the choice from the shipped table of measured (else modeled)
results (``sgdpo_fast/ops/backends/auto_backend.py``), tested with fake tables; the shipped
table is what ``python -m bench.auto_table`` makes of the committed results."""
import torch

import pytest

from sgdpo_fast.ops import LogprobPlan, backends, sweep
from sgdpo_fast.ops.backends import auto_backend

ALL = ("triton", "cuda", "torch")

FAKE = {
    "version": 1,
    "measured": [
        {"gpu": "h200", "dtype": "bf16", "N": 8192, "D": 4096, "V": 128256,
         "ms": {"triton": 40.0, "cuda": 50.0, "torch": 90.0}},
        {"gpu": "h200", "dtype": "bf16", "N": 8192, "D": 4096, "V": 32000,
         "ms": {"triton": 14.0, "cuda": 11.0}},
        {"gpu": "h100", "dtype": "bf16", "N": 8192, "D": 4096, "V": 128256,
         "ms": {"triton": 70.0, "cuda": 60.0}},
    ],
    "modeled": [
        {"dtype": "bf16", "N": 8192, "D": 4096, "V": 128256, "ms": {"triton": 54.0, "cuda": 51.0}},
    ],
}


def test_measured_row_of_this_gpu_decides():
    assert auto_backend.choose("h200", "bf16", 8192, 4096, 128256, ALL, FAKE) == "triton"
    assert auto_backend.choose("h100", "bf16", 8192, 4096, 128256, ALL, FAKE) == "cuda"
    # the nearest shape class (log scale): V=40000 is nearer 32000 than 128256
    assert auto_backend.choose("h200", "bf16", 6000, 4096, 40000, ALL, FAKE) == "cuda"
    assert auto_backend.choose("h200", "bf16", 12000, 4096, 150000, ALL, FAKE) == "triton"


def test_only_usable_backends_are_chosen():
    assert auto_backend.choose("h200", "bf16", 8192, 4096, 128256, ("cuda", "torch"), FAKE) == "cuda"
    assert auto_backend.choose("h200", "bf16", 8192, 4096, 32000, ("triton", "torch"), FAKE) == "triton"
    # a row without any usable backend's time: the model decides
    assert auto_backend.choose("h200", "bf16", 8192, 4096, 32000, ("torch",), FAKE) == "torch"
    with pytest.raises(ValueError, match="no usable backend"):
        auto_backend.choose("h200", "bf16", 8192, 4096, 128256, (), FAKE)


def test_falls_back_to_the_model_then_to_the_fixed_order():
    # another GPU, or a shape beyond MAX_RATIO of every measured row: the modeled row
    name, why = auto_backend.explain("b200", "bf16", 8192, 4096, 128256, ALL, FAKE)
    assert name == "cuda" and why.startswith("modeled")
    name, why = auto_backend.explain("h200", "bf16", 512, 4096, 128256, ALL, FAKE)
    assert why.startswith("no measured or modeled row") and name == auto_backend.FALLBACK[0]
    # another dtype: no row at all
    assert auto_backend.explain("h200", "fp32", 8192, 4096, 128256, ("triton", "torch"),
                                FAKE) == ("triton", "no measured or modeled row for this shape class")
    empty = {"version": 1, "measured": [], "modeled": []}
    assert auto_backend.choose("h200", "bf16", 8192, 4096, 128256, ALL, empty) == "cuda"


def test_gpu_key():
    assert auto_backend.gpu_key("NVIDIA H200") == "h200"
    assert auto_backend.gpu_key("NVIDIA H100 80GB HBM3") == "h100"
    assert auto_backend.gpu_key("NVIDIA A100-SXM4-40GB") == "a100"


def test_shipped_table_is_up_to_date_and_decides_by_the_model():
    """The package's table is exactly what ``python -m bench.auto_table`` makes of the
    committed results (so a new GPU result cannot be committed without it), and with no GPU
    rows yet, the goal shape goes to the backend the kernel report models faster."""
    from bench import auto_table
    with open(auto_backend.TABLE_PATH) as f:
        assert f.read() == auto_table.render(auto_table.build())
    table = auto_backend.load_table()
    goal = [r for r in table["modeled"] if (r["dtype"], r["N"], r["D"], r["V"]) ==
            ("bf16", 8192, 4096, 128256)]
    assert len(goal) == 1
    faster = min(goal[0]["ms"], key=goal[0]["ms"].get)
    if not table["measured"]:
        assert auto_backend.choose("h200", "bf16", 8192, 4096, 128256, ALL) == faster
        other = next(b for b in ("triton", "cuda") if b != faster)
        assert auto_backend.choose("h200", "bf16", 8192, 4096, 128256, (other, "torch")) == other


def test_table_reads_only_gpu_benchmark_runs(tmp_path):
    """Other result folders share the name ``results.json`` (the quality study writes a list of
    runs; CPU benchmark runs have no GPU): only a GPU benchmark run's rows enter the table."""
    import json
    import os
    from bench import auto_table
    runs = {
        "quality": [{"arm": "dpo", "seed": 0}],
        "cpu": {"device": "cpu", "gpu": None, "rows": [
            {"workload": "logprob", "method": "ours_torch", "status": "ok", "dtype": "fp32",
             "shape": {"N": 8, "D": 4, "V": 16}, "time_ms_median": 1.0}]},
        "gpu": {"device": "cuda", "gpu": "NVIDIA H200", "rows": [
            {"workload": "logprob", "method": "ours_triton", "status": "ok", "dtype": "bf16",
             "shape": {"N": 8192, "D": 4096, "V": 128256}, "time_ms_median": 41.23456},
            {"workload": "logprob", "method": "ours_cuda", "status": "oom", "dtype": "bf16",
             "shape": {"N": 8192, "D": 4096, "V": 128256}, "time_ms_median": None},
            {"workload": "logprob", "method": "eager", "status": "ok", "dtype": "bf16",
             "shape": {"N": 8192, "D": 4096, "V": 128256}, "time_ms_median": 90.0}]},
    }
    for name, res in runs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    rows = auto_table.measured_rows(str(tmp_path))
    assert len(rows) == 1
    assert rows[0]["gpu"] == "h200" and rows[0]["ms"] == {"triton": 41.235}
    assert rows[0]["source"] == os.path.join("gpu", "results.json")
    assert (rows[0]["N"], rows[0]["D"], rows[0]["V"], rows[0]["dtype"]) == (8192, 4096, 128256, "bf16")


def test_auto_on_cuda_stays_auto_and_dispatches():
    """``resolve`` keeps ``auto`` for CUDA devices (the shape is not known yet); the dispatcher
    runs the chosen backend's forward and backward (here on CPU, where it falls back)."""
    assert backends.resolve("auto", "cuda") == "auto"
    assert backends.resolve("auto", "cpu") in ("cpu", "torch")
    assert backends.get("auto") is auto_backend
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(9, 8, generator=g), torch.randn(40, 8, generator=g)
    t = torch.randint(0, 40, (9,), generator=g)
    plan = LogprobPlan()
    st = auto_backend.forward(h, w, None, t, plan)
    chosen = backends.get(auto_backend._pick(h, w))
    ref = chosen.forward(h, w, None, t, plan)
    for a, c in zip(st[:3], ref[:3]):
        torch.testing.assert_close(a, c)
    lse, up = sweep.finalize(st), torch.randn(9, generator=g)
    got = auto_backend.backward(h, w, None, t, lse, up, plan, True, True, False)
    want = chosen.backward(h, w, None, t, lse, up, plan, True, True, False)
    for a, c in zip(got[:2], want[:2]):
        torch.testing.assert_close(a, c)
