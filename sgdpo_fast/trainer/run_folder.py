"""The run folder's rules: what counts as a run, when it may be replaced, what a resume must
match.

* A folder *holds a run* when it has any of the trainer's files (``RUN_MARKERS``).  Such a
  folder is continued only with ``resume=True`` (``--resume``) and replaced only with
  ``overwrite=True`` (``--overwrite``); anything else is a :class:`RunFolderError` raised
  before a single file is touched.  Other files in the folder are never deleted.
* A run records *fingerprints* in ``config.json`` and in every checkpoint: the tokenized
  training data, the base model (:func:`model_fingerprint`) and the settings.  A resume
  with other data, another base model or other settings (except ``config.RESUME_FREE``) is
  refused, naming what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable, Optional

import torch

from .config import RESUME_FREE

CONFIG_FILE = "config.json"
# the files and folders that make a folder a training run's ...
RUN_MARKERS = ("config.json", "metrics.jsonl", "metrics.png", "checkpoints", "final")
# ... and everything a run writes at its top level (the reference log-probs are a cache:
# recomputed when missing, so they alone do not make a run)
RUN_ENTRIES = RUN_MARKERS + ("reference_logps.safetensors", "reference_logps.pt")
_SAMPLE = 4096  # values hashed per tensor by model_fingerprint


class RunFolderError(ValueError):
    """The run folder cannot be used as asked (it holds a run, or a resume does not match)."""


def holds_run(out_dir: str) -> bool:
    return os.path.isdir(out_dir) and any(os.path.exists(os.path.join(out_dir, e))
                                          for e in RUN_MARKERS)


def check_start(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Raise RunFolderError unless a run may start (or resume) in ``out_dir`` as asked."""
    if resume and overwrite:
        raise RunFolderError("--resume (resume=True) continues a run and --overwrite "
                             "(overwrite=True) replaces it: give one of them")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise RunFolderError(f"run folder {out_dir} is a file")
    if not resume and not overwrite and holds_run(out_dir):
        raise RunFolderError(f"{out_dir} holds a training run: continue it with --resume "
                             f"(resume=True) or replace it with --overwrite (overwrite=True)")


def clear_run(out_dir: str, is_entry: Optional[Callable[[str], bool]] = None) -> None:
    """Delete a run's own entries in ``out_dir`` and their temporary siblings (``.tmp``,
    ``.old``, ``.tmp.png``), nothing else.  ``is_entry(name)`` says which names are the run's
    (default: the trainer's ``RUN_ENTRIES``; the SGPO loop passes its own)."""
    if is_entry is None:
        is_entry = RUN_ENTRIES.__contains__
    if not os.path.isdir(out_dir):
        return
    for name in os.listdir(out_dir):
        base = name
        for suffix in (".tmp", ".old", ".tmp.png"):
            if base.endswith(suffix):
                base = base[:-len(suffix)]
        if is_entry(base) or is_entry(name):
            p = os.path.join(out_dir, name)
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.remove(p)


def model_fingerprint(model) -> str:
    """SHA-256 over the names, shapes and dtypes of the model's state and a strided sample of
    each tensor's values (at most ``_SAMPLE`` per tensor): cheap, and different for another
    checkpoint of the same architecture.  Distributed tensors (DTensor) count by shape only."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if type(t) is not torch.Tensor or t.numel() == 0 or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // _SAMPLE)].contiguous().cpu()
        h.update(sample.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def settings(cfg) -> dict:
    """The settings as stored in JSON (tuples become lists), for comparison with a record."""
    return json.loads(json.dumps(cfg.to_dict()))


def read_record(out_dir: str) -> Optional[dict]:
    """``config.json`` of a run, or None if it is missing or unreadable."""
    try:
        with open(os.path.join(out_dir, CONFIG_FILE), encoding="utf-8") as f:
            rec = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return rec if isinstance(rec, dict) else None


def mismatch(recorded: dict, fingerprints: dict, cfg, world_size: int = 1) -> list:
    """What differs between a recorded run (``{"fingerprints": ..., "settings": ...,
    "world_size": ...}``, as in config.json and checkpoints) and this one: a list of phrases,
    empty when it may resume.  The number of processes must be the same (it fixes the global
    batch, the data each step sees and, under FSDP2, the shards); runs recorded before
    multi-process training existed count as one process."""
    out = []
    if not isinstance(recorded.get("fingerprints"), dict):
        return ["the run was recorded without fingerprints (by an older sgdpo_fast); it cannot "
                "be resumed safely"]
    fp = recorded["fingerprints"]
    if fp.get("data") != fingerprints["data"]:
        out.append("the training data differ (other records, or another tokenizer or "
                   "max_length)")
    if fp.get("model") != fingerprints["model"]:
        out.append("the base model differs")
    then_world = recorded.get("world_size", 1)
    if then_world != world_size:
        out.append(f"the run had {then_world} process(es), now {world_size} (resume with the same "
                   f"number of ranks)")
    then, now = recorded.get("settings") or {}, settings(cfg)
    for k in now:
        if k not in RESUME_FREE and k in then and then[k] != now[k]:
            out.append(f"{k} was {then[k]!r}, now {now[k]!r}")
    return out
