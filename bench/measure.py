"""Timing and memory of one (method, shape) case.

* Time: median of repeated fwd+bwd steps after a warm-up; CUDA events on GPU,
  ``time.perf_counter`` on CPU.  Gradients are reset outside the timed region.
* Memory, GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``,
  minus the inputs (allocated before) and the gradients the step returns.
* Memory, CPU: peak RSS of a fresh process per case (``python -m bench.one``, see
  ``execute_isolated``) above its post-input baseline, minus the gradients.  The
  peak is reset right before the measured step (``/proc/self/clear_refs`` = 5 resets
  VmHWM), falling back to ``ru_maxrss`` (a lifetime maximum: valid only when the
  lifetime peak before the step was not above the baseline, else flagged).  glibc is
  told to return freed large blocks to the OS (MALLOC_MMAP_THRESHOLD_), so memory
  freed after the warm-up does not hide the measured step's allocations.

``execute(spec)`` runs a case in this process and returns ``(row, outputs)``; the
outputs (log-probs, gradients) feed the accuracy check done by the runner.
"""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

import torch

from . import cases, reference
from .methods import BY_NAME

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISOLATED_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}


# --------------------------------------------------------------------------- errors

def classify_error(exc: BaseException):
    """``("OOM", message)`` for out-of-memory, else ``("error", message)``."""
    text = f"{type(exc).__name__}: {exc}"
    low = text.lower()
    if isinstance(exc, MemoryError) or "out of memory" in low or "outofmemory" in low \
            or "not enough memory" in low or "can't allocate memory" in low:
        return "OOM", text.splitlines()[0][:300]
    return "error", text.strip().splitlines()[0][:300] if text.strip() else type(exc).__name__


# --------------------------------------------------------------------------- timing

