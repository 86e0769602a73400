"""Benchmark output: ``results.json``, ``results.md`` (markdown tables) and PNG plots
(time and extra memory against the token count, one line per method, one panel per
head shape; and, for a vocabulary sweep, against the vocabulary size: ``logprob_vocab.png``)
in the results folder."""
from __future__ import annotations

import json
import os
from collections import OrderedDict
from typing import Dict, List

from .cases import shape_str

TABLE_COLUMNS = {
    "logprob": ("logp max abs err", "dH rel err", "dW rel err"),
    "loss": ("loss rel err", "dH rel err", "dW rel err"),
}
_ERR_KEYS = {"logprob": ("logp_max_abs", "dH_rel", "dW_rel"), "loss": ("loss_rel", "dH_rel", "dW_rel")}


def _fmt(x, spec):
    return "" if x is None else format(x, spec)


def _status_text(row) -> str:
    if row["status"] == "ok":
        return "ok"
    if row["status"] == "unavailable":
        return f"unavailable: {row['reason']}"
    if row["status"] == "OOM":
        return "OOM"
    return f"error: {row['reason']}"


def _md_escape(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


def markdown(results: Dict) -> str:
    """One table per workload: shape, method, time, speed-up against eager, extra memory,
    % of the matmul rate, errors against fp64, status."""
    lines = [f"Machine `{results['machine']}` ({results.get('gpu') or results.get('cpu')}, "
             f"{results.get('cpu_count')} CPUs), device {results['device']}, {results['dtype']}, "
             f"torch {results['versions'].get('torch')}" + (" — quick subset" if results.get("quick") else "")]
    for workload in ("logprob", "loss"):
        rows = [r for r in results["rows"] if r["workload"] == workload]
        if not rows:
            continue
        title = {"logprob": "Log-prob op, forward + backward",
                 "loss": "DPO / SGDPO loss, forward + backward incl. reference forward"}[workload]
        lines += ["", f"### {title}", "",
                  "| shape | method | time (ms) | vs eager | extra memory (MiB) | % matmul rate | "
                  + " | ".join(TABLE_COLUMNS[workload]) + " | status |",
                  "|---|---|---:|---:|---:|---:|" + "---:|" * len(TABLE_COLUMNS[workload]) + "---|"]
        eager_name = "eager" if workload == "logprob" else "eager_dpo"
        eager_t = {shape_str(r["shape"]): r.get("time_ms_median") for r in rows
                   if r["method"] == eager_name and r["status"] == "ok"}
        for r in rows:
            key = shape_str(r["shape"])
            t = r.get("time_ms_median")
            speed = (eager_t[key] / t) if (t and eager_t.get(key)) else None
            mem = r.get("mem_extra_bytes")
            err = r.get("err") or {}
            errs = [_fmt(err.get(k), ".1e") for k in _ERR_KEYS[workload]]
            lines.append("| " + " | ".join([
                key, r["method"], _fmt(t, ".1f"), (f"{speed:.2f}x" if speed else ""),
                _fmt(None if mem is None else mem / 2 ** 20, ".1f"), _fmt(r.get("roofline_pct"), ".1f"),
                *errs, _md_escape(_status_text(r))]) + " |")
    lines += ["", "Time: median of the timed repetitions after a warm-up (CUDA events on GPU). "
              "Extra memory: peak above the inputs and the returned gradients (GPU: "
              "max_memory_allocated; CPU: peak resident set, i.e. touched pages, of a fresh process "
              "per case). % matmul rate: head GEMM flops (8NVD for the op: forward, recomputed "
              "logits, dH, dW; 10NVD for the loss with its reference forward) over the torch.mm "
              "rate measured in the same run; a method that keeps the logits instead of recomputing "
              "them needs only 6NVD, so it can pass 100%. Errors against fp64: the op on 256 "
              "sampled rows (dW from a run on those rows), the loss on the whole batch (SGDPO "
              "checked with pilot ratios 1, where it equals DPO with half the gradient)."]
    return "\n".join(lines)


def _panels(rows: List[Dict], workload: str):
    """Group rows by head shape (everything but the token count) -> method -> [(tokens, row)]."""
    panels: "OrderedDict[str, OrderedDict[str, list]]" = OrderedDict()
    for r in rows:
        if r["workload"] != workload:
            continue
        head = {k: v for k, v in r["shape"].items() if k not in ("N", "T")}
        key = shape_str(head)
        panels.setdefault(key, OrderedDict()).setdefault(r["method"], []).append((r["tokens"], r))
    return panels


def plot(results: Dict, out_dir: str) -> List[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for workload in ("logprob", "loss"):
        panels = _panels(results["rows"], workload)
        if not panels:
            continue
        for metric, ylabel, fname in (("time_ms_median", "median time (ms)", "time"),
                                      ("mem_extra_bytes", "extra memory (MiB)", "memory")):
            fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
            any_line = False
            for ax, (head, methods) in zip(axes[0], panels.items()):
                series = {}
                for name, pts in methods.items():
                    pts = sorted((n, r[metric]) for n, r in pts if r["status"] == "ok" and r.get(metric) is not None)
                    if pts:
                        series[name] = ([p[0] for p in pts],
                                        [p[1] / 2 ** 20 if metric == "mem_extra_bytes" else p[1] for p in pts])
                xs_all = {x for xs, _ in series.values() for x in xs}
                if len(xs_all) == 1:  # a single token count: bars, one per method
                    names = list(series)
                    ax.bar(range(len(names)), [series[n][1][0] for n in names],
                           color=[f"C{i}" for i in range(len(names))])
                    ax.set_xticks(range(len(names)))
                    ax.set_xticklabels(names, rotation=30, ha="right", fontsize=8)
                    ax.set_xlabel(f"tokens = {xs_all.pop()}")
                else:
                    for name, (xs, ys) in series.items():
                        ax.plot(xs, ys, marker="o", label=name)
                    ax.set_xscale("log", base=2)
                    if metric == "time_ms_median":
                        ax.set_yscale("log")
                    ax.set_xlabel("tokens (N)" if workload == "logprob" else "tokens (2 B T)")
                    if series:
                        ax.legend(fontsize=7)
                any_line = any_line or bool(series)
                ax.set_ylabel(ylabel)
                ax.set_title(f"{workload}: {head} ({results['dtype']})", fontsize=9)
                ax.grid(True, which="both", alpha=0.3)
            fig.suptitle(f"{results['machine']} ({results['device']})", fontsize=10)
            fig.tight_layout()
            path = os.path.join(out_dir, f"{workload}_{fname}.png")
            if any_line:
                fig.savefig(path, dpi=110)
                paths.append(path)
            plt.close(fig)
    return paths


def vocab_series(rows: List[Dict]):
    """``{(N, D): {method: [(V, row), ...]}}`` for the log-prob rows whose (N, D) was run at two
    or more vocabulary sizes (a vocabulary sweep)."""
    groups: "OrderedDict[tuple, OrderedDict[str, list]]" = OrderedDict()
    for r in rows:
        if r["workload"] != "logprob":
            continue
        key = (r["shape"]["N"], r["shape"]["D"])
        groups.setdefault(key, OrderedDict()).setdefault(r["method"], []).append((r["shape"]["V"], r))
    return OrderedDict((k, v) for k, v in groups.items()
                       if len({V for pts in v.values() for V, _ in pts}) >= 2)


def plot_vocab(results: Dict, out_dir: str) -> List[str]:
    """``logprob_vocab.png``: time and extra memory against the vocabulary size, one line per
    method, one row of panels per (N, D) that was swept."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = vocab_series(results["rows"])
    if not groups:
        return []
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4.2 * len(groups)), squeeze=False)
    for (N, D), (ax_t, ax_m) in zip(groups, axes):
        for name, pts in groups[(N, D)].items():
            ok = sorted((V, r) for V, r in pts if r["status"] == "ok")
            if ok:
                ax_t.plot([V for V, _ in ok], [r["time_ms_median"] for _, r in ok], marker="o",
                          label=name)
            mem = [(V, r["mem_extra_bytes"] / 2 ** 20) for V, r in ok
                   if r.get("mem_extra_bytes") is not None]
            if mem:
                ax_m.plot([V for V, _ in mem], [m for _, m in mem], marker="o", label=name)
        ax_t.set_yscale("log")
        for ax, ylabel in ((ax_t, "median time (ms)"), (ax_m, "extra memory (MiB)")):
            ax.set_xscale("log")
            ax.set_xlabel("vocabulary size V")
            ax.set_ylabel(ylabel)
            ax.set_title(f"logprob fwd+bwd, N={N}, D={D} ({results['dtype']})", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7)
    fig.suptitle(f"{results['machine']} ({results['device']}): vocabulary sweep", fontsize=10)
    fig.tight_layout()
    path = os.path.join(out_dir, "logprob_vocab.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def write_all(results: Dict, out_dir: str, plots="all") -> List[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    p = os.path.join(out_dir, "results.json")
    with open(p, "w") as f:
        json.dump(results, f, indent=1, default=str)
    paths.append(p)
    p = os.path.join(out_dir, "results.md")
    with open(p, "w") as f:
        f.write(markdown(results) + "\n")
    paths.append(p)
    plots = {True: "all", False: "none"}.get(plots, plots)
    if plots != "none":
        try:
            if plots == "all":
                paths += plot(results, out_dir)
            paths += plot_vocab(results, out_dir)
        except ImportError as exc:  # e.g. a GPU box without matplotlib: tables still written
            print(f"plots skipped: {exc}")
    return paths
