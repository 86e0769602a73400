"""The fused op on the embedded SmolLM2 head vs eager (``python -m bench.head``, the memory
line of ``make demo``), at a small token count."""
import torch

from bench import head
from bench.smollm2 import smollm2_head


def test_embedded_head_loads():
    w, norm = smollm2_head()
    assert w.shape == (49152, 576) and norm.shape == (576,)
    assert torch.isfinite(w).all() and w.abs().mean() > 0


def test_head_bench_runs_and_matches_oracle():
    resolved, rows = head.run(N=96, reps=1, seed=3)
    assert resolved in ("cpu", "torch")
    assert [r["method"] for r in rows] == ["eager", f"ours_{resolved}"]
    for r in rows:
        assert r["err"]["logp_max_abs"] < 1e-4 and r["err"]["dH_rel"] < 1e-4
        assert r["err"]["dW_rel"] < 1e-4 and r["err"]["ignored_exact_zero"]
        assert r["time_ms_median"] > 0 and "mem_extra_bytes" in r
