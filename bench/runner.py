"""Command line of the benchmark: ``python -m bench`` (and ``sgdpo-fast bench``).

For each workload, shape and method: availability check (an unavailable method is a
row ``unavailable: <reason>``), then one case (``measure.execute``, in a fresh process
per case on CPU for the peak-RSS measurement), then its accuracy against fp64
(``reference``) and its share of the measured matmul rate.  A method that fails is a
row with its error ("OOM" for out-of-memory), never dropped.  Writes JSON, a
markdown table and PNG plots (``report``) and prints the table.
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import re
import sys
import time
from typing import Dict, List

import torch

from . import cases, measure, reference, report
from .methods import BETA, BY_NAME, methods_for

RESULTS_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_name(device: str) -> str:
    """``cpu-<model short>-<cores>c`` or the GPU's short name (``h100``)."""
    if device == "cuda":
        from sgdpo_fast.ops.backends.auto_backend import gpu_key
        return gpu_key(torch.cuda.get_device_name(0))
    model = re.sub(r"\((R|TM|tm|r)\)|CPU|Processor|@.*$|\d+-Core", " ", cpu_model())
    short = re.sub(r"[^a-z0-9]+", "-", model.lower()).strip("-") or "unknown"
    return f"cpu-{short}-{os.cpu_count()}c"


def _versions() -> Dict[str, str]:
    from importlib import metadata
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for pkg in ("triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers", "sgdpo_fast"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small subset of the shapes")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--workload", choices=("logprob", "loss", "all"), default="all")
    p.add_argument("--out", default=None, help="output folder (default bench/results/<machine>)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help=f"subset of methods (default all): {' '.join(BY_NAME)}")
    p.add_argument("--shapes", nargs="+", default=None, metavar="K=V,...",
                   help="shapes instead of the defaults, e.g. N=512,D=576,V=49152 (logprob) or "
                        "B=2,T=512,D=576,V=49152 (loss); needs a single --workload")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default fp32 on CPU, bf16 on CUDA)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions per case (default 10 GPU, 5 CPU)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repetitions per case before stopping early (default 10 GPU, 30 CPU)")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="one fresh process per case (default on CPU: needed for peak RSS)")
    p.add_argument("--no-isolate", dest="isolate", action="store_false")
    p.add_argument("--no-accuracy", action="store_true", help="skip the fp64 accuracy columns")
    p.add_argument("--vocab-sweep", nargs="*", type=int, default=None, metavar="V",
                   help="the log-prob op over vocabulary sizes (default 32000 128256 256000) at "
                        "one N and D (--sweep-n, --sweep-d; defaults: CPU N=1024 D=576, GPU "
                        "N=8192 D=4096), after any --shapes; plot logprob_vocab.png")
    p.add_argument("--sweep-n", type=int, default=None, help="tokens of the vocabulary sweep")
    p.add_argument("--sweep-d", type=int, default=None, help="hidden size of the vocabulary sweep")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--plots", choices=("all", "vocab", "none"), default="all",
                   help="which plots to write (vocab: only logprob_vocab.png)")
    p.add_argument("--machine", default=None, help="name of the results folder (default detected)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per isolated case")
    args = p.parse_args(argv)
    if args.vocab_sweep is not None:
        if args.workload == "all":
            args.workload = "logprob"
        if args.workload != "logprob":
            p.error("--vocab-sweep runs the logprob workload")
    if args.no_plots:
        args.plots = "none"
    if args.shapes and args.workload == "all":
        p.error("--shapes needs --workload logprob or --workload loss")
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def _row_base(workload, method, shape, dtype, device) -> Dict:
    return {"workload": workload, "method": method.name, "label": method.label, "shape": dict(shape),
            "tokens": cases.tokens(workload, shape), "dtype": dtype, "device": device,
            "status": "ok", "reason": ""}


