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


def encode(tokenizer, prompt: str, answer: str, *, max_length: int = 512,
           max_prompt_length: int = 256, system: str = None, formatted: bool = False) -> Encoded:
    """Chat-format ``prompt`` (unless ``formatted``), append ``answer`` and the end-of-turn
    token.  The prompt keeps its last ``max_prompt_length`` tokens; the answer is cut so the
    sequence fits ``max_length``, keeping at least one answer token."""
    text = prompt if formatted else chat_prompt(tokenizer, prompt, system)
    p = tokenizer(text, add_special_tokens=False)["input_ids"][-max_prompt_length:]
    a = tokenizer(answer, add_special_tokens=False)["input_ids"] + answer_suffix_ids(tokenizer)
    room = max(1, max_length - len(p))
    a = a[:room]
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
    through the fused head (``model.head.causal_lm_logprobs``: no full logits)."""
    dev = model.get_output_embeddings().weight.device
    return causal_lm_logprobs(model, input_ids=batch["input_ids"].to(dev),
                              attention_mask=batch["attention_mask"].to(dev),
                              labels=batch["labels"].to(dev), backend=backend).log_probs
