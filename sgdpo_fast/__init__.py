"""sgdpo_fast: fused, memory-lean preference optimization (DPO family, SGDPO, SGPO).

Layers (each imports only the ones below it; docs/design.md draws them):
``ops`` (the log-prob op) <- ``losses`` <- ``model`` (Hugging Face causal LMs: head path,
sharded heads, loading, generation) <- ``trainer`` / ``sgpo`` / ``integrations`` <- ``cli``.
The Triton kernels live in the top-level folder ``kernels/``, installed as
``sgdpo_fast.kernels`` (run from a source tree after ``pip install -e .``).
"""
from __future__ import annotations

import importlib as _importlib

from .ops import LogprobPlan, fused_token_logprobs

__version__ = "0.1.0"

# Public names imported on first use, so `import sgdpo_fast` stays light
# (no transformers / trl import unless asked for).
_LAZY = {
    "preference_loss": "sgdpo_fast.losses",
    "PreferenceLossOutput": "sgdpo_fast.losses",
    "FusedLinearPreferenceLoss": "sgdpo_fast.losses",
    "FusedLinearDPOLoss": "sgdpo_fast.losses",
    "LOSS_TYPES": "sgdpo_fast.losses",
    "apply_fused_lm_head": "sgdpo_fast.integrations.hf",
}

__all__ = ["fused_token_logprobs", "LogprobPlan", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdpo_fast' has no attribute {name!r}")
