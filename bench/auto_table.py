"""``python -m bench.auto_table``: the table ``backend="auto"`` reads on CUDA.

Collects (1) the measured forward + backward times of the ``ours_triton``, ``ours_cuda`` and
``ours_torch`` methods from every GPU result committed under ``bench/results/*/results.json``
(``make gpu-check`` or ``python -m bench --device cuda``), keyed by GPU, dtype and shape, and
(2) the kernel report's op model (``bench/results/sm90-kernels.json``), and writes them to
``sgdpo_fast/ops/backends/auto_table.json``, which ships with the package
(``sgdpo_fast/ops/backends/auto_backend.py`` explains the choice).  ``tests/test_auto_backend.py``
checks that the shipped table is what this command makes from the committed files.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys

from sgdpo_fast.ops.backends import auto_backend

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
METHODS = {"ours_triton": "triton", "ours_cuda": "cuda", "ours_torch": "torch"}


def measured_rows(results_root: str = RESULTS):
    rows = {}
    for path in sorted(glob.glob(os.path.join(results_root, "*", "results.json"))):
        with open(path) as f:
            res = json.load(f)
        # Other result folders share the file name (the quality study's results.json is a list
        # of runs): only a benchmark run's dict with a GPU in it is read.
        if not isinstance(res, dict) or res.get("device") != "cuda" or not res.get("gpu"):
            continue
        gpu = auto_backend.gpu_key(res["gpu"])
        for r in res.get("rows", []):
            if r.get("workload") != "logprob" or r.get("method") not in METHODS \
                    or r.get("status") != "ok":
                continue
            s = r["shape"]
            key = (gpu, r["dtype"], s["N"], s["D"], s["V"])
            row = rows.setdefault(key, dict(gpu=gpu, dtype=r["dtype"], N=s["N"], D=s["D"],
                                            V=s["V"], ms={}, source=os.path.relpath(path, results_root)))
            row["ms"][METHODS[r["method"]]] = round(r["time_ms_median"], 3)
    return [rows[k] for k in sorted(rows)]


def modeled_rows(results_root: str = RESULTS):
    path = os.path.join(results_root, "sm90-kernels.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        ops = json.load(f)["ops"]
    rows = {}
    for o in ops:
        key = (o["dtype"], o["N"], o["D"], o["V"])
        rows.setdefault(key, dict(dtype=o["dtype"], N=o["N"], D=o["D"], V=o["V"], ms={}))
        rows[key]["ms"][o["backend"]] = o["modeled_ms"]
    return [rows[k] for k in sorted(rows)]


def build(results_root: str = RESULTS) -> dict:
    return {"version": 1, "generated_by": "python -m bench.auto_table",
            "measured": measured_rows(results_root), "modeled": modeled_rows(results_root)}


def render(table: dict) -> str:
    return json.dumps(table, indent=1, sort_keys=True) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.auto_table", description=__doc__)
    p.add_argument("--out", default=auto_backend.TABLE_PATH)
    args = p.parse_args(argv)
    table = build()
    with open(args.out, "w") as f:
        f.write(render(table))
    print(f"wrote {args.out}: {len(table['measured'])} measured rows, "
          f"{len(table['modeled'])} modeled rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
