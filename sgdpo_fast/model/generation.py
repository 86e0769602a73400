"""Batched answer generation for SGPO and eval.

Backends: ``hf`` (the default, and the one the tests run: transformers ``generate`` with
the KV cache, left padding, batches of ``batch_size`` prompts, sorted by length so a batch
pads little) and ``vllm`` (optional: ``pip install vllm`` on a CUDA machine; the current
weights are saved to a temporary folder and served by ``vllm.LLM``; ``backend="auto"`` picks
it when vLLM is installed and the model is on a GPU).  Prompts are chat-formatted by the
caller (``models.chat_prompt``).

**Several processes** (``GenConfig.distributed=True`` under ``torchrun`` / ``accelerate
launch``, what SGPO uses): the length-sorted batches are dealt round-robin over the ranks
(batch ``j`` to rank ``j mod world``), each rank generates its whole batches and every rank
gets all answers back, in the order of the prompts.  A batch is the same batch a single
process would generate (same prompts, same padding, same sampling seed: batch ``j``'s seed
is the ``j``-th draw of a generator seeded with ``seed``), so with ``hf`` the answers do not
depend on the number of ranks, up to what the hardware does not promise: kernels may round
differently on other devices, thread counts or library versions, and a greedy argmax
between two nearly equal logits can flip.  They do depend on ``batch_size`` (the padding
and the sampling stream are per batch).  vLLM schedules its own batches, so its answers
can depend on the number of ranks (docs/multi_gpu.md).
"""
from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

from .. import distributed as _dist


@dataclass
class GenConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    backend: str = "hf"          # hf | vllm | auto (vllm when installed and on a GPU)
    progress: bool = True
    distributed: bool = False    # several processes: share the prompts out, gather the answers

    def validate(self) -> "GenConfig":
        """ValueError naming the first setting out of range."""
        for name in ("max_new_tokens", "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        t, p = self.temperature, self.top_p
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"generation backend must be auto, hf or vllm, got {self.backend!r}")
        if not isinstance(self.distributed, bool):
            raise ValueError(f"distributed must be True or False, got {self.distributed!r}")
        return self


def _vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
        return True
    except Exception:
        return False


def generate(model, tokenizer, prompts: Sequence[str], cfg: Optional[GenConfig] = None,
             desc: str = "generate", with_finished: bool = False):
    """Answers (decoded new tokens, special tokens dropped, stripped) for chat-formatted
    ``prompts``, in the order given.  ``with_finished=True`` also returns, per answer,
    whether it ended with a stop token (False: cut at ``max_new_tokens``).

    ``cfg.distributed`` with several processes: every rank passes the same prompts, each
    generates its share (module docstring) and every rank returns all answers."""
    cfg = (cfg or GenConfig()).validate()
    if not prompts:
        return ([], []) if with_finished else []
    backend = cfg.backend
    dev = next(model.parameters()).device
    if backend == "auto":
        backend = "vllm" if dev.type == "cuda" and _vllm_available() else "hf"
    if backend == "vllm":
        if not _vllm_available():
            raise ValueError("generation backend 'vllm' needs vLLM (pip install vllm, on a CUDA "
                             "machine); the default backend is 'hf'")
        texts, done = _generate_vllm(model, tokenizer, prompts, cfg)
    elif backend == "hf":
        texts, done = _generate_hf(model, tokenizer, prompts, cfg, desc)
    else:
        raise ValueError(f"generation backend must be auto, hf or vllm, got {cfg.backend!r}")
    return (texts, done) if with_finished else texts


def stop_token_ids(model, tokenizer) -> List[int]:
    """eos of the tokenizer, the model's own generation stop tokens, and ChatML's end of turn."""
    ids = []
    gc = getattr(model, "generation_config", None)
    for x in (tokenizer.eos_token_id, getattr(gc, "eos_token_id", None),
              tokenizer.convert_tokens_to_ids("<|im_end|>")):
        for i in (x if isinstance(x, (list, tuple)) else [x]):
            if isinstance(i, int) and i != tokenizer.unk_token_id and i not in ids:
                ids.append(i)
    return ids


