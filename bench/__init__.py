"""Benchmark suite: sgdpo_fast against eager PyTorch, TRL, Liger-Kernel and Cut Cross-Entropy.

Two workloads, same inputs for every method:

* ``logprob``: the per-token log-prob op, forward + backward (hidden [N, D],
  weight [V, D], targets with ~5% ignored, a random upstream gradient);
* ``loss``: the whole DPO / SGDPO loss, forward + backward, including the
  reference model's forward.

``python -m bench --help`` for the command line; ``bench.runner.main`` is the
entry point (``sgdpo-fast bench`` calls it).  Results go to
``bench/results/<machine>/`` as JSON, a markdown table and PNG plots.
"""
