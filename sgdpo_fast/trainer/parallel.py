"""The trainer over several processes (``torchrun`` / ``accelerate launch``): DDP or FSDP2.

One process per device; the launcher's environment says how many
(``sgdpo_fast.distributed``).  With one process nothing here changes what the trainer
computes.  With several:

* **The head path as a module.**  The trainer's forward is :class:`LogprobModule`, whose
  ``forward`` runs ``model.head.causal_lm_logprobs`` on the Hugging Face model (backbone,
  then the fused head: no ``[tokens x vocab]`` logits).  Wrapping *that* module is what
  gives DDP its gradient hooks and FSDP2 its unshard / reshard hooks around the head.
* **DDP** (``parallel="ddp"``, the default): ``DistributedDataParallel(LogprobModule(model))``
  on the model itself; accumulation micro-steps run under ``no_sync()``, the last one
  all-reduces.  Every rank holds the whole model, its gradients and AdamW state.
* **FSDP2** (``parallel="fsdp"``): a *sharded twin* of the model is built on the meta device
  (``copy.deepcopy`` with the parameters swapped for meta tensors, so nothing is copied),
  ``fully_shard``-ed per decoder layer (the model's ``_no_split_modules``), per
  untied input embedding and LM head (the head then runs as a registered FSDP forward
  method of its unit, ``model/sharding.py``), and at the root, then filled with the
  model's weights.  Training updates the twin; the weights, gradients and AdamW state
  are 1/world per rank.  At the end :meth:`Parallel.write_back` copies the trained weights
  into the model, so the caller's model object is trained in place as with one process
  (SGPO generates with it next).  Bf16 on CUDA adds ``MixedPrecisionPolicy`` (bf16
  compute and all-gathers, fp32 gradient reduction).
* Both average gradients over ranks; the trainer multiplies each micro-batch's loss by the
  number of ranks, so the step's gradient is the one of the global batch
  (``objectives.py``: the loss of each micro-batch is already normalized by the *global*
  number of pairs or tokens of the step).
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Iterable, List, Optional

import torch

from .. import distributed
from ..model.head import causal_lm_logprobs, unwrap_peft

KINDS = ("ddp", "fsdp")


class LogprobModule(torch.nn.Module):
    """``forward(input_ids, attention_mask, labels) -> log_probs [B, T-1]`` (fp32, 0 off the
    answer) of ``model`` through the fused head (``causal_lm_logprobs``).  Its only
    submodule is ``model`` (so state-dict keys are ``"model." + the model's keys``)."""

    def __init__(self, model: torch.nn.Module, backend: str = "auto"):
        super().__init__()
        self.model = model
        self.backend = backend

    @property
    def device(self) -> torch.device:
        return unwrap_peft(self.model).get_output_embeddings().weight.device

    def forward(self, input_ids, attention_mask, labels):
        return causal_lm_logprobs(self.model, input_ids=input_ids, attention_mask=attention_mask,
                                  labels=labels, backend=self.backend).log_probs


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except Exception:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def whole(t: torch.Tensor) -> torch.Tensor:
    """A DTensor made whole (a collective: every rank must call it); other tensors as they are."""
    return t.full_tensor() if _is_dtensor(t) else t


def _fsdp_modules(module) -> list:
    from torch.distributed.fsdp import FSDPModule
    return [m for m in module.modules() if isinstance(m, FSDPModule)]


class Parallel:
    """How the trainer runs here: ``kind`` is ``"single"`` (one process), ``"ddp"`` or
    ``"fsdp"``; ``wrap`` builds the training module, the rest are the per-kind details the
    training loop needs."""

    def __init__(self, kind: str = "ddp"):
        if kind not in KINDS:
            raise ValueError(f"parallel must be one of {KINDS}, got {kind!r}")
        self.world = distributed.world()
        self.rank = distributed.rank()
        self.kind = "single" if self.world == 1 else kind
        self.base: Optional[LogprobModule] = None
        self.module = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.kind == "fsdp"

    @property
    def collective_forward(self) -> bool:
        """Whether every forward pass is a collective (FSDP2: all-gathers), so every rank must
        make the same number of them."""
        return self.kind == "fsdp"

    @property
    def grad_scale(self) -> float:
        """DDP and FSDP2 average gradients over ranks: losses are multiplied by this to get
        the sum of the ranks' contributions (each normalized by the global batch)."""
        return float(self.world)

    # ------------------------------------------------------------------ building
    def wrap(self, model: torch.nn.Module, backend: str = "auto", bf16: bool = False):
        """The module the training loop calls (see the module docstring)."""
        self.base = LogprobModule(model, backend)
        if self.kind == "single":
            self.module = self.base
        elif self.kind == "ddp":
            import inspect

            from torch.nn.parallel import DistributedDataParallel as DDP
            dev = self.base.device
            # buffers (rotary tables) are the same on every rank: no broadcast at each forward
            sync = ("forward_sync_buffers" if "forward_sync_buffers" in
                    inspect.signature(DDP.__init__).parameters else "broadcast_buffers")
            self.module = DDP(self.base, device_ids=[dev.index] if dev.type == "cuda" else None,
                              **{sync: False})
        else:
            self.module = _sharded_twin(self.base, bf16)
        return self.module

    @property
    def device(self) -> torch.device:
        """Where the training module's computation runs (the batches go there)."""
        return (self.module if self.kind == "fsdp" else self.base).device

    def inference_module(self):
        """The module for gradient-free passes (the reference log-probs): the plain model
        under DDP (no collectives), the sharded twin under FSDP2 (collective: every rank must
        make the same number of passes, see :attr:`collective_forward`)."""
        return self.module if self.kind == "fsdp" else self.base

    def settle(self) -> None:
        """FSDP2: reshard every unit (after gradient-free passes), so the registered
        parameters are the sharded ones the optimizer and checkpoints expect."""
        if self.kind == "fsdp":
            for m in _fsdp_modules(self.module):
                m.reshard()

    def params(self) -> List[torch.nn.Parameter]:
        """The trainable parameters of the training module (the model's own, or the twin's)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def accumulating(self, sync: bool):
        """Around a micro-step's forward and backward: gradients are reduced across ranks only
        when ``sync`` (the step's last micro-batch)."""
        if self.kind == "ddp" and not sync:
            with self.module.no_sync():
                yield
            return
        if self.kind == "fsdp":
            self.module.set_requires_gradient_sync(sync)
        yield

    # ------------------------------------------------------------------ numbers
    def total_norm(self, tensors: Iterable[torch.Tensor], norm_type: float = 2.0) -> float:
        tensors = list(tensors)
        if not tensors:
            return 0.0
        return float(whole(torch.nn.utils.get_total_norm(tensors, norm_type=norm_type)))

    def clip(self, params, max_norm: float) -> float:
        return float(whole(torch.nn.utils.clip_grad_norm_(params, max_norm)))

    # ------------------------------------------------------------------ the end
    def write_back(self) -> None:
        """FSDP2: copy the twin's trained weights into the model (every rank; collective).
        DDP and one process trained the model itself: nothing to do."""
        if self.kind != "fsdp":
            return
        self.settle()
        dst = dict(self.base.named_parameters())
        with torch.no_grad():
            for name, p in self.module.named_parameters():
                full = whole(p.detach())
                dst[name].copy_(full.to(device=dst[name].device, dtype=dst[name].dtype))

    def release(self) -> None:
        """Let go of the wrapping once training is over (or failed): DDP's gradient hooks come
        off the model's parameters at once (not whenever the wrapper is garbage-collected), so
        the next training of the same model (SGPO's next stage) starts clean; the FSDP2 twin
        is dropped."""
        if self.kind == "ddp" and self.module is not None:
            reducer = getattr(self.module, "reducer", None)
            if reducer is not None and hasattr(reducer, "_remove_autograd_hooks"):
                reducer._remove_autograd_hooks()
        if self.kind != "single":
            self.module = None

    def full_state_dict(self) -> dict:
        """The model's state dict with whole tensors (for ``final/``), on every rank."""
        if self.kind == "fsdp":
            self.write_back()
        return self.base.model.state_dict()


def _sharded_twin(base: LogprobModule, bf16: bool):
    """``base`` rebuilt on the meta device, ``fully_shard``-ed, materialized on this rank's
    device and filled with ``base``'s weights (see the module docstring)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dev = distributed.device()
    mesh = init_device_mesh(dev.type, (distributed.world(),))
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"),
                                      requires_grad=p.requires_grad)
            for p in base.parameters()}
    twin = copy.deepcopy(base, memo)
    kw = {"mesh": mesh}
    if bf16 and dev.type == "cuda":
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    inner = unwrap_peft(twin.model)
    layers = set(getattr(inner, "_no_split_modules", None) or ())
    for m in twin.modules():
        if type(m).__name__ in layers:
            fully_shard(m, **kw)
    emb_in, head = inner.get_input_embeddings(), inner.get_output_embeddings()
    if (emb_in is not None and head is not None and head.weight is not emb_in.weight
            and type(head) is torch.nn.Linear and type(emb_in) is torch.nn.Embedding):
        fully_shard(emb_in, **kw)   # untied: each its own unit, whole only while used
        fully_shard(head, **kw)     # the fused head runs as a registered FSDP method of it
    fully_shard(twin, reshard_after_forward=True, **kw)
    twin.to_empty(device=dev)
    with torch.no_grad():           # buffers (rotary tables, ...) are not all in the state dict
        src = dict(base.named_buffers())
        for name, b in twin.named_buffers():
            b.copy_(src[name].to(b.device))
    set_model_state_dict(twin, base.state_dict(), options=StateDictOptions(full_state_dict=True))
    return twin


def check_layout(model, kind: str) -> None:
    """ValueError for a model FSDP2 cannot be used with here (so it fails before any file is
    written)."""
    if kind == "fsdp" and distributed.world() > 1:
        inner = unwrap_peft(model)
        if not getattr(inner, "_no_split_modules", None):
            raise ValueError("parallel='fsdp' needs a transformers model that names its decoder "
                             "layers (_no_split_modules); use parallel='ddp'")


def global_batch(cfg) -> int:
    """Examples per optimizer step over all ranks: per-rank batch x ranks x accumulation."""
    return cfg.batch_size * distributed.world() * cfg.grad_accum


def steps_per_epoch(n_examples: int, cfg) -> int:
    return math.ceil(n_examples / global_batch(cfg))
