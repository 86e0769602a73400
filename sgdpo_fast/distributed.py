"""Several processes started by a launcher (``torchrun``, ``accelerate launch``): who is who,
and the few collectives the trainer and SGPO need.

sgdpo_fast starts no processes.  A launcher starts one process per device and tells each
its place through the environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT``); :func:`init_from_env` reads it and initializes the
default process group when the launcher asked for more than one process and nobody
(the user's script, ``accelerate.Accelerator``) did it already: ``gloo`` on CPU,
``cpu:gloo,cuda:nccl`` on CUDA (NCCL for the tensors on the GPU, gloo for the small
CPU exchanges below).  Without a launcher (``WORLD_SIZE`` unset or 1) nothing is
initialized and every function here is the single-process identity: ``rank() == 0``,
``world() == 1``, gathers return ``[x]``.

Exchanges carry tensors or JSON text (encoded as uint8 tensors), never pickles, so they
work the same over gloo and NCCL.
"""
from __future__ import annotations

import base64
import json
import os
from typing import Any, List, Optional, Sequence

import torch

__all__ = ["init_from_env", "launched", "active", "rank", "world", "local_rank", "is_main",
           "barrier", "all_reduce_sum", "any_rank", "all_gather_varlen", "all_gather_json",
           "broadcast_json", "round_robin", "rounds", "gather_in_order", "encode_tensor",
           "decode_tensor", "device", "destroy"]


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def launched() -> int:
    """The number of processes the launcher started (``WORLD_SIZE``; 1 without one)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise ValueError(f"WORLD_SIZE={os.environ.get('WORLD_SIZE')!r} is not an integer") from None


def active() -> bool:
    """True when a default process group of more than one process is initialized."""
    d = _dist()
    return d is not None and d.is_initialized() and d.get_world_size() > 1


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world() -> int:
    return _dist().get_world_size() if active() else 1


def local_rank() -> int:
    """``LOCAL_RANK`` (the device index on this machine); 0 without a launcher."""
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        raise ValueError(f"LOCAL_RANK={os.environ.get('LOCAL_RANK')!r} is not an integer") from None


def is_main() -> bool:
    """Rank 0, the one process that writes a run's files."""
    return rank() == 0


_OURS = False  # whether init_from_env initialized the group (so destroy() may end it)


def init_from_env(device_type: Optional[str] = None) -> bool:
    """Initialize the default process group from the launcher's environment when
    ``WORLD_SIZE > 1`` and no group exists yet; returns True if it did.

    ``device_type`` ("cpu" / "cuda"; default: "cuda" when CUDA is available) picks the
    backend: ``gloo`` for CPU, ``cpu:gloo,cuda:nccl`` for CUDA, after making
    ``cuda:LOCAL_RANK`` the current device.  A group initialized by someone else is used
    as it is."""
    global _OURS
    d = _dist()
    if launched() == 1 or d is None or d.is_initialized():
        return False
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise ValueError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {var} is not set: start "
                             f"the processes with torchrun or accelerate launch")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    d.init_process_group(backend=backend, init_method="env://")
    _OURS = True
    return True


def destroy(wait: bool = True) -> None:
    """End the process group if :func:`init_from_env` started it (``wait``: after a barrier,
    so no rank leaves while another still talks to it; after a failure pass False)."""
    global _OURS
    d = _dist()
    if _OURS and d is not None and d.is_initialized():
        try:
            if wait:
                d.barrier()
        finally:
            d.destroy_process_group()
    _OURS = False


def barrier() -> None:
    if active():
        _dist().barrier()


