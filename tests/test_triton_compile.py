"""Compile the log-prob Triton kernels for sm_90a (H100/H200) without a GPU: the real compiler
(TTIR -> TTGIR -> LLVM -> PTX -> cubin), which the CPU interpreter tests never exercise, on
the ALIGNED variants a GPU really runs: the arguments come from the launchers' own builders
on meta tensors of a realistic shape and go through Triton's binder, so the divisibility
hints are those of a real launch (``bench/kernel_report.py``).  Every config of the table
must compile without register spills, use wgmma for bf16/fp16, load with 16-byte vectors,
and its atomics (db's) must be relaxed: no fences."""
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from sgdpo_fast.kernels import logprob_configs  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--check"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=900)
    if res.returncode and "ptxas" in res.stderr.lower() and "not found" in res.stderr.lower():
        pytest.skip("this triton build ships no ptxas")
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line[len("KERNEL "):]) for line in res.stdout.splitlines()
            if line.startswith("KERNEL ")]


def test_every_config_of_the_table_is_compiled(kernels):
    compiled = {json.dumps(r["config"], sort_keys=True) for r in kernels}
    table = {json.dumps(dict(zip(logprob_configs.KernelConfig.FIELDS,
                                 [getattr(cfg, f) for f in logprob_configs.KernelConfig.FIELDS])),
                        sort_keys=True) for *_, cfg in logprob_configs.TABLE}
    assert table <= compiled, table - compiled


def test_no_spills_no_fences_wgmma_and_vector_loads(kernels):
    for r in kernels:
        name = (r["kernel"], r["label"])
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local"] == 0, (name, r)
        assert r["fences"] == 0, name
        assert r["shared"] <= 227 * 1024, name          # per-block limit on sm_90
        assert r["vector_loads"] > 0, name               # 16-byte cp.async loads
        if r["dtype"] != "fp32":
            assert r["hgmma"] > 0 and r["hmma"] == 0, name   # wgmma, not the older mma
        if r["kernel"] == "dx":
            assert r["scalar_stores"] == 0, name         # dX leaves as 16-byte vectors
            assert r["atomics"] == (1 if r["bias"] else 0), name


def test_aligned_variant_is_what_is_compiled(kernels):
    """The pointers and the row strides carry divisibility 16, as on a GPU launch; the token
    count does not (``do_not_specialize``: one binary for every batch)."""
    for r in kernels:
        assert {"h_ptr", "w_ptr", "t_ptr", "stride_hn", "stride_wv", "D"} <= set(r["aligned"]), r
        assert "N" not in r["aligned"] and "n_rows" not in r["aligned"]


def test_config_selection_and_overrides():
    sel = logprob_configs.select
    assert sel("fwd", 4096, 128256, torch.bfloat16) == logprob_configs.LARGE_HALF
    assert sel("fwd", 4096, 128256, torch.bfloat16, softcap=True) == logprob_configs.LARGE_HALF_RICH
    assert sel("dx", 4096, 128256, torch.float16, bias=True) == logprob_configs.LARGE_HALF_DX
    assert sel("dx", 576, 49152, torch.bfloat16) == logprob_configs.SMALL_HALF
    assert sel("fwd", 4096, 128256, torch.float32, metrics=True) == logprob_configs.FP32
    cfg = sel("dx", 4096, 128256, torch.bfloat16).override(block_n=64, num_stages=None)
    assert cfg.block_n == 64 and cfg.num_stages == logprob_configs.LARGE_HALF_DX.num_stages
    with pytest.raises(ValueError, match="kernel"):
        sel("bwd", 1, 1, torch.float32)
