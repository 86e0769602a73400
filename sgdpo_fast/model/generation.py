"""Batched answer generation for SGPO and eval.

Backends: ``hf`` (transformers ``generate`` with the KV cache, left padding,
batches of ``batch_size`` prompts, sorted by length so a batch pads little) and
``vllm`` (used by ``backend="auto"`` when vLLM is installed and the model is on a
GPU: the current weights are saved to a temporary folder and served by
``vllm.LLM``).  Prompts are chat-formatted by the caller (``models.chat_prompt``).
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch


@dataclass
class GenConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0     # 0: greedy
    top_p: float = 1.0
    batch_size: int = 16
    seed: int = 0
    backend: str = "auto"        # auto | hf | vllm
    progress: bool = True

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
    whether it ended with a stop token (False: cut at ``max_new_tokens``)."""
    cfg = (cfg or GenConfig()).validate()
    if not prompts:
        return ([], []) if with_finished else []
    backend = cfg.backend
    dev = next(model.parameters()).device
    if backend == "auto":
        backend = "vllm" if dev.type == "cuda" and _vllm_available() else "hf"
    if backend == "vllm":
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


def _generate_hf(model, tokenizer, prompts, cfg: GenConfig, desc: str):
    dev = next(model.parameters()).device
    enc = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(enc[i]))
    out: List[Optional[str]] = [None] * len(prompts)
    finished: List[bool] = [False] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = stop_token_ids(model, tokenizer)
    g = torch.Generator(device="cpu").manual_seed(cfg.seed)
    try:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(prompts), desc=desc, disable=not cfg.progress, leave=False)
    except ImportError:  # pragma: no cover
        bar = None
    was_training = model.training
    model.eval()
    try:
        for s in range(0, len(order), cfg.batch_size):
            idx = order[s:s + cfg.batch_size]
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
                    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))
                gen = model.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), **kw)
            for r, i in enumerate(idx):
                new_tokens = gen[r, T:].tolist()
                finished[i] = any(t in eos for t in new_tokens)
                out[i] = tokenizer.decode(new_tokens, skip_special_tokens=True).strip()
            if bar is not None:
                bar.update(len(idx))
    finally:
        model.train(was_training)
        if bar is not None:
            bar.close()
    return out, finished


def _generate_vllm(model, tokenizer, prompts, cfg: GenConfig):  # pragma: no cover
    """vLLM on a snapshot of the current weights (GPU machines with vLLM only; not run in
    this project's CI).  Prompts go in as token ids, tokenized as the HF path does (no
    extra special tokens), with the same stop tokens."""
    from vllm import LLM, SamplingParams

    eos = stop_token_ids(model, tokenizer)
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        tokenizer.save_pretrained(d)
        llm = LLM(model=d, seed=cfg.seed, dtype="auto", enforce_eager=True,
                  gpu_memory_utilization=float(os.environ.get("SGDPO_FAST_VLLM_MEM", "0.3")))
        sp = SamplingParams(max_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, stop_token_ids=eos, skip_special_tokens=True)
        ids = [{"prompt_token_ids": tokenizer(p, add_special_tokens=False)["input_ids"]}
               for p in prompts]
        res = llm.generate(ids, sp)
        out = [r.outputs[0].text.strip() for r in res]
        done = [r.outputs[0].finish_reason == "stop" for r in res]
        del llm
    torch.cuda.empty_cache()
    return out, done
