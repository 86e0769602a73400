"""Checkpoints that let a killed run continue exactly, and that cannot run code.

``<out>/checkpoints/step-000012/`` holds ``state.json`` + ``state.safetensors``
(``state_io.py``: no pickle anywhere): the model weights, the AdamW and scheduler states,
every random state the run draws from (torch CPU/CUDA, Python, NumPy, the SGDPO pilot
generator), the step (which fixes the data position: the order of every epoch is a
function of the seed and the epoch), the settings and the run's fingerprints.

A checkpoint is written to ``step-N.tmp/`` and renamed, so one that exists was complete
when written; ``state.json`` records the size and SHA-256 of the tensor file, so one damaged
since (cut short, emptied, a flipped bit) is recognized: :func:`find_resumable` then warns,
naming the file, and falls back to the newest intact one.  Folders of older sgdpo_fast
versions (``state.pt``, a pickle) are never loaded: unpickling can run arbitrary code.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Callable, List, Optional, Tuple

import torch

from .files import write_folder
from .state_io import META_FILE, StateError, read_meta, read_state, save_state

_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-(\d+)\.(tmp|old)$")
LEGACY_FILE = "state.pt"


class CheckpointError(StateError):
    """A checkpoint folder that cannot be resumed from; the message names the file."""


def ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def step_folders(out_dir: str) -> List[Tuple[int, str]]:
    """``(step, path)`` of every ``step-N`` folder, newest first (intact or not)."""
    root = ckpt_root(out_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, d)) for d in os.listdir(root)
             if (m := _STEP.match(d)) and os.path.isdir(os.path.join(root, d))]
    return sorted(found, reverse=True)


# --------------------------------------------------------------------------- random states

def rng_state(generator: torch.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "generator": generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return st
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st["numpy"] = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                   float(cached)]
    return st


def set_rng_state(st: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    generator.set_state(st["generator"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np
        name, keys, pos, has_gauss, cached = st["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


# --------------------------------------------------------------------------- save / find / load

def save_checkpoint(out_dir: str, step: int, state: dict, meta: dict, keep: int = 2) -> str:
    """Write ``state`` (a state tree: ``{"model": ..., "optimizer": ..., ...}``) and ``meta``
    (JSON) as ``checkpoints/step-<step>``, atomically; then keep the newest ``keep`` (0: all).
    A failed write raises ``files.RunWriteError`` and leaves the older checkpoints as they were."""
    root = ckpt_root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    write_folder(final, lambda tmp: save_state(tmp, state, dict(meta, step=step)))
    for d in os.listdir(root):  # what a kill during an earlier save left behind
        if _LEFTOVER.match(d):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    if keep > 0:
        for _, path in step_folders(out_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def check_checkpoint(path: str) -> dict:
    """The metadata of the checkpoint folder ``path`` once its files are verified (size and
    SHA-256); CheckpointError naming the file otherwise."""
    legacy = os.path.join(path, LEGACY_FILE)
    if os.path.exists(legacy) and not os.path.exists(os.path.join(path, META_FILE)):
        raise CheckpointError(legacy, "a pickle checkpoint of an older sgdpo_fast; not loaded, "
                                      "since unpickling a file can run code")
    try:
        doc = read_meta(path)
    except StateError as e:
        raise CheckpointError(e.file, e.problem) from None
    if not isinstance(doc.get("step"), int):
        raise CheckpointError(os.path.join(path, META_FILE), "records no step")
    return doc


def find_resumable(out_dir: str, warn: Callable[[str], None]
                   ) -> Tuple[Optional[str], Optional[dict], List[str]]:
    """``(path, meta, bad)``: the newest intact checkpoint (None if there is none) and the
    newer ones that are not intact, each reported through ``warn`` naming its bad file and
    the checkpoint used instead."""
    bad, problems = [], []
    found, meta = None, None
    for _, path in step_folders(out_dir):
        try:
            meta = check_checkpoint(path)
            found = path
            break
        except CheckpointError as e:
            bad.append(path)
            problems.append(e)
    instead = f"resuming from {found} instead" if found else "no intact checkpoint is left"
    for e in problems:
        warn(f"checkpoint file {e.file} is unusable ({e.problem}); {instead}")
    return found, meta, bad


def set_aside(path: str) -> str:
    """Rename a damaged checkpoint folder to ``<path>.damaged`` (kept for inspection; no
    longer a checkpoint, so newer saves and their rotation never mistake it for one)."""
    dst, n = path + ".damaged", 1
    while os.path.exists(dst):
        n += 1
        dst = f"{path}.damaged{n}"
    os.replace(path, dst)
    return dst


def read_checkpoint(path: str, verify: bool = True) -> dict:
    """The state tree of a checkpoint folder, plus its ``"step"``; CheckpointError naming the
    file if it is not intact (``verify=False``: the hash was checked already, by
    :func:`find_resumable`)."""
    if verify:
        check_checkpoint(path)
    try:
        tree, meta = read_state(path, verify=False)
    except StateError as e:
        raise CheckpointError(e.file, e.problem) from None
    return dict(tree, step=meta["step"])


def load_checkpoint(path: str, model, optimizer, scheduler, generator,
                    verify: bool = True) -> dict:
    """Restore the model, optimizer, scheduler and random states from ``path``."""
    st = read_checkpoint(path, verify)
    model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"], generator)
    return st


def training_state(model, optimizer, scheduler, generator) -> dict:
    """What a checkpoint holds (a state tree), read from the live objects."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rng_state(generator)}
