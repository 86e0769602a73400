"""Checkpoints that let a killed run continue exactly.

``<out>/checkpoints/step-000012/state.pt`` holds the model weights, the AdamW and
scheduler states, the step (which fixes the data position: the order of every
epoch is a function of the seed and the epoch), and every random state the run
draws from (torch CPU/CUDA, Python, the SGDPO pilot generator).  A checkpoint is
written to a ``.tmp`` folder and renamed, so one that exists is complete.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Optional

import torch

_STEP = re.compile(r"^step-(\d+)$")


def ckpt_root(out_dir: str) -> str:
    return os.path.join(out_dir, "checkpoints")


def latest_checkpoint(out_dir: str) -> Optional[str]:
    root = ckpt_root(out_dir)
    if not os.path.isdir(root):
        return None
    found = [(int(m.group(1)), d) for d in os.listdir(root) if (m := _STEP.match(d))
             and os.path.isfile(os.path.join(root, d, "state.pt"))]
    return os.path.join(root, max(found)[1]) if found else None


def rng_state(generator: torch.Generator) -> dict:
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "generator": generator.get_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
        st["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return st


def set_rng_state(st: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(st["torch"])
    random.setstate(st["python"])
    generator.set_state(st["generator"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    if "numpy" in st:
        import numpy as np
        np.random.set_state(st["numpy"])


def save_checkpoint(out_dir: str, step: int, model, optimizer, scheduler, generator,
                    extra: dict, keep: int = 2) -> str:
    root = ckpt_root(out_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "rng": rng_state(generator),
                **extra}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        olds = sorted(d for d in os.listdir(root) if _STEP.match(d))[:-keep]
        for d in olds:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    return final


def load_checkpoint(path: str, model, optimizer, scheduler, generator) -> dict:
    st = torch.load(os.path.join(path, "state.pt"), weights_only=False)
    model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    set_rng_state(st["rng"], generator)
    return st