def _release(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def run_shape(workload, shape, methods, args, device, dtype, log=print) -> List[Dict]:
    """Every method on one shape; returns its rows (one per method, whatever happened)."""
    dt = cases.parse_dtype(dtype)
    isolate = args.isolate if args.isolate is not None else device == "cpu"
    reps = args.reps or (10 if device == "cuda" else 5)
    budget = args.budget if args.budget is not None else (10.0 if device == "cuda" else 30.0)
    rows: List[Dict] = []

    rate = None
    n = cases.tokens(workload, shape)
    try:
        rate = measure.gemm_rate(device, dt, min(n, 8192 if device == "cuda" else 2048),
                                 shape["D"], shape["V"], reps=5 if device == "cuda" else 3)
    except Exception as exc:  # roofline column left empty, recorded
        log(f"  gemm rate failed: {measure.classify_error(exc)[1]}")
    _release(device)

    # Inputs for the accuracy reference (the same seed the case uses); in-process cases run
    # on these very tensors.
    inputs = cases.make_inputs(workload, shape, dt, device, args.seed)
    loss_ref = None
    for method in methods:
        row = _row_base(workload, method, shape, dtype, device)
        rows.append(row)
        why = method.check(device)
        if why:
            row.update(status="unavailable", reason=why)
            log(f"  {method.name:16s} unavailable: {why}")
            continue
        spec = dict(workload=workload, method=method.name, shape=dict(shape), dtype=dtype,
                    device=device, reps=reps, budget_s=budget, accuracy=not args.no_accuracy,
                    seed=args.seed)
        t0 = time.perf_counter()
        outputs = None
        try:
            if isolate:
                res, outputs = measure.execute_isolated(spec, timeout_s=args.timeout)
            else:
                res, outputs = measure.execute(spec, inputs=inputs)
            row.update(res)
        except measure.CaseFailed as exc:
            row.update(status=exc.status, reason=exc.reason)
        except Exception as exc:
            row["status"], row["reason"] = measure.classify_error(exc)
        _release(device)
        if row["status"] == "ok":
            if rate:
                row["gemm_rate_tflops"] = rate / 1e12
                row["roofline_pct"] = 100.0 * cases.gemm_flops(workload, shape) / rate \
                    / (row["time_ms_median"] * 1e-3)
            if outputs:
                try:
                    if workload == "logprob":
                        row["err"] = reference.logprob_errors(
                            inputs, outputs["idx"], outputs["logp"].to(device),
                            outputs["dH"].to(device), outputs["sub_dW"].to(device))
                    else:
                        if loss_ref is None:
                            loss_ref = reference.LossReference(inputs, BETA)
                        row["err"] = loss_ref.errors(inputs, outputs["loss"], outputs["dH"].to(device),
                                                     outputs["dW"].to(device), method.grad_scale)
                        if method.objective == "dpo" and method.grad_scale != 1.0:
                            row["err_note"] = "checked with pilot ratios 1 (pilots = whole responses)"
                except Exception as exc:
                    row["err_failed"] = measure.classify_error(exc)[1]
            mem = row.get("mem_extra_bytes")
            log(f"  {method.name:16s} {row['time_ms_median']:10.2f} ms"
                + (f"  mem {mem / 2**20:9.1f} MiB" if mem is not None else "")
                + (f"  roofline {row['roofline_pct']:5.1f}%" if "roofline_pct" in row else "")
                + f"  ({time.perf_counter() - t0:.0f} s)")
        else:
            log(f"  {method.name:16s} {row['status']}: {row['reason']}")
        del outputs
        _release(device)
    del inputs, loss_ref
    _release(device)
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    dtype = args.dtype or ("bf16" if device == "cuda" else "fp32")
    cases.parse_dtype(dtype)
    workloads = list(cases.WORKLOADS) if args.workload == "all" else [args.workload]
    unknown = [m for m in (args.methods or []) if m not in BY_NAME]
    if unknown:
        print(f"unknown method(s) {unknown}; known: {' '.join(BY_NAME)}", file=sys.stderr)
        return 2
    machine = args.machine or machine_name(device)
    out_dir = args.out or os.path.join(RESULTS_ROOT, machine)

    results = {
        "machine": machine, "device": device, "dtype": dtype, "quick": args.quick,
        "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "versions": _versions(), "argv": list(sys.argv[1:] if argv is None else argv),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [],
    }
    t_start = time.perf_counter()
    for workload in workloads:
        methods = methods_for(workload, args.methods)
        if not methods:
            continue
        shapes = [cases.parse_shape(s, workload) for s in args.shapes] if args.shapes \
            else ([] if args.vocab_sweep is not None
                  else cases.default_shapes(device, args.quick, workload))
        if args.vocab_sweep is not None:
            shapes += [s for s in cases.vocab_sweep_shapes(device, args.vocab_sweep, args.sweep_n,
                                                           args.sweep_d) if s not in shapes]
        for shape in shapes:
            print(f"[{workload}] {cases.shape_str(shape)} {dtype} on {device}", flush=True)
            results["rows"] += run_shape(workload, shape, methods, args, device, dtype,
                                         log=lambda s: print(s, flush=True))
            report.write_all(results, out_dir, plots=False)  # partial results survive a kill
    results["elapsed_s"] = round(time.perf_counter() - t_start, 1)
    paths = report.write_all(results, out_dir, plots=args.plots)
    print()
    print(report.markdown(results))
    print("wrote " + ", ".join(os.path.relpath(p) for p in paths))
    return 0
