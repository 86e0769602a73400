"""A tiny random Llama with a character-level tokenizer and a ChatML chat template,
built offline (no download), for the trainer / SGPO / CLI tests: the one in ``bench/``."""
from bench.tiny_lm import SPECIAL, save_tiny, tiny_model, tiny_tokenizer  # noqa: F401
