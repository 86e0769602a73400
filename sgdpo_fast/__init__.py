"""sgdpo_fast: fused, memory-lean preference optimization (DPO family, SGDPO, SGPO)."""
from __future__ import annotations

import importlib as _importlib
import os as _os

# The Triton kernels live in the top-level folder kernels/ and are installed as
# sgdpo_fast.kernels (setup.py).  When running from a source tree without an
# install, make that folder importable under the same name.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(_os.path.dirname(__file__), "kernels")) and \
        _os.path.isfile(_os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # type: ignore[name-defined]  # noqa: F821

from .ops import fused_token_logprobs  # noqa: E402

__version__ = "0.1.0"

# Public names imported on first use, so `import sgdpo_fast` stays light
# (no transformers / trl import unless asked for).
_LAZY = {
    "preference_loss": "sgdpo_fast.losses",
    "PreferenceLossOutput": "sgdpo_fast.losses",
    "FusedLinearPreferenceLoss": "sgdpo_fast.losses",
    "apply_fused_lm_head": "sgdpo_fast.integrations.hf",
}

__all__ = ["fused_token_logprobs", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(_importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sgdpo_fast' has no attribute {name!r}")
