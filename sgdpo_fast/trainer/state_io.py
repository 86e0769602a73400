"""Training state on disk without pickle: tensors in safetensors, everything else in JSON.

A *state tree* is what ``state_dict()`` methods return: dicts (str or int keys), lists,
tuples, tensors and JSON scalars (None, bool, int, float, str).  :func:`save_state` writes
one into a folder as

    state.safetensors   every tensor of the tree, under its path ("model/lm_head.weight",
                        "optimizer/state/3/exp_avg", ...)
    state.json          the tree with each tensor replaced by {"tensor": path}, the caller's
                        metadata, and the size and SHA-256 of state.safetensors (and of any
                        other file the folder holds, e.g. the sharded state of FSDP2 in
                        ``dcp/``: ``checkpoint.py``)

and :func:`read_state` reads it back, after checking the size and the hash, so a file cut
short, emptied or with a flipped bit is reported (naming the file) instead of loaded.
Neither file can run code when read: JSON and safetensors are plain data formats.  A
sharded (multi-process) state can later store one such pair per shard, or a
``torch.distributed.checkpoint`` folder beside ``state.json``; the JSON side stays the same.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Dict, Tuple

import torch

from .files import writing

FORMAT = "sgdpo_fast.state/1"
TENSOR_FILE = "state.safetensors"
META_FILE = "state.json"
_HASH_CHUNK = 1 << 24


class StateError(ValueError):
    """A stored state that cannot be used; ``file`` is the file at fault."""

    def __init__(self, file: str, problem: str):
        super().__init__(f"{file}: {problem}")
        self.file, self.problem = file, problem


# --------------------------------------------------------------------------- tree <-> JSON

def flatten(tree) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """``(skeleton, tensors)``: the JSON-able skeleton of ``tree`` and its tensors by path.
    Tensors that are the same view of one storage (tied weights) are stored once."""
    tensors: Dict[str, torch.Tensor] = {}
    seen: Dict[tuple, str] = {}
    storages = set()

    def key_for(path: str) -> str:
        k, n = path or "tensor", 1
        while k in tensors:
            n += 1
            k = f"{path}#{n}"
        return k

    def enc(x, path):
        if x is None or isinstance(x, (bool, str)):
            return x
        if isinstance(x, int):
            return x
        if isinstance(x, float):
            return x if math.isfinite(x) else {"float": repr(x)}
        if isinstance(x, torch.Tensor):
            t = x.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            view = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                    tuple(t.stride()), t.dtype)
            if t.numel() and view in seen:
                return {"tensor": seen[view]}
            ptr = view[0]
            if not t.is_contiguous() or (t.numel() and ptr in storages):
                t = t.contiguous() if not t.is_contiguous() else t.clone()  # safetensors stores
            elif t.numel():                                              # no shared storage
                storages.add(ptr)
            k = key_for(path)
            tensors[k] = t
            if x.numel():
                seen[view] = k
            return {"tensor": k}
        if isinstance(x, dict):
            items = []
            for k, v in x.items():
                if not isinstance(k, (str, int)) or isinstance(k, bool):
                    raise TypeError(f"state key {k!r} at {path or '/'}: only str and int keys "
                                    f"can be stored")
                items.append([k, enc(v, f"{path}/{k}" if path else str(k))])
            return {"dict": items}
        if isinstance(x, (list, tuple)):
            vals = [enc(v, f"{path}/{i}" if path else str(i)) for i, v in enumerate(x)]
            return {"tuple" if isinstance(x, tuple) else "list": vals}
        raise TypeError(f"cannot store a {type(x).__name__} at {path or '/'} in a checkpoint "
                        f"(tensors, dicts, lists, tuples and JSON scalars only)")

    return enc(tree, ""), tensors


def unflatten(skeleton, tensors: Dict[str, torch.Tensor]):
    """The tree :func:`flatten` was given (tensors on the CPU)."""
    def dec(x):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if isinstance(x, dict) and len(x) == 1:
            (tag, v), = x.items()
            if tag == "tensor":
                return tensors[v]
            if tag == "float" and v in ("nan", "inf", "-inf"):
                return float(v)
            if tag == "dict":
                return {k: dec(val) for k, val in v}
            if tag == "list":
                return [dec(val) for val in v]
            if tag == "tuple":
                return tuple(dec(val) for val in v)
        raise ValueError(f"unknown entry {str(x)[:80]!r}")
    return dec(skeleton)


# --------------------------------------------------------------------------- files

def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(_HASH_CHUNK)
            if not b:
                return h.hexdigest()
            h.update(b)


def safe_name(name) -> bool:
    """A file name ``state.json`` may list: relative, inside the folder (``a.safetensors`` or
    ``dcp/a.safetensors``; no ``..``, no absolute path)."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    return all(part not in ("", ".", "..") for part in name.split("/"))


