"""Training data: validated JSONL formats (records) and code-checked instruction tasks (tasks).

* :func:`load_preferences` / :func:`load_sft` load and validate preference pairs or SFT
  pairs from a ``.jsonl`` path, ``"bundled:train"`` / ``"bundled:heldout"`` or
  ``"hf:<name or dir>[:<split>]"``; problems raise :class:`DataError` naming file and line.
* :func:`build_tasks` generates small instruction tasks whose answers are computed by code;
  :func:`check` grades a model's answer and :func:`accuracy` summarizes many.

The task names are imported on first use, so that ``python -m sgdpo_fast.data.tasks``
does not find its own module already imported.
"""
from __future__ import annotations

import importlib as _importlib

from .records import DataError, load_preferences, load_sft, read_jsonl, write_jsonl

_FROM_TASKS = ("build_tasks", "check", "accuracy", "bundled_path")

__all__ = [
    "DataError",
    "load_preferences",
    "load_sft",
    "read_jsonl",
    "write_jsonl",
    *_FROM_TASKS,
]


def __getattr__(name):
    if name in _FROM_TASKS:
        return getattr(_importlib.import_module(f"{__name__}.tasks"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
