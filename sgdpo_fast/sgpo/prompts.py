"""SGPO's two roles of one model, chosen by prompt template.

The paper's exact improver prompt is not public; this is ours (configurable
through ``SGPOConfig.improver_template``, which must contain ``{prompt}`` and
``{draft}``).  The policy role is the plain user prompt.
"""
from __future__ import annotations

IMPROVER_TEMPLATE = (
    "Improve the draft answer to the instruction below. Keep what is right, fix what is "
    "wrong, and reply with the improved answer only.\n\n"
    "Instruction:\n{prompt}\n\nDraft answer:\n{draft}")


def policy_prompt(prompt: str) -> str:
    return prompt


def improver_prompt(prompt: str, draft: str, template: str = IMPROVER_TEMPLATE) -> str:
    return template.format(prompt=prompt, draft=draft if draft.strip() else "(empty)")
