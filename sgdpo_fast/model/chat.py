"""Chat-template helpers shared by the trainer, SGPO, generation and eval."""
from __future__ import annotations

from typing import Optional

# SmolLM2's own template (ChatML), used when a tokenizer carries none.
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + "
          "message['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def chat_prompt(tokenizer, user: str, system: Optional[str] = None) -> str:
    """The text a chat model sees before its answer to ``user`` (generation prompt included)."""
    msgs = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in msgs) + "Assistant:"


def answer_suffix_ids(tokenizer) -> list:
    """Token ids that close an answer: the end-of-turn token of a chat template, else eos."""
    end = "<|im_end|>"
    if getattr(tokenizer, "chat_template", None) and end in (tokenizer.chat_template or ""):
        ids = tokenizer.convert_tokens_to_ids([end])
        if ids and ids[0] is not None and ids[0] != tokenizer.unk_token_id:
            return ids
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
