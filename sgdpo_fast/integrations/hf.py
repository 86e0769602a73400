"""Hugging Face causal LMs: a fused LM head that returns per-token log-probs.

Protocol (the one TRL >= 1.0 uses for its own trainers, see
``trl.trainer.utils.add_fused_lm_head``; transformers itself has none)::

    sf.apply_fused_lm_head(model)
    out = model(input_ids, attention_mask=..., labels=labels, fused_lm_head=True)
    out.log_probs   # [B, T-1] float32: log p(labels[:, t+1] | tokens <= t), 0 where -100
    out.loss        # mean NLL over the non-ignored labels (or / num_items_in_batch)

Labels are shifted as Hugging Face does (position t scores ``labels[:, t+1]``);
pre-shifted ``shift_labels=`` are scored as given ([B, T] out).  ``-100`` is
ignored.  Only the backbone runs through the model; its last hidden states and
``lm_head.weight`` (and bias) go through :func:`sgdpo_fast.fused_token_logprobs`,
so the ``[B, T, V]`` logits are never built.  The logit transform of the model
is read from its (text) config: ``final_logit_softcapping`` (Gemma 2/3),
``logit_scale`` (Cohere), ``logits_scaling`` (Granite: logits are divided by
it), ``lm_head_multiplier`` (Falcon-H1).  Without ``fused_lm_head=True`` the
original forward runs (generation is unchanged).

``outputs`` may ask for metric-only fields (entropy, log_sum_sq_probs,
mean_logits, is_top1), computed in the same sweep over the vocabulary as the
log-probs; they carry no gradient.  The computation itself is
``sgdpo_fast.model.head.causal_lm_logprobs`` (shared with the trainer).

Lifetime of the patch (docs/integrations.md, "When to re-apply"): it lives on the model
*object* (``model.forward`` is a small picklable object holding the model and the
options, no closure), so it survives ``copy.deepcopy`` and pickling the whole model
(``torch.save(model)`` and loading that whole pickled object back).  A new model object
(``from_pretrained``, a fresh model given a ``state_dict``, a new process) has no patch,
and :func:`remove_fused_lm_head` removes it.  So that a lost patch fails loudly instead of
``fused_lm_head=True`` being silently ignored by transformers (which then returns full
logits), the first :func:`apply_fused_lm_head` on a model class also makes that class's
``forward`` refuse ``fused_lm_head=True`` with a ``ValueError`` saying to re-apply (in this
process; the call is otherwise unchanged).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import torch

from ..model.head import causal_lm_logprobs, head_transform_from_config, unwrap_peft
from ..ops.plan import METRICS

try:  # transformers is optional for the rest of the package
    from transformers.utils import ModelOutput
except Exception:  # pragma: no cover
    from collections import OrderedDict as ModelOutput  # type: ignore

__all__ = ["apply_fused_lm_head", "remove_fused_lm_head", "has_fused_lm_head", "FusedLMHeadOutput",
           "head_transform_from_config", "OUTPUTS"]  # head_transform_from_config: re-export

OUTPUTS = ("log_probs",) + METRICS
_ORIG = "_sgdpo_fast_original_forward"
_GUARD = "_sgdpo_fast_guarded_forward"


@dataclass
class FusedLMHeadOutput(ModelOutput):
    """Output of ``model(..., labels=..., fused_lm_head=True)``; field names match TRL's
    ``FusedCausalLMOutput`` so TRL's trainers read it unchanged.  Per-token fields are
    [B, T-1] (or [B, T] with ``shift_labels``), 0 / False where the label is -100,
    ``None`` when not requested."""

    loss: Optional[torch.Tensor] = None
    log_probs: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logits: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None
    label_mask: Optional[torch.Tensor] = None
    aux_loss: Optional[torch.Tensor] = None


def has_fused_lm_head(model) -> bool:
    """True when ``model`` (or the model inside a PEFT wrapper) carries
    :func:`apply_fused_lm_head`'s forward."""
    return isinstance(getattr(unwrap_peft(model), "__dict__", {}).get("forward"), _FusedForward)


def remove_fused_lm_head(model) -> None:
    """Undo :func:`apply_fused_lm_head` (restores the forward it wrapped).  Afterwards
    ``model(..., fused_lm_head=True)`` raises (see the module docstring)."""
    model = unwrap_peft(model)
    fwd = model.__dict__.get("forward")
    if not isinstance(fwd, _FusedForward):
        return
    if fwd.original is None:
        model.__dict__.pop("forward", None)
    else:
        model.__dict__["forward"] = fwd.original


