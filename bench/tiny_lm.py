"""A tiny random Llama with a character-level tokenizer and a ChatML template, built offline,
for ``python -m bench.quality --quick`` (a format check in seconds, not a measurement) and
for the tests (``tests/tiny_lm.py`` re-exports it)."""
from __future__ import annotations

import os

import torch

SPECIAL = ["<pad>", "<|im_start|>", "<|im_end|>", "<unk>"]


def tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sgdpo_fast.model.chat import CHATML

    vocab = {s: i for i, s in enumerate(SPECIAL)}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL)
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                 unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    tk.chat_template = CHATML
    return tk


def tiny_model(seed: int = 0, vocab: int = len(SPECIAL) + 96, dropout: float = 0.0,
               tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=1024, pad_token_id=0, eos_token_id=2,
                      bos_token_id=None, attention_dropout=dropout, tie_word_embeddings=tie)
    return LlamaForCausalLM(cfg)


def save_tiny(path: str, seed: int = 0) -> str:
    """Write the tiny model and tokenizer to ``path`` (once) and return it."""
    if not os.path.isfile(os.path.join(path, "config.json")):
        tmp = path + ".tmp"
        tiny_model(seed).save_pretrained(tmp)
        tiny_tokenizer().save_pretrained(tmp)
        os.replace(tmp, path)
    return path
