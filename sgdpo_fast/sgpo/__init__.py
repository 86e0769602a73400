"""SGPO: the self-improving preference loop (policy and improver roles of one model)."""
from .filters import decide, similarity, tukey_fences
from .loop import SGPOConfig, answer_perplexity, run_sgpo
from .prompts import IMPROVER_TEMPLATE, improver_prompt, policy_prompt

__all__ = ["SGPOConfig", "run_sgpo", "answer_perplexity", "decide", "similarity",
           "tukey_fences", "IMPROVER_TEMPLATE", "improver_prompt", "policy_prompt"]