def _guard_class(cls) -> None:
    """Make ``cls.forward`` refuse ``fused_lm_head=True`` (an instance without the fused
    head would otherwise pass it down to the backbone, which ignores it).  Once per class."""
    if _GUARD in cls.__dict__:
        return
    orig = cls.forward

    @functools.wraps(orig)
    def forward(self, *args, fused_lm_head=False, **kwargs):
        if fused_lm_head:
            raise ValueError(
                f"this {type(self).__name__} has no fused LM head (a new model object from "
                f"from_pretrained / a state_dict / another process, or remove_fused_lm_head was "
                f"called): call sgdpo_fast.apply_fused_lm_head(model) again before "
                f"model(..., fused_lm_head=True)")
        return orig(self, *args, **kwargs)

    setattr(cls, _GUARD, orig)
    cls.forward = forward


@dataclass(frozen=True)
class _HeadOptions:
    temperature: float
    cast_lm_head_to_fp32: bool
    metrics: Tuple[str, ...]
    backend: str


class _FusedForward:
    """``model.forward`` of a patched model: a plain object holding the model, the options
    and the forward it wraps (no closure), so deepcopy and pickle keep the patch."""

    def __init__(self, model, options: _HeadOptions, original):
        self.model = model
        self.options = options
        self.original = original      # the instance-level forward it wrapped, or None

    @property
    def __signature__(self):
        # `generate` validates its kwargs against the forward's signature
        return inspect.signature(type(self.model).forward.__get__(self.model))

    def _plain(self, *args, **kwargs):
        if self.original is not None:
            return self.original(*args, **kwargs)
        return type(self.model).forward(self.model, *args, **kwargs)

    def __call__(self, *args, fused_lm_head=False, labels=None, shift_labels=None,
                 num_items_in_batch=None, **kwargs):
        if not fused_lm_head:
            for k, v in (("labels", labels), ("shift_labels", shift_labels),
                         ("num_items_in_batch", num_items_in_batch)):
                if v is not None:
                    kwargs[k] = v
            return self._plain(*args, **kwargs)
        if labels is None and shift_labels is None:
            raise ValueError("fused_lm_head=True needs labels= (or shift_labels=)")
        model, opt = self.model, self.options
        cfg = model.config
        text_config = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text_config, "output_router_logits", False):
            kwargs.setdefault("output_router_logits", True)
        out = causal_lm_logprobs(model, *args, labels=labels, shift_labels=shift_labels,
                                 temperature=opt.temperature,
                                 cast_lm_head_to_fp32=opt.cast_lm_head_to_fp32, metrics=opt.metrics,
                                 backend=opt.backend, **kwargs)
        mask, log_probs = out.mask, out.log_probs
        extra = dict(out.metrics)
        if "is_top1" in extra:
            extra["is_top1"] = extra["is_top1"] > 0.5
        denom = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        loss = -log_probs.sum() / denom
        aux = None
        bb = out.backbone
        if kwargs.get("output_router_logits") and getattr(bb, "router_logits", None) is not None:
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
            n_exp = getattr(text_config, "num_local_experts", None) or getattr(text_config, "num_experts")
            aux = load_balancing_loss_func(bb.router_logits, n_exp, text_config.num_experts_per_tok,
                                           kwargs.get("attention_mask"))
            loss = loss + getattr(text_config, "router_aux_loss_coef", 0.0) * aux
        return FusedLMHeadOutput(loss=loss, log_probs=log_probs, label_mask=mask, aux_loss=aux,
                                 **extra)


def apply_fused_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                        outputs: Sequence[str] = ("log_probs",), *, backend: str = "auto"):
    """Give ``model`` (a transformers ``*ForCausalLM``) the ``fused_lm_head=True`` forward.

    Signature compatible with TRL's ``add_fused_lm_head`` (``temperature``,
    ``cast_lm_head_to_fp32``, ``outputs``) so it can replace it.  ``backend``
    picks the log-prob backend (see :func:`sgdpo_fast.fused_token_logprobs`).
    Re-applying replaces the previous fused head.  Apply before wrapping the
    model with PEFT / FSDP; the backbone and head are looked up on every call (LoRA on
    ``lm_head`` runs with its merged weight, see ``sgdpo_fast.model.sharding``).
    Survives deepcopy and pickling; re-apply on every new model object (module
    docstring).  Returns ``model``.
    """
    if not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None:
        raise ValueError("model must be a causal LM with an output embedding (lm_head)")
    target = unwrap_peft(model)   # a PeftModel passes fused_lm_head=True down to its model
    from ..ops.plan import BACKENDS
    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise ValueError(f"outputs: unknown fields {bad}; known {OUTPUTS}")
    remove_fused_lm_head(target)
    _guard_class(type(target))
    options = _HeadOptions(float(temperature), bool(cast_lm_head_to_fp32),
                           tuple(o for o in outputs if o in METRICS), backend)
    target.__dict__["forward"] = _FusedForward(target, options, target.__dict__.get("forward"))
    return model
