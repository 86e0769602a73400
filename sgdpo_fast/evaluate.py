"""Checker accuracy of a model on task records (``sgdpo_fast.data.tasks``).

Greedy answers to the chat-formatted prompts, scored by each record's checker;
reports overall and per-family accuracy and can write every answer as JSONL.
"""
from __future__ import annotations

from typing import Optional, Sequence

from .data.records import DataError, write_jsonl
from .data.tasks import accuracy, check
from .model.generation import GenConfig, generate
from .model.chat import chat_prompt


def evaluate(model, tokenizer, records: Sequence[dict], gen: Optional[GenConfig] = None,
             system: Optional[str] = None, answers_path: Optional[str] = None) -> dict:
    """``{"overall", "by_family", "n"}`` (+ ``"answers"``) for task ``records``."""
    for n, r in enumerate(records):
        if "family" not in r or "check" not in r:
            raise DataError(f"record {n} ({r.get('id', '?')}) has no checker: eval needs task "
                             f"records (bundled:heldout, or files written by sgdpo_fast.data.tasks)")
    gen = gen or GenConfig(max_new_tokens=32)
    answers = generate(model, tokenizer, [chat_prompt(tokenizer, r["prompt"], system)
                                          for r in records], gen, desc="eval")
    res = accuracy(records, answers)
    if answers_path:
        write_jsonl(answers_path, [{"id": r.get("id"), "family": r["family"], "prompt": r["prompt"],
                                    "answer": a, "reference": r.get("response"),
                                    "correct": check(r, a)} for r, a in zip(records, answers)])
    res["answers"] = answers
    return res


def format_table(before: dict, after: Optional[dict] = None) -> str:
    """Markdown table of accuracy by family (before / after / change)."""
    fams = sorted(before["by_family"])
    if after is None:
        lines = ["| family | accuracy |", "|---|---|"]
        lines += [f"| {f} | {before['by_family'][f]:.2f} |" for f in fams]
        lines.append(f"| **overall** (n={before['n']}) | {before['overall']:.3f} |")
        return "\n".join(lines)
    lines = ["| family | before | after | change |", "|---|---|---|---|"]
    for f in fams:
        b, a = before["by_family"][f], after["by_family"].get(f, float("nan"))
        lines.append(f"| {f} | {b:.2f} | {a:.2f} | {a - b:+.2f} |")
    lines.append(f"| **overall** (n={before['n']}) | {before['overall']:.3f} | "
                 f"{after['overall']:.3f} | {after['overall'] - before['overall']:+.3f} |")
    return "\n".join(lines)
