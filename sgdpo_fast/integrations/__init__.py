"""Integrations: Hugging Face models (``hf``) and TRL (``trl``).

Submodules are imported on first use so ``import sgdpo_fast`` never pulls in
transformers or trl.
"""
from __future__ import annotations

import importlib as _importlib

_LAZY = {
    "apply_fused_lm_head": "sgdpo_fast.integrations.hf",
    "remove_fused_lm_head": "sgdpo_fast.integrations.hf",
    "has_fused_lm_head": "sgdpo_fast.integrations.hf",
    "SGDPOConfig": "sgdpo_fast.integrations.trl",
    "SGDPOTrainer": "sgdpo_fast.integrations.trl",
    "patch_trl": "sgdpo_fast.integrations.trl",
    "unpatch_trl": "sgdpo_fast.integrations.trl",
}

__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdpo_fast.integrations' has no attribute {name!r}")
