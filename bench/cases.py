"""Benchmark shapes and the inputs every method receives (same seed -> same tensors).

A shape is a plain dict: ``{"N", "D", "V"}`` for the ``logprob`` workload,
``{"B", "T", "D", "V"}`` for the ``loss`` workload (B pairs, so 2B rows of T
tokens, chosen rows first).
"""
from __future__ import annotations

from typing import Dict, List

import torch

from .baselines import IGNORE_INDEX  # noqa: F401  (re-exported for the bench modules)

IGNORED_FRACTION = 0.05  # logprob workload: share of ignored target positions
LOGIT_STD = 2.0          # weights scaled so the logits have about this standard deviation

WORKLOADS = ("logprob", "loss")
SHAPE_KEYS = {"logprob": ("N", "D", "V"), "loss": ("B", "T", "D", "V")}

# Default shape sets: (device, quick) -> workload -> list of shapes.
_CPU_D, _CPU_V = 576, 49152          # SmolLM2-135M's head
_GPU_D = 4096

SHAPES = {
    ("cpu", False): {
        "logprob": [dict(N=n, D=_CPU_D, V=_CPU_V) for n in (512, 2048, 8192)],
        "loss": [dict(B=2, T=512, D=_CPU_D, V=_CPU_V)],
    },
    ("cpu", True): {
        "logprob": [dict(N=512, D=_CPU_D, V=_CPU_V)],
        "loss": [dict(B=2, T=128, D=_CPU_D, V=_CPU_V)],
    },
    ("cuda", False): {
        "logprob": [dict(N=n, D=_GPU_D, V=v) for v in (32000, 128256, 256000)
                    for n in (4096, 16384, 32768)],
        "loss": [dict(B=2, T=t, D=_GPU_D, V=128256) for t in (1024, 4096)],
    },
    ("cuda", True): {
        "logprob": [dict(N=n, D=_GPU_D, V=128256) for n in (4096, 8192)],
        "loss": [dict(B=2, T=1024, D=_GPU_D, V=128256)],
    },
}


# Vocabulary sweep (``python -m bench --vocab-sweep``): the log-prob op at one token count and
# hidden size over vocabularies from Llama-2's to Gemma's, where the memory of materialized
# logits grows with V and the fused op's does not.  CPU: small N (a 2-core box); GPU: the
# goal's N.
VOCAB_SWEEP = {
    "cpu": dict(N=1024, D=_CPU_D, V=(32000, 128256, 256000)),
    "cuda": dict(N=8192, D=_GPU_D, V=(32000, 128256, 256000)),
}


def default_shapes(device: str, quick: bool, workload: str) -> List[Dict[str, int]]:
    return [dict(s) for s in SHAPES[(device, quick)][workload]]


def vocab_sweep_shapes(device: str, vocab=None, N=None, D=None) -> List[Dict[str, int]]:
    """``[{"N", "D", "V"}]`` of the vocabulary sweep (defaults: ``VOCAB_SWEEP[device]``)."""
    base = VOCAB_SWEEP[device]
    vs = base["V"] if not vocab else vocab
    if any(int(v) <= 0 for v in vs) or (N is not None and N <= 0) or (D is not None and D <= 0):
        raise ValueError("vocabulary sweep sizes must be positive")
    return [dict(N=N or base["N"], D=D or base["D"], V=int(v)) for v in vs]


def parse_shape(text: str, workload: str) -> Dict[str, int]:
    """``"N=512,D=576,V=49152"`` -> dict; every key of the workload is required."""
    shape = {}
    for part in text.split(","):
        if "=" not in part:
            raise ValueError(f"shape {text!r}: expected KEY=VALUE pairs separated by commas")
        k, v = part.split("=", 1)
        k = k.strip().upper()
        try:
            shape[k] = int(v)
        except ValueError:
            raise ValueError(f"shape {text!r}: {k} must be an integer, got {v!r}") from None
    need = SHAPE_KEYS[workload]
    if set(shape) != set(need):
        raise ValueError(f"shape {text!r} for workload {workload!r} needs exactly the keys {need}")
    if any(v <= 0 for v in shape.values()):
        raise ValueError(f"shape {text!r}: sizes must be positive")
    return shape


def shape_str(shape: Dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in shape.items())


def tokens(workload: str, shape: Dict[str, int]) -> int:
    """Rows of the head GEMM: N, or 2*B*T for the loss."""
    return shape["N"] if workload == "logprob" else 2 * shape["B"] * shape["T"]


