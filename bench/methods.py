"""The methods under comparison: one small builder per method.

Every method is a ``Method`` with

* ``check(device) -> None | str``: ``None`` when it can run here, else the reason
  (recorded as an ``unavailable: <reason>`` row, never dropped);
* ``build(device, accuracy=False) -> fn``: the callable the runner times.

``logprob`` workload: ``fn(hidden [N,D], weight [V,D], targets [N]) -> logp [N]`` float32,
0 at ignored positions, differentiable (the runner calls ``logp.backward(grad)``).

``loss`` workload: ``fn(inputs) -> loss`` scalar, differentiable w.r.t. ``inputs["hidden"]``
and ``inputs["weight"]`` (the reference forward runs inside, without grad).
``build(..., accuracy=True)`` may return a deterministic configuration for the
accuracy check (SGDPO with pilot ratios 1: see ``reference.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

from .baselines import eager_logprobs
from .cases import IGNORE_INDEX

BETA = 0.1
TRL_VOCAB_CHUNK = 32768  # the vocabulary chunk TRL's trainer passes (trl.trainer.utils)


@dataclass
class Method:
    name: str
    workload: str
    label: str
    check: Callable[[str], Optional[str]]
    build: Callable[..., Callable]
    # loss workload: which fp64 objective the accuracy run is compared with, and the factor
    # of its gradient (SGDPO with pilots = whole responses has half of DPO's gradient).
    objective: str = "dpo"
    grad_scale: float = 1.0
    notes: str = ""


# --------------------------------------------------------------------------- helpers

def _first_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {msg[0] if msg else ''}"[:300]


def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"{module} not importable ({_first_line(exc)})"
    return None


def _masked_scatter_back(values, mask):
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


# --------------------------------------------------------------------------- logprob: eager

def _build_eager(device, accuracy=False):
    return eager_logprobs


# --------------------------------------------------------------------------- logprob: TRL

def _check_trl(device):
    why = _import_error("trl.kernels")
    if why:
        return why
    if not hasattr(importlib.import_module("trl.kernels"), "ChunkedLogProbFunction"):
        return "trl.kernels has no ChunkedLogProbFunction in this trl version"
    return None


def _build_trl(device, accuracy=False):
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels import chunked_logprob as _cl

    compact = _cl._use_triton(torch.device(device))

    def fn(hidden, weight, targets):
        # Mirrors trl.trainer.utils' fused LM head: on Triton devices only valid positions
        # are scored, elsewhere every position with clamped targets, then masked.
        mask = targets != IGNORE_INDEX
        if compact:
            out = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0,
                                               TRL_VOCAB_CHUNK, None, 1.0, ())
            return _masked_scatter_back(out[0].float(), mask)
        out = ChunkedLogProbFunction.apply(hidden, weight, None, targets.clamp(min=0), 1.0,
                                           TRL_VOCAB_CHUNK, None, 1.0, ())
        return out[0].float().masked_fill(~mask, 0.0)
    return fn


# --------------------------------------------------------------------------- logprob: Liger

def _check_liger_flce(device):
    why = _import_error("liger_kernel.transformers.fused_linear_cross_entropy")
    if why:
        return why
    if device != "cuda":
        # Triton kernels: try a tiny call; record why it cannot run (unless it does).
        try:
            fn = _build_liger_flce(device)
            h = torch.randn(4, 8, requires_grad=True)
            w = torch.randn(16, 8, requires_grad=True)
            fn(h, w, torch.tensor([1, 2, IGNORE_INDEX, 3])).sum().backward()
        except Exception as exc:
            return f"Triton kernels need CUDA ({_first_line(exc)})"
    return None


def _build_liger_flce(device, accuracy=False):
    from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    loss_fn = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, reduction="none")

    def fn(hidden, weight, targets):
        return -loss_fn(weight, hidden, targets).float()  # per-token CE = -logp, 0 at ignored
    return fn


# --------------------------------------------------------------------------- logprob: CCE

def _check_cce(device):
    return _import_error("cut_cross_entropy")


def _build_cce(device, accuracy=False):
    from cut_cross_entropy import linear_cross_entropy
    impl = "cce" if device == "cuda" else "torch_compile"

    def fn(hidden, weight, targets):
        return -linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX,
                                     reduction="none", impl=impl).float()
    return fn


# --------------------------------------------------------------------------- logprob: ours

def _ours_check(backend):
    def check(device):
        why = _import_error("sgdpo_fast")
        if why:
            return why
        if backend == "cpu" and device != "cpu":
            return "the cpu backend runs on CPU tensors"
        if backend in ("triton", "cuda") and device != "cuda":
            return f"the {backend} backend needs a CUDA device"
        try:
            from sgdpo_fast.ops import backends
            backends.resolve(backend, device)
        except ValueError as exc:
            return str(exc)
        if backend == "cuda":
            from sgdpo_fast.ops import native
            if native.cuda_epilogue() is None:
                return f"CUDA extension not built ({native.why_missing()})"
        return None
    return check


def _ours_build(backend):
    def build(device, accuracy=False):
        import sgdpo_fast as sf

        def fn(hidden, weight, targets):
            return sf.fused_token_logprobs(hidden, weight, targets, backend=backend)
        return fn
    return build


def _ours_auto_check(device):
    if device != "cuda":
        return "auto on CPU is the cpu backend (ours_cpu)"
    return _ours_check("auto")(device)


# --------------------------------------------------------------------------- loss: eager

def eager_seq_logps(hidden, weight, targets):
    """TRL-style: materialized logits, fp32 log_softmax, gather, masked sum per row."""
    per_tok = eager_logprobs(hidden, weight, targets)
    return per_tok.sum(-1), per_tok


def eager_dpo_loss(inputs, beta=BETA):
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]
    pol, _ = eager_seq_logps(h, w, t)
    with torch.no_grad():
        ref, _ = eager_seq_logps(inputs["ref_hidden"], inputs["ref_weight"], t)
    B = t.shape[0] // 2
    logits = (pol[:B] - ref[:B]) - (pol[B:] - ref[B:])
    return -F.logsigmoid(beta * logits).mean()


def draw_pilot_masks(mask, r1, r2, generator=None):
    """SGDPO "Pilot_d" draw (DESIGN.md): per pair m = min(len_w, len_l), k_w = max(floor(r1 m), 1)
    positions uniformly without replacement from the chosen response, k_l likewise from
    the rejected one, independently.  mask [2B, T] bool (chosen rows first)."""
    B = mask.shape[0] // 2
    lens = mask.sum(-1)
    m = torch.minimum(lens[:B], lens[B:])
    k = torch.cat([torch.clamp((r1 * m).floor(), min=1), torch.clamp((r2 * m).floor(), min=1)])
    scores = torch.rand(mask.shape, generator=generator, device="cpu").to(mask.device)
    scores = scores.masked_fill(~mask, 2.0)  # non-response positions sort last
    rank = scores.argsort(-1).argsort(-1)
    return (rank < k[:, None].to(rank.device)) & mask


def eager_sgdpo_loss(inputs, beta=BETA, r1=0.6, r2=0.9, generator=None):
    h, w, t = inputs["hidden"], inputs["weight"], inputs["targets"]
    mask = t != IGNORE_INDEX
    _, pol_tok = eager_seq_logps(h, w, t)
    with torch.no_grad():
        _, ref_tok = eager_seq_logps(inputs["ref_hidden"], inputs["ref_weight"], t)
    B = t.shape[0] // 2
    diff = pol_tok - ref_tok
    D = diff.sum(-1)
    pilots = draw_pilot_masks(mask, r1, r2, generator)
    P = (diff.detach() * pilots).sum(-1)  # stop-gradient pilots
    z1 = beta * (D[:B] - P[B:])
    z2 = beta * (P[:B] - D[B:])
    return (0.5 * F.softplus(-z1) + 0.5 * F.softplus(-z2)).mean()


def _build_eager_dpo(device, accuracy=False):
    return eager_dpo_loss


def _build_eager_sgdpo(device, accuracy=False):
    gen = torch.Generator(device="cpu")
    gen.manual_seed(0)
    r = (1.0, 1.0) if accuracy else (0.6, 0.9)
    return lambda inputs: eager_sgdpo_loss(inputs, BETA, r[0], r[1], gen)


# --------------------------------------------------------------------------- loss: Liger

def _check_liger_dpo(device):
    return _import_error("liger_kernel.chunked_loss")


def _build_liger_dpo(device, accuracy=False):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss
    loss_fn = LigerFusedLinearDPOLoss(ignore_index=IGNORE_INDEX, beta=BETA, use_ref_model=True,
                                      loss_type="sigmoid")

    def fn(inputs):
        out = loss_fn(inputs["weight"], inputs["hidden"], inputs["targets"], None,
                      inputs["ref_hidden"], inputs["ref_weight"], None)
        return out[0] if isinstance(out, tuple) else out
    return fn


# --------------------------------------------------------------------------- loss: ours

def _check_ours_loss(device):
    return _import_error("sgdpo_fast.losses")


def _ours_loss_build(loss_type):
    def build(device, accuracy=False):
        from sgdpo_fast.losses import FusedLinearPreferenceLoss
        kwargs = dict(loss_type=loss_type, beta=BETA, ignore_index=IGNORE_INDEX)
        if loss_type == "sgdpo" and accuracy:
            kwargs.update(pilot_ratio_chosen=1.0, pilot_ratio_rejected=1.0)
        loss_fn = FusedLinearPreferenceLoss(**kwargs)
        gen = torch.Generator(device="cpu")
        gen.manual_seed(0)

        def fn(inputs):
            extra = {"generator": gen} if loss_type == "sgdpo" else {}
            loss, _ = loss_fn(inputs["weight"], inputs["hidden"], inputs["targets"], None,
                              ref_hidden=inputs["ref_hidden"], ref_weight=inputs["ref_weight"],
                              **extra)
            return loss
        return fn
    return build


# --------------------------------------------------------------------------- registry

def _always(device):
    return None


METHODS: List[Method] = [
    # workload (a): the log-prob op
    Method("eager", "logprob", "eager PyTorch (logits + log_softmax + gather)", _always, _build_eager),
    Method("trl_chunked", "logprob", "TRL ChunkedLogProbFunction", _check_trl, _build_trl),
    Method("liger_flce", "logprob", "Liger fused linear CE (reduction=none)", _check_liger_flce,
           _build_liger_flce),
    Method("cce", "logprob", "Cut Cross-Entropy linear_cross_entropy", _check_cce, _build_cce,
           notes="impl=cce on CUDA (default filter_eps), torch_compile on CPU"),
    Method("ours_cpu", "logprob", "ours: cpu backend (C++ epilogue)", _ours_check("cpu"),
           _ours_build("cpu")),
    Method("ours_triton", "logprob", "ours: triton backend", _ours_check("triton"), _ours_build("triton")),
    Method("ours_cuda", "logprob", "ours: cuda backend (cuBLAS + CUDA epilogue)", _ours_check("cuda"),
           _ours_build("cuda")),
    Method("ours_torch", "logprob", "ours: torch backend (torch epilogue)", _ours_check("torch"),
           _ours_build("torch")),
    Method("ours_auto", "logprob", "ours: backend='auto' (per shape from the shipped table)",
           _ours_auto_check, _ours_build("auto")),
    # workload (b): the whole preference loss, reference forward included
    Method("eager_dpo", "loss", "eager TRL-style DPO (materialized logits)", _always, _build_eager_dpo),
    Method("eager_sgdpo", "loss", "eager SGDPO (materialized logits)", _always, _build_eager_sgdpo,
           objective="dpo", grad_scale=0.5),
    Method("liger_dpo", "loss", "Liger LigerFusedLinearDPOLoss (torch.compile, chunked)",
           _check_liger_dpo, _build_liger_dpo),
    Method("ours_dpo", "loss", "ours: FusedLinearPreferenceLoss(loss_type='sigmoid')",
           _check_ours_loss, _ours_loss_build("sigmoid")),
    Method("ours_sgdpo", "loss", "ours: FusedLinearPreferenceLoss(loss_type='sgdpo')",
           _check_ours_loss, _ours_loss_build("sgdpo"), objective="dpo", grad_scale=0.5),
]

BY_NAME = {m.name: m for m in METHODS}


def methods_for(workload: str, names=None) -> List[Method]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; known: {sorted(BY_NAME)}")
    return [m for m in METHODS if m.workload == workload and (not names or m.name in names)]