def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_once(fn, device) -> float:
    """Milliseconds of one call of ``fn``."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return float(start.elapsed_time(end))
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_reps(fn, device, reps: int, budget_s: float, before=None) -> List[float]:
    """At least one and at most ``reps`` timed calls, stopping once ``budget_s`` is spent
    (after a minimum of 3 when the budget allows).  ``before`` runs untimed before each."""
    out: List[float] = []
    t_end = time.perf_counter() + budget_s
    while len(out) < reps:
        if before is not None:
            before()
        out.append(time_once(fn, device))
        if time.perf_counter() > t_end and len(out) >= min(3, reps):
            break
    return out


def gemm_rate(device: str, dtype: torch.dtype, M: int, K: int, Nv: int, reps: int = 5) -> float:
    """Measured flop/s of ``torch.mm([M, K], [K, Nv])`` in ``dtype``: the matmul roofline."""
    a = torch.randn(M, K, device=device, dtype=dtype)
    b = torch.randn(K, Nv, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    times = [time_once(lambda: torch.mm(a, b), device) for _ in range(reps)]
    return 2.0 * M * K * Nv / (statistics.median(times) * 1e-3)


# --------------------------------------------------------------------------- CPU peak RSS

def _status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    kib = _status_kib("VmRSS")
    if kib is not None:
        return kib * 1024
    import psutil
    return psutil.Process().memory_info().rss


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _malloc_trim():
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class RssPeak:
    """Peak RSS of this process during a ``with`` block, in bytes above the RSS at entry."""

    def __enter__(self):
        gc.collect()
        _malloc_trim()
        self.baseline = current_rss()
        self.method = "VmHWM" if (_reset_hwm() and _status_kib("VmHWM") is not None) else "ru_maxrss"
        self.lifetime_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self

    def __exit__(self, *exc):
        if self.method == "VmHWM":
            self.peak = _status_kib("VmHWM") * 1024
            self.exact = True
        else:  # ru_maxrss: kilobytes on Linux, a lifetime maximum
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.exact = self.lifetime_before <= self.baseline or self.peak > self.lifetime_before
        self.above = self.peak - self.baseline
        return False


# --------------------------------------------------------------------------- one case

def _spec_defaults(spec: Dict) -> Dict:
    s = dict(reps=10, budget_s=20.0, memory=True, accuracy=True, seed=0)
    s["warmup"] = 2 if spec.get("device") == "cuda" else 1  # CUDA: autotuning, lazy init
    s.update(spec)
    return s


def _make_step(workload, fn, inputs):
    h, w = inputs["hidden"], inputs["weight"]

    def zero():
        h.grad = None
        w.grad = None

    if workload == "logprob":
        t, g = inputs["targets"], inputs["grad"]

        def step():
            out = fn(h, w, t)
            out.backward(g)
            return out.detach()
    else:
        def step():
            loss = fn(inputs)
            loss.backward()
            return loss.detach()
    return step, zero


def execute(spec: Dict, memory_mode: str = "auto", inputs=None, to_cpu: bool = False):
    """Run one case in this process: warm-up, a memory-measured step, timed steps, and the
    extra run the accuracy check needs.  Returns ``(row, outputs)``; exceptions propagate.

    spec: workload, method, shape (dict), dtype (name), device, and optional reps, budget_s,
    warmup, memory, accuracy, seed, head (``cases.HEADS``).  ``memory_mode``: "cuda", "rss" or "auto" (cuda on a
    CUDA device, none on CPU: peak RSS only means something in a process that runs
    nothing else, ``execute_isolated``).  ``inputs``: the case's tensors when the caller
    made them already (same spec and seed), else they are made here.  ``to_cpu``: move
    the outputs to the CPU (to hand them to another process)."""
    spec = _spec_defaults(spec)
    workload, device = spec["workload"], spec["device"]
    method = BY_NAME[spec["method"]]
    dtype = cases.parse_dtype(spec["dtype"])
    if inputs is None:
        inputs = cases.make_inputs(workload, spec["shape"], dtype, device, spec["seed"],
                                   spec.get("head", "random"))
    fn = method.build(device)
    step, zero = _make_step(workload, fn, inputs)
    row: Dict = {}

    for _ in range(max(1, spec["warmup"])):
        zero()
        step()
    _sync(device)

    times: List[float] = []
    if spec["memory"]:
        zero()
        if memory_mode == "auto":
            memory_mode = "cuda" if device == "cuda" else "none"
        gbytes = cases.grad_bytes(inputs)
        if memory_mode == "cuda":
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            times.append(time_once(step, device))
            peak = torch.cuda.max_memory_allocated()
            row.update(mem_extra_bytes=peak - base - gbytes, mem_method="cuda.max_memory_allocated")
        elif memory_mode == "rss":
            with RssPeak() as rss:
                times.append(time_once(step, device))
            row.update(mem_extra_bytes=rss.above - gbytes, mem_method=f"peak RSS ({rss.method})")
            if not rss.exact:
                row["mem_note"] = "ru_maxrss lifetime peak was above the baseline: upper bound"
    times += time_reps(lambda: step(), device, spec["reps"] - len(times), spec["budget_s"], before=zero) \
        if spec["reps"] > len(times) else []
    row.update(time_ms_median=statistics.median(times), time_ms=[round(t, 3) for t in times])

    outputs = {}
    if spec["accuracy"]:
        # The loss may have a deterministic accuracy configuration (methods.py); the op's
        # accuracy run is the timed configuration itself.
        fn_acc = method.build(device, accuracy=True) if workload == "loss" else fn
        step_acc, _ = _make_step(workload, fn_acc, inputs)
        zero()
        res = step_acc()
        outputs = _collect_outputs(workload, fn_acc, inputs, res)
        zero()
        if to_cpu:
            outputs = {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in outputs.items()}
    return row, outputs


def _collect_outputs(workload, fn, inputs, res):
    h, w = inputs["hidden"], inputs["weight"]
    if workload == "loss":
        return {"loss": float(res), "dH": h.grad.detach(), "dW": w.grad.detach()}
    idx = reference.sample_rows(h.shape[0])
    idx_dev = idx.to(h.device)
    out = {"idx": idx, "logp": res[idx_dev], "dH": h.grad.detach()[idx_dev]}
    if len(idx) == h.shape[0]:
        out["sub_dW"] = w.grad.detach()
    else:  # dW sums over all rows: run the method again on the sampled rows only
        hs = h.detach()[idx_dev].clone().requires_grad_()
        ws = w.detach().clone().requires_grad_()
        fn(hs, ws, inputs["targets"][idx_dev]).backward(inputs["grad"][idx_dev])
        out["sub_dW"] = ws.grad.detach()
    return out


def execute_isolated(spec: Dict, timeout_s: float = 3600.0):
    """``execute`` in a fresh ``python -m bench.one`` process (peak-RSS memory on CPU, and a
    crash or an OOM kill cannot take the runner down).  Returns ``(row, outputs)`` or raises
    ``CaseFailed`` with the status ("OOM", "error") and message."""
    with tempfile.TemporaryDirectory(prefix="bench_one_") as tmp:
        spec_path, res_path = os.path.join(tmp, "spec.json"), os.path.join(tmp, "result.pt")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        env = dict(os.environ, **ISOLATED_ENV)
        env["PYTHONPATH"] = REPO_ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.run([sys.executable, "-m", "bench.one", spec_path, res_path],
                                  cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                                  timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise CaseFailed("error", f"timeout after {timeout_s:.0f} s")
        if proc.returncode != 0 or not os.path.exists(res_path):
            if proc.returncode in (-9, 137):
                raise CaseFailed("OOM", "killed by SIGKILL (out-of-memory killer?)")
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
            raise CaseFailed("error", f"bench.one exited with {proc.returncode}: {tail[0][:300]}")
        res = torch.load(res_path, weights_only=True)
    if res["status"] != "ok":
        raise CaseFailed(res["status"], res["reason"])
    return res["row"], res["outputs"]


class CaseFailed(Exception):
    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason
