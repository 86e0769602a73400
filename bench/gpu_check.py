"""Python steps of ``make gpu-check`` (``bench/gpu_check.sh``).

``python -m bench.gpu_check probe OUT``     machine.json: the GPU, versions, and the two ceilings
                                            measured on it (bf16 matmul rate on random data,
                                            device copy bandwidth) plus an L2 copy estimate
``python -m bench.gpu_check summary OUT``   summary.md from OUT's results.json, machine.json and
                                            pytest_gpu.log: one table (method, time, memory, %
                                            of bf16 peak) and the goal's checks; printed too
``python -m bench.gpu_check layout OUT``    exit 1 unless OUT holds at most ``MAX_FILES`` files,
                                            at most ``MAX_DEPTH`` folders down

Everything here also runs on a CPU (the CI dry run of the script, ``GPU_CHECK_DRY_RUN=1``).
"""
from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Dict, List

MAX_FILES = 8           # what a lent device machine sends back in one piece
MAX_DEPTH = 2
GOAL_SHAPES = ((8192, 4096, 128256), (16384, 4096, 128256))
PEERS = ("cce", "liger_flce", "trl_chunked")
OURS = ("ours_triton", "ours_cuda", "ours_auto")
GOAL = dict(peer_ratio=0.8, roofline_pct=60.0, extra_mib=64.0)


def _timed(fn, reps, device):
    import torch
    if device != "cuda":
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) * 1e-3)
    return statistics.median(times)


def probe(out_dir: str) -> Dict:
    import torch
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "host": platform.node(), "cpus": os.cpu_count()}
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    info["device"] = dev
    if dev == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2 ** 30, 1))
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as exc:
            info["nvidia_smi"] = f"failed: {exc}"
    n = 8192 if dev == "cuda" else 512
    a = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=dev, dtype=torch.bfloat16)
    for _ in range(3):
        torch.mm(a, b)
    info["bf16_mm_tflops"] = round(2 * n ** 3 / _timed(lambda: torch.mm(a, b), 10, dev) / 1e12, 1)
    del a, b
    big = torch.empty(2 ** 28 if dev == "cuda" else 2 ** 22, device=dev)   # 1 GiB on a GPU
    dst = torch.empty_like(big)
    dst.copy_(big)
    t = _timed(lambda: dst.copy_(big), 10, dev)
    info["copy_tbs"] = round(2 * big.numel() * 4 / t / 1e12, 2)
    small = big[: 2 ** 22]   # 16 MiB twice: stays in a 50-60 MB L2
    sdst = dst[: 2 ** 22]
    sdst.copy_(small)
    t = _timed(lambda: [sdst.copy_(small) for _ in range(20)], 5, dev)
    info["l2_copy_tbs_estimate"] = round(20 * 2 * small.numel() * 4 / t / 1e12, 2)
    del big, dst
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "machine.json"), "w") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info))
    return info


def _pytest_line(out_dir: str) -> str:
    path = os.path.join(out_dir, "pytest_gpu.log")
    if not os.path.exists(path):
        return "not run"
    lines = [ln.strip() for ln in open(path, errors="replace").read().splitlines()
             if re.search(r"\b(passed|failed|error|skipped|no tests ran)\b", ln)]
    return lines[-1].strip("= ") if lines else "no summary line (killed by the time limit?)"


def summary(out_dir: str) -> str:
    res_path = os.path.join(out_dir, "results.json")
    machine = {}
    if os.path.exists(os.path.join(out_dir, "machine.json")):
        machine = json.load(open(os.path.join(out_dir, "machine.json")))
    rows: List[Dict] = json.load(open(res_path))["rows"] if os.path.exists(res_path) else []
    L = [f"# gpu-check summary: {machine.get('gpu') or machine.get('device', '?')}", "",
         f"torch {machine.get('torch')}, triton {machine.get('triton')}, CUDA {machine.get('cuda')}; "
         f"measured: bf16 mm {machine.get('bf16_mm_tflops')} TFLOP/s, copy "
         f"{machine.get('copy_tbs')} TB/s, L2 copy ~{machine.get('l2_copy_tbs_estimate')} TB/s", "",
         f"GPU tests: {_pytest_line(out_dir)}", "",
         "| shape | method | time ms | extra MiB | % of bf16 peak | status |",
         "|---|---|---:|---:|---:|---|"]
    for r in rows:
        if r["workload"] != "logprob":
            continue
        s = r["shape"]
        mem = r.get("mem_extra_bytes")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:60]}"
        L.append(f"| N={s['N']} D={s['D']} V={s['V']} | {r['method']} | "
                 + (f"{r['time_ms_median']:.1f}" if r.get("time_ms_median") else "") + " | "
                 + (f"{mem / 2 ** 20:.0f}" if mem is not None else "") + " | "
                 + (f"{r['roofline_pct']:.0f}%" if r.get("roofline_pct") else "") + f" | {status} |")
    L += ["", "% of bf16 peak: 8 N V D flops (forward, recompute, dH, dW) / time / the torch.mm "
          "rate measured in the same run. Extra: peak memory above inputs and gradients.", "",
          "## Goal (issue 14)", ""]
    for N, D, V in GOAL_SHAPES:
        here = {r["method"]: r for r in rows if r["workload"] == "logprob" and r["status"] == "ok"
                and (r["shape"]["N"], r["shape"]["D"], r["shape"]["V"]) == (N, D, V)}
        ours = {m: here[m] for m in OURS if m in here}
        peers = {m: here[m] for m in PEERS if m in here}
        if not ours:
            L.append(f"- N={N}: no result of ours")
            continue
        best = min(ours, key=lambda m: ours[m]["time_ms_median"])
        b = ours[best]
        line = f"- N={N}, D={D}, V={V}: fastest of ours {best} {b['time_ms_median']:.1f} ms"
        if peers:
            peer = min(peers, key=lambda m: peers[m]["time_ms_median"])
            ratio = b["time_ms_median"] / peers[peer]["time_ms_median"]
            line += (f", {ratio:.2f}x the fastest peer ({peer}, "
                     f"{peers[peer]['time_ms_median']:.1f} ms; goal <= {GOAL['peer_ratio']}: "
                     f"{'met' if ratio <= GOAL['peer_ratio'] else 'NOT met'})")
        else:
            line += ", no peer measured (install them: bench/fetch_peer_wheels.sh)"
        if b.get("roofline_pct"):
            line += (f"; {b['roofline_pct']:.0f}% of the 4-GEMM roofline (goal >= "
                     f"{GOAL['roofline_pct']:.0f}%: "
                     f"{'met' if b['roofline_pct'] >= GOAL['roofline_pct'] else 'NOT met'})")
        if b.get("mem_extra_bytes") is not None:
            mib = b["mem_extra_bytes"] / 2 ** 20
            line += (f"; {mib:.0f} MiB extra (goal <= {GOAL['extra_mib']:.0f}: "
                     f"{'met' if mib <= GOAL['extra_mib'] else 'NOT met'})")
        L.append(line)
    text = "\n".join(L) + "\n"
    with open(os.path.join(out_dir, "summary.md"), "w") as f:
        f.write(text)
    print(text)
    return text


def layout_problems(out_dir: str) -> List[str]:
    """Why OUT could not come back from a lent machine in one piece (empty: it can)."""
    files, problems = [], []
    for root, dirs, names in os.walk(out_dir):
        depth = os.path.relpath(root, out_dir).count(os.sep) + (root != out_dir)
        for n in names:
            rel = os.path.relpath(os.path.join(root, n), out_dir)
            files.append(rel)
            if depth > MAX_DEPTH:
                problems.append(f"{rel}: more than {MAX_DEPTH} folders down")
            if not re.fullmatch(r"[A-Za-z0-9._-]+", n):
                problems.append(f"{rel}: name with characters other than letters, digits, . _ -")
    if len(files) > MAX_FILES:
        problems.append(f"{len(files)} files (at most {MAX_FILES}): {sorted(files)}")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2 or argv[0] not in ("probe", "summary", "layout"):
        print(__doc__, file=sys.stderr)
        return 2
    cmd, out = argv
    if cmd == "probe":
        probe(out)
    elif cmd == "summary":
        summary(out)
    else:
        problems = layout_problems(out)
        for p in problems:
            print("gpu-check layout: " + p, file=sys.stderr)
        return 1 if problems else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