def file_record(path: str) -> dict:
    """``{"bytes", "sha256"}`` of a written file, as ``state.json`` lists it."""
    return {"bytes": os.path.getsize(path), "sha256": file_digest(path)}


def save_state(folder: str, tree, meta: dict, extra_files: dict = None) -> None:
    """Write ``tree`` (+ the JSON-able ``meta``) into the existing ``folder`` (see the module
    docstring).  ``extra_files``: ``{relative name: file_record(...)}`` of files written into
    the folder by others, to be verified with it.  The caller makes it atomic
    (``files.write_folder``)."""
    from safetensors.torch import save_file

    skeleton, tensors = flatten(tree)
    tpath, mpath = os.path.join(folder, TENSOR_FILE), os.path.join(folder, META_FILE)
    with writing(tpath):
        save_file(tensors, tpath, metadata={"format": FORMAT})
    files = {TENSOR_FILE: file_record(tpath)}
    for name, rec in (extra_files or {}).items():
        if not safe_name(name):
            raise ValueError(f"file name {name!r} must be relative to the state folder")
        files[name] = rec
    doc = dict(meta, format=FORMAT, tree=skeleton, files=files)
    with writing(mpath):
        with open(mpath, "w", encoding="utf-8") as f:
            json.dump(doc, f, allow_nan=False)
            f.flush()
            os.fsync(f.fileno())


def read_meta(folder: str, verify: bool = True, hash_only=None) -> dict:
    """``state.json`` of ``folder`` (without the tree's tensors), after checking that every
    listed file is there with the recorded size and (``verify``) hash.  ``hash_only``: a
    collection of names to hash (the others: size only; several ranks share the hashing).
    Raises StateError."""
    mpath = os.path.join(folder, META_FILE)
    if not os.path.isfile(mpath):
        raise StateError(mpath, "missing")
    try:
        with open(mpath, encoding="utf-8") as f:
            doc = json.load(f)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:
        raise StateError(mpath, f"not readable JSON ({type(e).__name__}: {e})") from None
    except OSError as e:
        raise StateError(mpath, f"cannot be read ({e.strerror or e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise StateError(mpath, f"not a {FORMAT} file")
    files = doc.get("files")
    if not isinstance(files, dict) or TENSOR_FILE not in files:
        raise StateError(mpath, "lists no tensor file")
    for name, want in files.items():
        p = os.path.join(folder, str(name))
        if not isinstance(want, dict) or not safe_name(name):
            raise StateError(mpath, f"bad entry for {name!r}")
        if not os.path.isfile(p):
            raise StateError(p, "missing")
        size = os.path.getsize(p)
        if size != want.get("bytes"):
            raise StateError(p, f"{size} bytes where {want.get('bytes')} were written "
                                f"(cut short or overwritten)")
        if verify and (hash_only is None or name in hash_only) and \
                file_digest(p) != want.get("sha256"):
            raise StateError(p, "content differs from what was written (SHA-256 mismatch)")
    return doc


def read_state(folder: str, verify: bool = True) -> Tuple[Any, dict]:
    """``(tree, meta)`` stored in ``folder`` by :func:`save_state`; StateError names the file
    at fault if anything is missing, cut short, altered or malformed."""
    from safetensors.torch import load_file

    doc = read_meta(folder, verify)
    tpath = os.path.join(folder, TENSOR_FILE)
    try:
        tensors = load_file(tpath)
    except Exception as e:  # safetensors' own error type for a malformed file
        raise StateError(tpath, f"not a readable safetensors file ({' '.join(str(e).split())})") from None
    try:
        tree = unflatten(doc["tree"], tensors)
    except (KeyError, ValueError, TypeError, RecursionError) as e:
        raise StateError(os.path.join(folder, META_FILE), f"malformed state tree ({e})") from None
    meta = {k: v for k, v in doc.items() if k not in ("tree", "files", "format")}
    return tree, meta