def _comm_device() -> torch.device:
    """Where tensors for a collective must live: the CPU when the group has a gloo backend,
    else the current CUDA device (NCCL only)."""
    backend = str(_dist().get_backend()).lower()
    if "gloo" in backend or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def device() -> torch.device:
    """This rank's compute device for sharded training: the current CUDA device when the
    group has NCCL, else the CPU."""
    if active() and "nccl" in str(_dist().get_backend()).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum over ranks of ``values`` (float64 on the CPU); ``values`` itself
    with one process."""
    v = values.detach().to(torch.float64)
    if not active():
        return v.cpu()
    t = v.to(_comm_device())
    _dist().all_reduce(t)
    return t.cpu()


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank."""
    if not active():
        return bool(flag)
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def all_gather_varlen(x: torch.Tensor) -> List[torch.Tensor]:
    """Every rank's 1-D tensor ``x`` (lengths may differ, dtype and device the same
    everywhere), in rank order, on the CPU."""
    x = x.detach().reshape(-1)
    if not active():
        return [x.cpu()]
    d, dev = _dist(), _comm_device()
    n = torch.tensor([x.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(d.get_world_size())]
    d.all_gather(sizes, n)
    sizes = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(sizes) or 1, dtype=x.dtype, device=dev)
    buf[:x.numel()] = x.to(dev)
    out = [torch.empty_like(buf) for _ in sizes]
    d.all_gather(out, buf)
    return [o[:s].cpu() for o, s in zip(out, sizes)]


def _json_bytes(obj) -> torch.Tensor:
    raw = json.dumps(obj, allow_nan=True, separators=(",", ":")).encode("utf-8")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.zeros(0, dtype=torch.uint8)


def _from_bytes(t: torch.Tensor):
    return json.loads(bytes(t.numpy().tobytes()).decode("utf-8"))


def all_gather_json(obj) -> List[Any]:
    """Every rank's JSON-able ``obj``, in rank order (``[obj]`` with one process)."""
    if not active():
        return [json.loads(json.dumps(obj))]
    return [_from_bytes(t) for t in all_gather_varlen(_json_bytes(obj))]


def broadcast_json(obj, src: int = 0):
    """``obj`` of rank ``src`` on every rank (the others pass anything, e.g. None)."""
    if not active():
        return obj
    d, dev = _dist(), _comm_device()
    data = _json_bytes(obj if d.get_rank() == src else None)
    n = torch.tensor([data.numel()], dtype=torch.int64, device=dev)
    d.broadcast(n, src)
    buf = torch.zeros(int(n.item()), dtype=torch.uint8, device=dev)
    if d.get_rank() == src:
        buf.copy_(data.to(dev))
    d.broadcast(buf, src)
    return _from_bytes(buf.cpu())


def round_robin(n_items: int, r: Optional[int] = None, w: Optional[int] = None) -> List[int]:
    """The items of rank ``r`` of ``w`` (default: this process) when ``n_items`` whole items
    (batches) are dealt in turn: ``r, r + w, r + 2w, ...``.  Each item is computed exactly as
    a single process would, so the results do not depend on the number of ranks."""
    r = rank() if r is None else r
    w = world() if w is None else w
    return list(range(r, n_items, w))


def rounds(n_items: int) -> int:
    """How many items the busiest rank gets from :func:`round_robin` (the number of
    collective forward passes every rank must make when each pass is collective, as under
    FSDP)."""
    w = world()
    return -(-n_items // w)


def encode_tensor(t: torch.Tensor) -> dict:
    """A CPU tensor as JSON (dtype, shape, base64 of its bytes), for the exchanges above."""
    t = t.detach().cpu().contiguous()
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": str(t.dtype).replace("torch.", ""), "shape": list(t.shape),
            "data": base64.b64encode(raw).decode("ascii")}


def decode_tensor(d: dict) -> torch.Tensor:
    dtype = getattr(torch, d["dtype"])
    raw = base64.b64decode(d["data"])
    if not raw:
        return torch.zeros(d["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(d["shape"]).clone()


def gather_in_order(per_rank_items: Sequence[Sequence[Any]], n_items: int) -> List[Any]:
    """Undo :func:`round_robin`: ``per_rank_items[r]`` holds rank r's results in its order;
    the result lists item ``i`` at position ``i``."""
    out: List[Any] = [None] * n_items
    w = len(per_rank_items)
    for r, items in enumerate(per_rank_items):
        for j, x in enumerate(items):
            out[r + j * w] = x
    return out