def gemm_flops(workload: str, shape: Dict[str, int]) -> float:
    """Head GEMM flops of one fwd+bwd: fwd 2NVD + bwd recompute 2NVD + dH 2NVD + dW 2NVD;
    the loss adds the reference forward (2NVD)."""
    n, v, d = tokens(workload, shape), shape["V"], shape["D"]
    return (8.0 if workload == "logprob" else 10.0) * n * v * d


def parse_dtype(name: str) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise ValueError(f"dtype must be one of {sorted(table)}, got {name!r}")
    return table[name]


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def _gen(seed: int, device="cpu") -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


HEADS = ("random", "smollm2")


def make_logprob_inputs(shape, dtype=torch.float32, device="cpu", seed=0, head="random"):
    """hidden [N, D] and weight [V, D] (``dtype``, requires grad), targets [N] int64 with
    ~5% ``IGNORE_INDEX``, grad [N] fp32 (the upstream gradient of the log-probs).
    Drawn on ``device`` from ``seed`` (same seed and device -> same tensors).
    ``head="smollm2"``: the real LM head of the embedded SmolLM2-135M (D=576, V=49152) and
    hidden states shaped like its final-norm output."""
    N, D, V = shape["N"], shape["D"], shape["V"]
    g = _gen(seed, device)
    kw = dict(generator=g, device=device)
    hidden = torch.randn(N, D, **kw)
    if head == "smollm2":
        from .smollm2 import smollm2_head
        weight, norm = smollm2_head()
        if tuple(weight.shape) != (V, D):
            raise ValueError(f"head='smollm2' is [{weight.shape[0]}, {weight.shape[1]}], "
                             f"the shape asks for [{V}, {D}]")
        weight, hidden = weight.to(device), hidden * norm.to(device)  # like RMSNorm output
    elif head == "random":
        weight = torch.randn(V, D, **kw) * (LOGIT_STD / D ** 0.5)
    else:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    targets = torch.randint(0, V, (N,), **kw)
    targets[torch.rand(N, **kw) < IGNORED_FRACTION] = IGNORE_INDEX
    grad = torch.randn(N, **kw)
    return {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
            "targets": targets, "grad": grad}


def make_loss_inputs(shape, dtype=torch.float32, device="cpu", seed=0):
    """Policy hidden [2B, T, D] and weight [V, D] (requires grad), reference ref_hidden and
    ref_weight (small perturbations of them, no grad), targets [2B, T]: per pair a prompt
    (ignored) shared by both answers, then a response of the same length for chosen and
    rejected (equal lengths make SGDPO with pilot ratios 1 exactly DPO, see reference.py),
    then padding (ignored).  Chosen rows first."""
    B, T, D, V = shape["B"], shape["T"], shape["D"], shape["V"]
    g = _gen(seed, device)
    kw = dict(generator=g, device=device)
    scale = LOGIT_STD / D ** 0.5
    hidden = torch.randn(2 * B, T, D, **kw)
    weight = torch.randn(V, D, **kw) * scale
    ref_hidden = (hidden + 0.05 * torch.randn(2 * B, T, D, **kw)).to(dtype)
    ref_weight = (weight + 0.05 * scale * torch.randn(V, D, **kw)).to(dtype)
    targets = torch.randint(0, V, (2 * B, T), **kw)
    gc = _gen(seed + 1, "cpu")  # prompt and response lengths
    mask = torch.zeros(2 * B, T, dtype=torch.bool)
    for b in range(B):
        p = int(torch.randint(max(1, T // 8), max(2, T // 4 + 1), (1,), generator=gc))
        p = min(p, T - 1)
        lo = max(1, (T - p) // 2)
        length = int(torch.randint(lo, T - p + 1, (1,), generator=gc))
        mask[b, p:p + length] = True
        mask[B + b, p:p + length] = True
    targets[~mask.to(device)] = IGNORE_INDEX
    return {"hidden": hidden.to(dtype).requires_grad_(), "weight": weight.to(dtype).requires_grad_(),
            "ref_hidden": ref_hidden, "ref_weight": ref_weight, "targets": targets}


def make_inputs(workload, shape, dtype=torch.float32, device="cpu", seed=0, head="random"):
    if workload == "logprob":
        return make_logprob_inputs(shape, dtype, device, seed, head)
    if workload == "loss":
        return make_loss_inputs(shape, dtype, device, seed)
    raise ValueError(f"workload must be one of {WORKLOADS}, got {workload!r}")


def tensor_bytes(*ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def grad_bytes(inputs) -> int:
    """Bytes of the gradients every method returns (hidden's and weight's, input dtype)."""
    return tensor_bytes(inputs["hidden"], inputs["weight"])
