"""``python -m bench.one SPEC.json RESULT.pt``: one (method, shape) case in a fresh process.

Used by ``measure.execute_isolated`` for the CPU peak-RSS measurement.  Writes
``{"status": "ok"|"OOM"|"error", "reason", "row", "outputs"}`` with ``torch.save``.
"""
from __future__ import annotations

import json
import sys

import torch


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m bench.one SPEC.json RESULT.pt", file=sys.stderr)
        return 2
    spec_path, res_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    from . import measure
    try:
        row, outputs = measure.execute(spec, memory_mode="rss" if spec["device"] == "cpu" else "auto",
                                      to_cpu=True)
        res = {"status": "ok", "reason": "", "row": row, "outputs": outputs}
    except Exception as exc:  # recorded, never dropped
        status, reason = measure.classify_error(exc)
        res = {"status": status, "reason": reason, "row": {}, "outputs": {}}
    torch.save(res, res_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
