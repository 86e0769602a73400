"""SGPO over several processes (``torchrun`` / ``accelerate launch``), and its stage files.

``run_sgpo`` runs on every rank with the same data and settings.  What this module adds:

* **Generation** is sharded by ``generate`` itself (``GenConfig.distributed``, set by the
  loop): whole length-sorted batches dealt round-robin, answers gathered on every rank.
* :func:`map_batches`: any other per-example pass (the perplexity of the improved
  answers), in whole batches dealt round-robin, results gathered in order on every rank.
  Each batch is computed as one process computes it, so the results do not depend on the
  number of ranks.
* **Files**: rank 0 alone writes (:func:`write_jsonl`, :func:`write_json`); a stage file
  that may already exist (resume) is looked up by rank 0 and its records sent to every
  rank (:func:`cached_jsonl`), so every rank takes the same branch and makes the same
  collective calls.
* **Training stages** (:func:`train_stage`) go through the trainer, which is itself
  distributed (DDP or FSDP2).  A finished stage leaves ``weights.safetensors`` (the model
  after it; pickle-free, its size and SHA-256 recorded in ``DONE`` and checked when it is
  loaded back) and ``DONE``; its checkpoints are then deleted.

With one process every function here is what the loop did before: the same files, the
same order of work.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Callable, List, Sequence

from .. import distributed
from ..data.records import read_jsonl
from ..data.records import write_jsonl as _write_jsonl
from ..trainer.files import write_json as _write_json
from ..trainer.state_io import file_record

WEIGHTS = "weights.safetensors"
LEGACY_WEIGHTS = "weights.pt"


def is_main() -> bool:
    return distributed.is_main()


def barrier() -> None:
    distributed.barrier()


def write_jsonl(path: str, records) -> None:
    """``data.records.write_jsonl`` on rank 0; every rank returns once the file is written."""
    if distributed.is_main():
        _write_jsonl(path, records)
    distributed.barrier()


def write_json(path: str, obj) -> None:
    """An atomic JSON file written by rank 0; every rank returns once it is written."""
    if distributed.is_main():
        _write_json(path, obj)
    distributed.barrier()


def cached_jsonl(path: str, make: Callable[[], list]) -> list:
    """The records of ``path`` if it exists (as rank 0 sees it; sent to every rank), else
    ``make()`` (called on every rank: it may hold collectives) written by rank 0."""
    if distributed.world() == 1:
        if os.path.isfile(path):
            return read_jsonl(path)
        recs = make()
        _write_jsonl(path, recs)
        return recs
    have = distributed.broadcast_json(os.path.isfile(path) if distributed.is_main() else None)
    if have:
        return distributed.broadcast_json(read_jsonl(path) if distributed.is_main() else None)
    recs = make()
    write_jsonl(path, recs)
    return recs


def map_batches(items: Sequence, batch_size: int, fn: Callable[[list], list]) -> list:
    """``fn`` over ``items`` in batches of ``batch_size`` (in order), one JSON-able result per
    item; with several processes the batches are dealt round-robin and the results gathered
    on every rank, in the order of ``items``."""
    items = list(items)
    batches = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    if distributed.world() == 1:
        return [x for b in batches for x in fn(b)]
    mine = [fn(batches[j]) for j in distributed.round_robin(len(batches))]
    per_rank = distributed.all_gather_json(mine)
    return [x for b in distributed.gather_in_order(per_rank, len(batches)) for x in b]


def _done_info(d: str):
    p = os.path.join(d, "DONE")
    if not os.path.isfile(p):
        return None
    with open(p, encoding="utf-8") as f:
        return json.load(f)


def train_stage(model, tokenizer, records, cfg, d: str, resume: bool, train) -> dict:
    """A training stage that survives interruption: ``train`` (the trainer's ``train``)
    checkpoints in ``d``; when it finishes, ``weights.safetensors`` holds the model and the
    checkpoints are removed.  A finished stage (``DONE``) is loaded back instead, after its
    weights file is checked against the size and SHA-256 recorded in ``DONE``.  A stage
    finished by an older sgdpo_fast (``weights.pt``, a pickle) is never unpickled: it is
    trained again (a warning says so)."""
    from safetensors.torch import load_model, save_model

    info = distributed.broadcast_json(_done_info(d) if distributed.is_main() else None)
    wpath = os.path.join(d, WEIGHTS)
    if info is not None and "weights" in info:
        if distributed.is_main():
            rec = file_record(wpath) if os.path.isfile(wpath) else None
            problem = None if rec == info["weights"] else (
                "missing" if rec is None else "differs from what was written (size or SHA-256)")
        else:
            problem = None
        problem = distributed.broadcast_json(problem)
        if problem:
            raise ValueError(f"{wpath}: {problem}; delete the folder {d} to train this stage "
                             f"again")
        load_model(model, wpath, device=str(next(model.parameters()).device))
        return {k: info[k] for k in ("steps", "last")}
    if info is not None and distributed.is_main():
        print(f"[sgdpo_fast] warning: {d} was finished by an older sgdpo_fast "
              f"({LEGACY_WEIGHTS}, a pickle, is never loaded): training the stage again",
              file=sys.stderr, flush=True)
    res = train(model, tokenizer, records, cfg, d, resume=resume or info is not None)
    out = {"steps": res["steps"], "last": res["last"]}
    if distributed.is_main():
        tmp = wpath + ".tmp"
        save_model(model, tmp)
        os.replace(tmp, wpath)
        # first DONE, then the checkpoints go: a kill in between loses nothing
        _write_json(os.path.join(d, "DONE"), dict(out, weights=file_record(wpath)))
        shutil.rmtree(os.path.join(d, "checkpoints"), ignore_errors=True)
    distributed.barrier()
    return out


__all__: List[str] = ["is_main", "barrier", "write_jsonl", "write_json", "cached_jsonl",
                      "map_batches", "train_stage", "WEIGHTS"]
