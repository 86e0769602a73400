"""Tokenized training examples and their batches.

A sequence is ``prompt tokens + answer tokens + end-of-turn``; its labels are
``-100`` on the prompt (and on padding) and the token ids on the answer, in
Hugging Face's unshifted convention (the fused head shifts: position ``t``
scores ``labels[t + 1]``).  A preference batch holds the chosen rows first,
then the rejected rows, as ``sgdpo_fast.preference_loss`` expects.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import torch

from ..model.chat import answer_suffix_ids, chat_prompt
from ..model.head import IGNORE, causal_lm_logprobs


@dataclass
class Encoded:
    input_ids: List[int]
    labels: List[int]

    @property
    def n_answer(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


# Tokens near a cut in the text may differ from those of the whole text (a word cut in two);
# this many tokens next to the cut are dropped.  Chunks of text tokenized: the budget per
# token to start with (doubled until enough tokens come out).
_CUT_MARGIN = 8
_CHARS_PER_TOKEN = 8


def _check_text(name: str, text: str) -> None:
    if not isinstance(text, str):
        raise ValueError(f"{name} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} holds a lone surrogate (U+{ord(text[e.start]):04X}) at "
                         f"character {e.start}: not valid Unicode text") from None


def _ids(tokenizer, text: str) -> List[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tail_ids(tokenizer, text: str, n: int) -> List[int]:
    """The last ``n`` token ids of ``text`` (as tokenizing it whole gives them), tokenizing only
    as much of its end as needed: a 2 MB prompt kept to 256 tokens costs a few kB of work."""
    if n <= 0:
        return []
    chars = (n + _CUT_MARGIN) * _CHARS_PER_TOKEN
    while chars < len(text):
        ids = _ids(tokenizer, text[-chars:])
        if len(ids) >= n + _CUT_MARGIN:
            return ids[-n:]
        chars *= 2
    return _ids(tokenizer, text)[-n:]


def head_ids(tokenizer, text: str, n: int) -> List[int]:
    """The first ``n`` token ids of ``text``, tokenizing only as much of its start as needed."""
    if n <= 0:
        return []
    chars = (n + _CUT_MARGIN) * _CHARS_PER_TOKEN
    while chars < len(text):
        ids = _ids(tokenizer, text[:chars])
        if len(ids) >= n + _CUT_MARGIN:
            return ids[:n]
        chars *= 2
    return _ids(tokenizer, text)[:n]


def encode(tokenizer, prompt: str, answer: str, *, max_length: int = 512,
           max_prompt_length: int = 256, system: str = None, formatted: bool = False) -> Encoded:
    """Chat-format ``prompt`` (unless ``formatted``), append ``answer`` and the end-of-turn
    token.  The sequence never exceeds ``max_length`` (>= 2) tokens: the prompt keeps its
    last ``min(max_prompt_length, max_length - 1)`` tokens, the answer fills the rest (at
    least one token; an answer cut short loses its end-of-turn token).  Long texts are not
    tokenized whole (:func:`tail_ids`, :func:`head_ids`)."""
    if max_length < 2 or max_prompt_length < 1:
        raise ValueError(f"max_length must be >= 2 and max_prompt_length >= 1, got "
                         f"{max_length} and {max_prompt_length}")
    _check_text("prompt", prompt)
    _check_text("answer", answer)
    text = prompt if formatted else chat_prompt(tokenizer, prompt, system)
    p = tail_ids(tokenizer, text, min(max_prompt_length, max_length - 1))
    room = max_length - len(p)
    a = (head_ids(tokenizer, answer, room) + answer_suffix_ids(tokenizer))[:room]
    return Encoded(p + a, [IGNORE] * len(p) + a)


def collate(seqs: Sequence[Encoded], pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask``, ``labels`` ([B, T], int64)."""
    T = max(len(s.input_ids) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    att = torch.zeros((len(seqs), T), dtype=torch.long)
    for i, s in enumerate(seqs):
        n = len(s.input_ids)
        ids[i, :n] = torch.tensor(s.input_ids)
        labels[i, :n] = torch.tensor(s.labels)
        att[i, :n] = 1
    return {"input_ids": ids, "attention_mask": att, "labels": labels}


def answer_mask(labels: torch.Tensor) -> torch.Tensor:
    """[B, T-1] bool: the positions whose log-prob the fused head returns for an answer token."""
    return labels[:, 1:] != IGNORE


def token_logps(model, batch, backend: str = "auto") -> torch.Tensor:
    """Per-token log-probs [B, T-1] (fp32, 0 off the answer) of a Hugging Face causal LM,
    through the fused head (``model.head.causal_lm_logprobs``: no full logits).  ``model`` may
    also be the trainer's :class:`parallel.LogprobModule` (itself, under DDP, or its FSDP2
    twin), which is then called (with its own backend), so the wrapper's hooks run."""
    from torch.nn.parallel import DistributedDataParallel

    from .parallel import LogprobModule
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    if isinstance(inner, LogprobModule):
        dev = inner.device
        return model(batch["input_ids"].to(dev), batch["attention_mask"].to(dev),
                     batch["labels"].to(dev))
    dev = model.get_output_embeddings().weight.device
    return causal_lm_logprobs(model, input_ids=batch["input_ids"].to(dev),
                              attention_mask=batch["attention_mask"].to(dev),
                              labels=batch["labels"].to(dev), backend=backend).log_probs