def generation_batches(tokenizer, prompts: Sequence[str], batch_size: int):
    """``(token ids per prompt, batches)``: the prompts' indices sorted by token length
    (stable), cut into batches of ``batch_size``: the batches ``generate`` runs."""
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    return enc, [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def batch_seeds(seed: int, n_batches: int) -> List[int]:
    """The sampling seed of each batch: the ``j``-th draw of a generator seeded ``seed``
    (batch ``j``'s seed does not depend on which batches a rank generates)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [int(torch.randint(0, 2**31 - 1, (1,), generator=g)) for _ in range(n_batches)]


def _share(results: dict, n: int, sharded: bool):
    """``results`` {prompt index: (text, finished)} of this rank -> (texts, finished) of all
    ``n`` prompts, gathered from every rank when ``sharded`` (JSON exchange)."""
    if sharded:
        merged = {}
        for part in _dist.all_gather_json({str(k): v for k, v in results.items()}):
            merged.update({int(k): v for k, v in part.items()})
        results = merged
    return [results[i][0] for i in range(n)], [bool(results[i][1]) for i in range(n)]


def _generate_hf(model, tokenizer, prompts, cfg: GenConfig, desc: str):
    dev = next(model.parameters()).device
    enc, batches = generation_batches(tokenizer, prompts, cfg.batch_size)
    seeds = batch_seeds(cfg.seed, len(batches))
    sharded = cfg.distributed and _dist.world() > 1
    mine = _dist.round_robin(len(batches)) if sharded else range(len(batches))
    results = {}
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(model, tokenizer)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=desc, disable=not (cfg.progress and _dist.is_main()),
                   leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    was_training = model.training
    model.eval()
    try:
        for j in mine:
            idx = batches[j]
            T = max(len(enc[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            att = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding: every prompt ends at column T-1
                ids[r, T - len(enc[i]):] = torch.tensor(enc[i])
                att[r, T - len(enc[i]):] = 1
            kw = dict(max_new_tokens=cfg.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
                      use_cache=True)
            sample = cfg.temperature > 0
            if sample:
                kw.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p)
            else:
                kw.update(do_sample=False, temperature=None, top_p=None, top_k=None)
            # sampling draws from torch's global RNG: fork it, so generating leaves the
            # caller's random state (e.g. a training run's) untouched
            with torch.no_grad(), torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
                if sample:
                    torch.manual_seed(seeds[j])
                gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw)
            for r, i in enumerate(idx):
                new_tokens = gen[r, T:].tolist()
                results[i] = (tokenizer.decode(new_tokens, skip_special_tokens=True).strip(),
                              any(t in eos for t in new_tokens))
            if bar is not None:
                bar.update(len(idx) * (_dist.world() if sharded else 1))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return _share(results, len(prompts), sharded)


def _generate_vllm(model, tokenizer, prompts, cfg: GenConfig):  # pragma: no cover
    """vLLM on a snapshot of the current weights (GPU machines with vLLM only; not run in
    this project's CI).  Prompts go in as token ids, tokenized as the HF path does (no
    extra special tokens), with the same stop tokens.  An fp32 model is snapshot in bf16.

    Several processes (``cfg.distributed``): local rank 0 of each machine writes the
    snapshot, every rank runs one engine on its own GPU as a data-parallel replica
    (``distributed_executor_backend="external_launcher"``, which shares torchrun's process
    group instead of starting its own) on its share of the batches, and the answers are
    gathered on every rank."""
    from vllm import LLM, SamplingParams

    eos = stop_token_ids(model, tokenizer)
    sharded = cfg.distributed and _dist.world() > 1
    enc, batches = generation_batches(tokenizer, prompts, cfg.batch_size)
    mine = [i for j in (_dist.round_robin(len(batches)) if sharded else range(len(batches)))
            for i in batches[j]]
    token = _dist.broadcast_json(os.urandom(8).hex()) if sharded else os.urandom(8).hex()
    d = os.path.join(tempfile.gettempdir(), f"sgdpo_fast_vllm_{token}")
    writer = _dist.local_rank() == 0 if sharded else True
    dtype = torch.bfloat16 if next(model.parameters()).dtype == torch.float32 else None
    try:
        if writer:
            sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
                  for k, v in model.state_dict().items()}
            model.save_pretrained(d, state_dict=sd)
            tokenizer.save_pretrained(d)
        _dist.barrier()
        kw = dict(seed=cfg.seed, dtype="bfloat16" if dtype is not None else "auto",
                  enforce_eager=True,
                  gpu_memory_utilization=float(os.environ.get("SGDPO_FAST_VLLM_MEM", "0.3")))
        if sharded:
            kw.update(distributed_executor_backend="external_launcher", tensor_parallel_size=1,
                      data_parallel_size=_dist.world())
        llm = LLM(model=d, **kw)
        sp = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, stop_token_ids=eos, skip_special_tokens=True)
        res = llm.generate([{"prompt_token_ids": enc[i]} for i in mine], sp) if mine else []
        results = {i: (r.outputs[0].text.strip(), r.outputs[0].finish_reason == "stop")
                   for i, r in zip(mine, res)}
        del llm
    finally:
        _dist.barrier()
        if writer:
            shutil.rmtree(d, ignore_errors=True)
    torch.cuda.empty_cache()
    return _share(results, len(prompts), sharded)
