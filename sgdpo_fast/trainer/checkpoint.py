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

Several processes (``parallel.py``): every rank calls :func:`save_checkpoint`.  Under DDP
rank 0 writes the folder above alone (the model and AdamW state are the same on every
rank); each rank's random states are gathered into it (``rng_ranks``).  Under FSDP2 the
model and AdamW state stay sharded: every rank writes its shards through
``torch.distributed.checkpoint`` with its safetensors storage
(``HuggingFaceStorageWriter``, one ``dcp/shard-0000<r+1>-....safetensors`` per rank, the
shard offsets in the safetensors header: no pickle, no ``.metadata`` file), the rest
(scheduler, random states, AdamW's hyper-parameters) goes into ``state.json`` /
``state.safetensors`` as above, and ``state.json`` lists every shard file with its size and
SHA-256.  Verifying is shared: rank ``r`` hashes the files ``r, r + world, ...``, and the
ranks agree on the first damaged one before falling back.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from typing import Callable, List, Optional, Tuple

import torch

from .. import distributed
from .files import commit_folder, fsync_dir, fsync_file, write_folder, writing
from .state_io import (META_FILE, StateError, file_record, flatten, read_meta, read_state,
                       save_state, unflatten)

_STEP = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^step-(\d+)\.(tmp|old)$")
LEGACY_FILE = "state.pt"
SHARD_DIR = "dcp"


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


def gather_rng_states(generator: torch.Generator) -> List[dict]:
    """Every rank's :func:`rng_state`, in rank order (exchanged as JSON, no pickle)."""
    skeleton, tensors = flatten(rng_state(generator))
    payload = {"tree": skeleton,
               "tensors": {k: distributed.encode_tensor(v) for k, v in tensors.items()}}
    return [unflatten(p["tree"], {k: distributed.decode_tensor(v) for k, v in p["tensors"].items()})
            for p in distributed.all_gather_json(payload)]


def own_rng_state(st: dict) -> dict:
    """This rank's random states from a checkpoint's tree (``rng_ranks[rank]`` when the run had
    several processes, else ``rng``)."""
    ranks = st.get("rng_ranks")
    return ranks[distributed.rank()] if ranks else st["rng"]


# --------------------------------------------------------------------------- save / find / load

def save_checkpoint(out_dir: str, step: int, state: dict, meta: dict, keep: int = 2,
                    sharded: Optional[dict] = None) -> str:
    """Write ``state`` (a state tree: ``{"model": ..., "optimizer": ..., ...}``) and ``meta``
    (JSON) as ``checkpoints/step-<step>``, atomically; then keep the newest ``keep`` (0: all).
    A failed write raises ``files.RunWriteError`` and leaves the older checkpoints as they were.

    Several processes: every rank calls it; rank 0 writes ``state``.  ``sharded`` (FSDP2: a
    flat ``{key: tensor or DTensor}``) is written by every rank, its own shards, into
    ``dcp/`` (module docstring)."""
    root = ckpt_root(out_dir)
    final = os.path.join(root, f"step-{step:06d}")
    main = distributed.is_main()
    if sharded is None:
        if main:
            os.makedirs(root, exist_ok=True)
            write_folder(final, lambda tmp: save_state(tmp, state, dict(meta, step=step)))
            _tidy(out_dir, keep)
        distributed.barrier()
        return final
    tmp = final + ".tmp"
    shard_dir = os.path.join(tmp, SHARD_DIR)
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(shard_dir):
            os.makedirs(shard_dir)
    distributed.barrier()
    try:
        mine = _write_shards(shard_dir, sharded)
        files = {}
        for part in distributed.all_gather_json(mine):
            files.update(part)
        if main:
            with writing(tmp):
                save_state(tmp, state, dict(meta, step=step, sharded_keys=sorted(sharded)),
                           extra_files=files)
                for name in os.listdir(tmp):
                    if os.path.isfile(os.path.join(tmp, name)):
                        fsync_file(os.path.join(tmp, name))
                fsync_dir(tmp)
            commit_folder(tmp, final)
            _tidy(out_dir, keep)
    except BaseException:
        if main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    distributed.barrier()
    return final


def _write_shards(shard_dir: str, sharded: dict) -> dict:
    """This rank's part of ``sharded`` through ``torch.distributed.checkpoint`` in safetensors
    files; returns ``{"dcp/<file>": file_record}`` of the files this rank wrote."""
    import torch.distributed.checkpoint as dcp
    try:
        from torch.distributed.checkpoint import HuggingFaceStorageWriter
    except ImportError:  # pragma: no cover - older torch
        raise RuntimeError("FSDP2 checkpoints need torch.distributed.checkpoint's "
                           "HuggingFaceStorageWriter (safetensors shards; tested with torch "
                           "2.13): upgrade torch, or train with parallel='ddp'") from None

    with writing(shard_dir):
        dcp.save(sharded, storage_writer=HuggingFaceStorageWriter(shard_dir, save_distributed=True))
    prefix = f"shard-{distributed.rank() + 1:05d}-"
    out = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.startswith(prefix):
            p = os.path.join(shard_dir, name)
            fsync_file(p)
            out[f"{SHARD_DIR}/{name}"] = file_record(p)
    return out


def read_shards(path: str, target: dict, recorded_keys) -> None:
    """Load the sharded state of checkpoint ``path`` into ``target`` (a flat ``{key: tensor
    or DTensor}`` laid out like the one saved; loaded in place, resharded by
    ``torch.distributed.checkpoint`` as needed).  CheckpointError if the keys differ."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    shard_dir = os.path.join(path, SHARD_DIR)
    if sorted(target) != sorted(recorded_keys or []):
        missing = sorted(set(target) - set(recorded_keys or []))[:3]
        extra = sorted(set(recorded_keys or []) - set(target))[:3]
        raise CheckpointError(os.path.join(path, META_FILE),
                              f"its sharded state does not fit this model and optimizer "
                              f"(missing {missing}, unexpected {extra})")
    try:
        dcp.load(target, storage_reader=HuggingFaceStorageReader(shard_dir))
    except Exception as e:
        raise CheckpointError(shard_dir, f"the sharded state cannot be read "
                                         f"({' '.join(str(e).split())[:300]})") from None


def _tidy(out_dir: str, keep: int) -> None:
    root = ckpt_root(out_dir)
    for d in os.listdir(root):  # what a kill during an earlier save left behind
        if _LEFTOVER.match(d):
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    if keep > 0:
        for _, path in step_folders(out_dir)[keep:]:
            shutil.rmtree(path, ignore_errors=True)


def check_checkpoint(path: str, share: Optional[Tuple[int, int]] = None) -> dict:
    """The metadata of the checkpoint folder ``path`` once its files are verified (size and
    SHA-256); CheckpointError naming the file otherwise.  ``share=(r, w)``: hash only the
    listed files ``r, r + w, ...`` (in name order; sizes are checked for all)."""
    legacy = os.path.join(path, LEGACY_FILE)
    if os.path.exists(legacy) and not os.path.exists(os.path.join(path, META_FILE)):
        raise CheckpointError(legacy, "a pickle checkpoint of an older sgdpo_fast; not loaded, "
                                      "since unpickling a file can run code")
    hash_only = None
    if share is not None:
        try:
            names = sorted(read_meta(path, verify=False)["files"])
        except StateError as e:
            raise CheckpointError(e.file, e.problem) from None
        hash_only = set(names[share[0]::share[1]])
    try:
        doc = read_meta(path, hash_only=hash_only)
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
    w = distributed.world()
    for _, path in step_folders(out_dir):
        try:
            meta = check_checkpoint(path, share=(distributed.rank(), w) if w > 1 else None)
            err = None
        except CheckpointError as e:
            err = e
        if w > 1:  # the ranks shared the hashing: the first problem any of them found
            seen = [p for p in distributed.all_gather_json(
                None if err is None else [err.file, err.problem]) if p is not None]
            err = CheckpointError(*seen[0]) if seen else None
        if err is None:
            found = path
            break
        bad.append(path)
        problems.append(err)
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
    """Restore the model, optimizer, scheduler and random states from ``path`` (one process,
    or DDP: every rank reads the same folder and takes its own random states)."""
    st = read_checkpoint(path, verify)
    model.load_state_dict(st["model"])
    optimizer.load_state_dict(st["optimizer"])
    scheduler.load_state_dict(st["scheduler"])
    set_rng_state(own_rng_state(st), generator)
    return st


def training_state(model, optimizer, scheduler, generator) -> dict:
    """What a checkpoint holds (a state tree), read from the live objects.  Several processes:
    a collective (every rank's random states are gathered into ``rng_ranks``)."""
    st = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
          "scheduler": scheduler.state_dict(), "rng": rng_state(generator)}
    if distributed.world() > 1:
        st["rng_ranks"] = gather_rng_states(generator)
    return st


# --------------------------------------------------------------------------- FSDP2

def sharded_training_state(module, optimizer, scheduler, generator) -> Tuple[dict, dict]:
    """``(state, sharded)`` of an FSDP2 module and its AdamW (a collective): ``sharded`` maps
    ``model/<name>`` and ``optimizer/<name>/<exp_avg|exp_avg_sq|step>`` to this rank's
    (D)tensors; ``state`` holds the scheduler, every rank's random states and AdamW's
    parameter groups (hyper-parameters, JSON)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(module, optimizer)
    sharded, aliases = _flat_sharded(module, msd, osd)
    state = {"scheduler": scheduler.state_dict(), "rng": rng_state(generator),
             "rng_ranks": gather_rng_states(generator), "optimizer_groups": osd["param_groups"],
             "sharded_aliases": aliases}
    return state, sharded


def _flat_sharded(module, msd: dict, osd: dict) -> Tuple[dict, dict]:
    """``(flat, aliases)``: the (D)tensors by key, each weight once: a tied weight (one
    parameter under two names, e.g. input embedding and LM head) is stored under its first
    name, and ``aliases`` maps the other names' keys to it (the same on every rank: it comes
    from the module's structure, not from the shards)."""
    tied, first = {}, {}
    for n, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            tied[n] = first[id(p)]
        else:
            first[id(p)] = n
    flat, aliases = {}, {}
    for k, v in msd.items():
        if k in tied:
            aliases[f"model/{k}"] = f"model/{tied[k]}"
        else:
            flat[f"model/{k}"] = v
    for name, st in osd["state"].items():
        for k, v in st.items():
            if not isinstance(v, torch.Tensor):
                raise TypeError(f"optimizer state {name}/{k} is a {type(v).__name__}, not a tensor")
            if name in tied:
                aliases[f"optimizer/{name}/{k}"] = f"optimizer/{tied[name]}/{k}"
            else:
                flat[f"optimizer/{name}/{k}"] = v
    return flat, aliases


def load_sharded_checkpoint(path: str, module, optimizer, scheduler, generator,
                            verify: bool = True) -> dict:
    """Restore an FSDP2 module, its AdamW, the scheduler and this rank's random states from
    ``path`` (every rank; a collective)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    st = read_checkpoint(path, verify)
    doc = read_meta(path, verify=False)
    msd, osd = get_state_dict(module, optimizer)  # AdamW's state exists from here on
    flat, aliases = _flat_sharded(module, msd, osd)
    if aliases != st.get("sharded_aliases", {}):
        raise CheckpointError(os.path.join(path, META_FILE), "its tied weights differ from "
                                                             "this model's")
    read_shards(path, flat, doc.get("sharded_keys"))
    for alias, primary in aliases.items():  # a tied weight: its other name, the loaded tensor
        part, rest = alias.split("/", 1)
        if part == "model":
            msd[rest] = flat[primary]
        else:
            name, k = rest.rsplit("/", 1)
            osd["state"][name][k] = flat[primary]
    osd["param_groups"] = st["optimizer_groups"]
    set_state_dict(module, optimizer, model_state_dict=msd, optim_state_dict=osd)
    scheduler.load_state_dict(st["scheduler"])
    set_rng_state(own_rng_state(st), generator)
    return st
