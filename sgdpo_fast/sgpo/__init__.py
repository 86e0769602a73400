"""SGPO: the self-improving preference loop (policy and improver roles of one model)."""
from .filters import decide, similarity, tukey_fences
from .loop import (POLICY_TARGETS, SGPOConfig, answer_perplexity, improver_examples,
                   improver_stage, run_sgpo)
from .prompts import IMPROVER_TEMPLATE, improver_prompt, policy_prompt

__all__ = ["SGPOConfig", "POLICY_TARGETS", "run_sgpo", "improver_stage", "improver_examples",
           "answer_perplexity", "decide", "similarity", "tukey_fences", "IMPROVER_TEMPLATE", "improver_prompt", "policy_prompt"]
