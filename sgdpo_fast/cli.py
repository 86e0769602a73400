"""``sgdpo-fast`` command line.

    sgdpo-fast demo [--tokens N]     the fused op on the embedded SmolLM2 head vs eager
    sgdpo-fast bench [bench options] the benchmark suite (needs the source tree: bench/)
"""
from __future__ import annotations

import argparse
import os
import sys


def _bench(argv):
    try:
        from bench.runner import main as bench_main
    except ImportError:
        # the benchmark lives in the source tree, next to the package
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isfile(os.path.join(root, "bench", "runner.py")):
            raise SystemExit("sgdpo-fast bench needs the source tree (its bench/ folder); "
                             "run it from a checkout of sgdpo_fast")
        sys.path.insert(0, root)
        from bench.runner import main as bench_main
    return bench_main(argv)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="sgdpo-fast", description="fused preference optimization")
    ap.add_argument("command", choices=["demo", "bench"], help="what to run")
    if not argv or argv[0] in ("-h", "--help"):
        ap.print_help()
        return 0
    args = ap.parse_args(argv[:1])
    rest = argv[1:]
    if args.command == "bench":
        return _bench(rest)
    from .head_demo import main as demo_main
    return demo_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
