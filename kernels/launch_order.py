"""``grouped_pid``: the launch order of the log-prob kernels' programs.

A 1-D grid of ``n_row_blocks * n_cols`` programs is mapped so that consecutive program ids
take ``GROUP_N`` consecutive token blocks (fastest) times every column (a vocabulary tile or
split).  The programs that run side by side (one per multiprocessor) then touch a few token
blocks and a band of weight rows: each weight tile is read from HBM once per group and then
hit in L2 by the group's other token blocks, and each token block's hidden rows stay in L2
while the group sweeps the vocabulary.  (The old grid, token block on axis 0, put one
program per token block side by side: every weight tile was shared, but each program's
hidden rows were re-read from HBM for every vocabulary tile.)
"""
import triton
import triton.language as tl


@triton.jit
def grouped_pid(pid, n_row_blocks, n_cols, GROUP_N: tl.constexpr):
    """``(row block, column)`` of program ``pid``."""
    per_group = GROUP_N * n_cols
    group = pid // per_group
    first = group * GROUP_N
    size = tl.minimum(n_row_blocks - first, GROUP_N)
    local = pid % per_group
    return first + local % size, local // size
