"""The one path from a Hugging Face causal LM to per-token log-probs: backbone -> hidden
states at the answer positions -> compute dtype -> fused head.  Used by the fused-head
patch (``integrations/hf.py``, and through it TRL), the trainer and SGPO.

Only the backbone (``model.base_model``) runs; its last hidden states at the positions
whose label is not ``-100`` go, with ``lm_head.weight`` (and bias), through the fused op
(``model/sharding.py`` makes a sharded head whole), with the model's own logit transform
(:func:`head_transform_from_config`).  ``lm_head`` is never called and the ``[B, T, V]``
logits are never built.  A PEFT model runs as its inner transformers model (LoRA layers
are in place there); a LoRA ``lm_head`` runs with its merged weight
(``sharding.effective_head``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Sequence, Tuple

import torch

from ..ops.plan import LogprobPlan
from .sharding import head_module_logprobs

IGNORE = -100

__all__ = ["HeadOutput", "causal_lm_logprobs", "head_transform_from_config", "unwrap_peft", "IGNORE"]


def head_transform_from_config(config) -> Tuple[Optional[float], float]:
    """``(softcap, logit_scale)`` the model applies to ``lm_head(h)``, from its config:
    ``final_logit_softcapping`` (Gemma 2/3), ``logit_scale`` (Cohere), ``output_multiplier``
    (Muse Glimmer / Spark), ``lm_head_multiplier`` (Falcon-H1), ``logits_scaling`` (Granite:
    logits are divided by it), looked up in that order as TRL does."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    softcap = getattr(cfg, "final_logit_softcapping", None)
    # TRL 1.16's add_fused_lm_head order: logit_scale, output_multiplier, lm_head_multiplier,
    # logits_scaling
    scale = getattr(cfg, "logit_scale", None)                     # Cohere: logits * scale
    if scale is None:
        scale = getattr(cfg, "output_multiplier", None)           # Muse Glimmer / Spark
    if scale is None:
        scale = getattr(cfg, "lm_head_multiplier", None)          # Falcon-H1: logits * m
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        ls = float(cfg.logits_scaling)                            # Granite: logits / s
        scale = ls if getattr(cfg, "model_type", "") == "hyperclovax" else 1.0 / ls
    return (None if softcap is None else float(softcap)), (1.0 if scale is None else float(scale))


@dataclass
class HeadOutput:
    """``log_probs`` [B, T-1] float32 (``[B, T]`` with pre-shifted labels): log p(label) at
    each scored position, 0 where the label is -100; ``mask`` [B, T-1] bool, the scored
    positions; ``metrics`` name -> [B, T-1] float32 (no gradient, 0 off the mask);
    ``backbone`` the backbone's output (router logits of MoE models, ...)."""

    log_probs: torch.Tensor
    mask: torch.Tensor
    metrics: Dict[str, torch.Tensor] = field(default_factory=dict)
    backbone: Any = None


def unwrap_peft(model):
    """The transformers model inside a PEFT ``PeftModel`` (LoRA and other injected adapters
    live in its layers, so its backbone and head are what to run); other models as they
    are.  Prompt-learning PEFT (prefix / prompt tuning) needs ``PeftModel.forward`` and is
    refused."""
    if not (hasattr(model, "peft_config") and hasattr(model, "get_base_model")):
        return model
    cfg = getattr(model, "active_peft_config", None)
    if cfg is not None and getattr(cfg, "is_prompt_learning", False):
        raise ValueError("prompt-learning PEFT (prefix / prompt tuning) is not supported by sgdpo_fast's "
                         "head path: use LoRA, or call the PeftModel with fused_lm_head=True after "
                         "sgdpo_fast.apply_fused_lm_head(peft_model.get_base_model())")
    return model.get_base_model()


def compute_dtype(weight: torch.Tensor, cast_lm_head_to_fp32: bool = False) -> torch.dtype:
    """The dtype the head runs in: fp32 when asked, the autocast dtype under autocast, else
    the head's own dtype."""
    dev = weight.device.type
    if cast_lm_head_to_fp32:
        return torch.float32
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


def causal_lm_logprobs(model, *args, labels: Optional[torch.Tensor] = None,
                       shift_labels: Optional[torch.Tensor] = None, temperature: float = 1.0,
                       cast_lm_head_to_fp32: bool = False, metrics: Sequence[str] = (),
                       backend: str = "auto", plan: Optional[LogprobPlan] = None,
                       **backbone_kwargs) -> HeadOutput:
    """Per-token log-probs of a transformers ``*ForCausalLM`` without its logits.

    ``labels`` [B, T] are shifted as Hugging Face does (position t scores ``labels[:, t+1]``);
    pre-shifted ``shift_labels`` [B, T] are scored as given.  ``-100`` is not scored.
    ``args`` and ``backbone_kwargs`` (``input_ids``, ``attention_mask``, ...) go to
    ``model.base_model``; the KV cache is off.  ``metrics`` (names of ``sgdpo_fast.ops.METRICS``) come from the same sweep over the
    vocabulary, without gradient.  The head runs in the autocast dtype under autocast (fp32
    with ``cast_lm_head_to_fp32``), with autocast itself off around the op.
    """
    if labels is None and shift_labels is None:
        raise ValueError("causal_lm_logprobs needs labels= (or shift_labels=)")
    model = unwrap_peft(model)
    base = model.base_model
    if base is model:
        raise ValueError("model.base_model is the model itself: not a *ForCausalLM with a head")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError("model has no output embedding (lm_head)")
    backbone_kwargs["use_cache"] = False
    bb = base(*args, **backbone_kwargs)
    hidden = bb.last_hidden_state if hasattr(bb, "last_hidden_state") else bb[0]
    if shift_labels is None:
        hidden, tgt = hidden[:, :-1], labels[:, 1:]
    else:
        tgt = shift_labels
    dev = head.weight.device
    hidden, tgt = hidden.to(dev), tgt.to(dev)
    mask = tgt != IGNORE
    h = hidden[mask].to(compute_dtype(head.weight, cast_lm_head_to_fp32))
    softcap, logit_scale = head_transform_from_config(model.config)
    p = plan if plan is not None else LogprobPlan()
    if metrics:
        p = p.replace(metrics=tuple(metrics))
    with torch.autocast(dev.type, enabled=False):  # h's dtype is the compute dtype
        lp, met = head_module_logprobs(head, h, tgt[mask], temperature=temperature,
                                       softcap=softcap, logit_scale=logit_scale,
                                       backend=backend, plan=p)
    # masked_scatter keeps an all-ignored batch connected to the graph
    log_probs = lp.new_zeros(mask.shape).masked_scatter(mask, lp)
    out_metrics = {k: v.new_zeros(mask.shape).masked_scatter(mask, v) for k, v in met.items()}
    return HeadOutput(log_probs, mask, out_metrics, bb)
