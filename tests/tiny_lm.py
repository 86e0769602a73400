"""A tiny random Llama with a character-level tokenizer and a ChatML chat template,
built offline (no download), for the trainer / SGPO / CLI tests: the one in ``bench/``."""
from bench.tiny_lm import SPECIAL, save_tiny, tiny_model, tiny_tokenizer  # noqa: F401

# five preference pairs the trainer tests share
PAIRS = [
    {"prompt": "Say yes.", "chosen": "yes", "rejected": "no way"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
    {"prompt": "Color of sky?", "chosen": "blue", "rejected": "green!"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "Opposite of up?", "chosen": "down", "rejected": "sideways"},
]
