"""Hugging Face causal LMs (layer 2): the head path (``head.py``: backbone -> hidden states
at the answer positions -> fused head), sharded heads (``sharding.py``: ZeRO-3, FSDP2),
offline loading and the embedded SmolLM2 (``loading.py``), chat templates (``chat.py``)
and batched generation (``generation.py``).  transformers is imported only where needed."""
from .chat import CHATML, answer_suffix_ids, chat_prompt
from .head import HeadOutput, causal_lm_logprobs, head_transform_from_config
from .sharding import gathered_lm_head, head_module_logprobs, is_zero3_param, lm_head_logprobs

__all__ = ["CHATML", "answer_suffix_ids", "chat_prompt", "HeadOutput", "causal_lm_logprobs",
           "head_transform_from_config", "gathered_lm_head", "head_module_logprobs",
           "is_zero3_param", "lm_head_logprobs"]
