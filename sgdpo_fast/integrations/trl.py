"""TRL integration: an SGDPO-capable DPO trainer and a patch for TRL's fused LM head.

Supported TRL: ``trl>=1.16,<2`` (tested with 1.16.0).  The hook points below
are TRL internals, so :func:`_check_hooks` verifies at import that they exist
and fails with a clear error if a future 1.x moves them.  TRL gives every
trainer the same fused-LM-head protocol, which is what this module hooks:

* ``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
  outputs)`` patches ``model.forward`` so ``model(..., labels=,
  fused_lm_head=True)`` returns per-token ``log_probs`` (+ metric fields);
  the DPO trainer calls it, by the name it imported into
  ``trl.trainer.dpo_trainer``, on the policy and the reference model in
  ``DPOTrainer.__init__``.
* Inside that forward the projection runs through
  ``trl.trainer.utils._ChunkedLogProbFunction`` (TRL's own chunked kernel),
  looked up as a module global on every call.
* ``DPOTrainer._compute_loss(model, inputs, return_outputs)`` (wrapped by
  ``compute_loss``) computes the loss from the *summed* log-probs of each
  sequence.

:class:`SGDPOTrainer` therefore (1) swaps ``add_fused_lm_head`` for
:func:`sgdpo_fast.apply_fused_lm_head` while ``DPOTrainer.__init__`` runs, so
both models' heads run our op (hidden states + ``lm_head.weight``, never the
logits) for *every* TRL loss type, and (2) overrides ``_compute_loss`` for
``loss_type="sgdpo"`` only, because SGDPO's pilots need the *per-token*
log-ratios that TRL sums away; every other loss type is TRL's own code.

:func:`patch_trl` swaps ``_ChunkedLogProbFunction`` (all TRL 1.x trainers: DPO,
KTO, SFT, GRPO, RLOO) for a shim running our op; :func:`unpatch_trl` restores it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import trl
from packaging.version import Version
from trl import DPOConfig, DPOTrainer

from ..model.sharding import head_logprobs_and_metrics
from ..ops.plan import METRICS, LogprobPlan
from .hf import apply_fused_lm_head

SUPPORTED_TRL = ">=1.16,<2"
if not Version("1.16") <= Version(trl.__version__) < Version("2"):  # pragma: no cover
    raise ImportError(f"sgdpo_fast.integrations.trl supports trl{SUPPORTED_TRL}, found {trl.__version__}")

def _check_hooks():
    import trl.trainer.dpo_trainer as dpo_mod
    import trl.trainer.utils as tu
    missing = [name for ok, name in (
        (hasattr(dpo_mod, "add_fused_lm_head"), "trl.trainer.dpo_trainer.add_fused_lm_head"),
        (hasattr(tu, "_ChunkedLogProbFunction"), "trl.trainer.utils._ChunkedLogProbFunction"),
        (hasattr(DPOTrainer, "_compute_loss"), "trl.DPOTrainer._compute_loss"),
    ) if not ok]
    if missing:  # pragma: no cover
        raise ImportError(f"trl {trl.__version__} lacks the hook points sgdpo_fast uses: {missing}; "
                          f"supported: trl{SUPPORTED_TRL}")


_check_hooks()

__all__ = ["SGDPOConfig", "SGDPOTrainer", "patch_trl", "unpatch_trl", "SUPPORTED_TRL"]

_PILOT_MODES = ("different", "same")


@dataclass
class SGDPOConfig(DPOConfig):
    """``DPOConfig`` plus SGDPO (``loss_type="sgdpo"``) and the fused-head options.

    Every TRL loss type keeps working; ``"sgdpo"`` must be the only loss type.
    """

    pilot_ratio_chosen: float = field(default=0.6, metadata={
        "help": "SGDPO r1: fraction of min(len_w, len_l) chosen-response positions in the chosen pilot."})
    pilot_ratio_rejected: float = field(default=0.9, metadata={
        "help": "SGDPO r2: fraction of min(len_w, len_l) rejected-response positions in the rejected pilot."})
    pilot_mode: str = field(default="different", metadata={
        "help": "'different' (Pilot_d, independent draws, the paper's) or 'same' (Pilot_s, one index set)."})
    pilot_grad: bool = field(default=False, metadata={
        "help": "Backpropagate through the pilots (the released code treats them as constants)."})
    pilot_seed: Optional[int] = field(default=None, metadata={
        "help": "Seed of the pilot generator (per process: seed + process index); None uses `seed`."})
    fused_backend: str = field(default="auto", metadata={
        "help": "Backend of sgdpo_fast's log-prob op: auto, torch, cpu, triton or cuda."})
    head_metrics: bool = field(default=True, metadata={
        "help": "With loss_type='sgdpo': log entropy / mean logits / token accuracy like TRL does "
                "(one extra no-grad GEMM pass over the vocabulary). TRL's own loss types always log them."})

    def __post_init__(self):
        super().__post_init__()
        if "sgdpo" in self.loss_type:
            if list(self.loss_type) != ["sgdpo"]:
                raise ValueError(f"loss_type: 'sgdpo' cannot be combined with other loss types, got {self.loss_type}")
            for name in ("pilot_ratio_chosen", "pilot_ratio_rejected"):
                r = getattr(self, name)
                if not 0.0 < r <= 1.0:
                    raise ValueError(f"{name} must be in (0, 1], got {r}")
            if self.pilot_mode not in _PILOT_MODES:
                raise ValueError(f"pilot_mode must be one of {_PILOT_MODES}, got {self.pilot_mode!r}")
            if self.precompute_ref_log_probs:
                raise ValueError("loss_type='sgdpo' needs per-token reference log-probs: "
                                 "precompute_ref_log_probs=True stores only their sums")
            if self.ld_alpha is not None or self.use_weighting or self.f_divergence_type != "reverse_kl":
                raise ValueError("loss_type='sgdpo' does not support ld_alpha, use_weighting or "
                                 "f_divergence_type other than 'reverse_kl'")
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")


@contextlib.contextmanager
def _our_head_in_dpo_init(backend: str, only_log_probs: bool):
    """While ``DPOTrainer.__init__`` runs, its ``add_fused_lm_head`` installs our head."""
    import trl.trainer.dpo_trainer as dpo_mod

    saved = dpo_mod.add_fused_lm_head

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        return apply_fused_lm_head(model, temperature, cast_lm_head_to_fp32,
                                   ("log_probs",) if only_log_probs else outputs, backend=backend)

    dpo_mod.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        dpo_mod.add_fused_lm_head = saved


class SGDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with sgdpo_fast's fused LM head and ``loss_type="sgdpo"``.

    Same constructor as ``DPOTrainer``; ``args`` may be an :class:`SGDPOConfig`
    (a plain ``DPOConfig`` works for TRL's loss types).  Logged metrics for
    SGDPO: TRL's ``rewards/*``, ``logps/*`` (and, with ``head_metrics``,
    ``entropy``, ``logits/*``, ``mean_token_accuracy``), plus the loss's own
    metrics (pilot sizes and pilot rewards) under their names.
    """

    _tag_names = ["trl", "dpo", "sgdpo", "sgdpo_fast"]

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SGDPOConfig(f"{str(name).split('/')[-1] or 'model'}-SGDPO")
        self._sgdpo = "sgdpo" in args.loss_type
        backend = getattr(args, "fused_backend", "auto")
        only_lp = self._sgdpo and not getattr(args, "head_metrics", True)
        with _our_head_in_dpo_init(backend, only_lp):
            super().__init__(model, ref_model, args, *rest, **kwargs)
        self._pilot_generator = None

    # ------------------------------------------------------------------ sgdpo loss
    def _pilot_gen(self, device: torch.device) -> torch.Generator:
        if self._pilot_generator is None or self._pilot_generator.device != device:
            seed = getattr(self.args, "pilot_seed", None)
            seed = self.args.seed if seed is None else seed
            g = torch.Generator(device=device)
            g.manual_seed(int(seed) + int(self.accelerator.process_index))
            self._pilot_generator = g
        return self._pilot_generator

    def _reference_token_logps(self, ref_kwargs, labels):
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if self.ref_model is None and is_peft_model(self.model):
                from trl.trainer.utils import use_adapter
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=name):
                    out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
            else:
                out = self.ref_model(**ref_kwargs, labels=labels, fused_lm_head=True)
        return out.log_probs

    def _gather_mean(self, x: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(x.detach().float().reshape(-1)).mean().item()

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._sgdpo:
            return super()._compute_loss(model, inputs, return_outputs)
        from ..losses import preference_loss

        mode = "train" if self.model.training else "eval"
        args = self.args
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        model_kwargs = {k: v for k, v in inputs.items() if k not in skip}
        model_kwargs["use_cache"] = False
        if self.aux_loss_enabled:
            model_kwargs["output_router_logits"] = True
        completion_mask = inputs["completion_mask"]
        mask = completion_mask[:, 1:].bool()
        T1 = mask.shape[1]
        labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
        outputs = model(**model_kwargs, labels=labels, fused_lm_head=True)
        # Prompt-learning PEFT prepends virtual tokens: keep the real positions
        policy = outputs.log_probs[:, -T1:]
        ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
        ref = self._reference_token_logps(ref_kwargs, labels)[:, -T1:]

        res = preference_loss(
            policy, ref, mask, loss_type="sgdpo", beta=self.beta,
            label_smoothing=self.label_smoothing,
            pilot_ratio_chosen=args.pilot_ratio_chosen, pilot_ratio_rejected=args.pilot_ratio_rejected,
            pilot_grad=args.pilot_grad, pilot_mode=args.pilot_mode,
            generator=self._pilot_gen(policy.device))
        loss = res.loss * self.loss_weights[0]
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self._gather_mean(outputs.aux_loss))

        m = self._metrics[mode]
        cr, rr = res.chosen_rewards.detach(), res.rejected_rewards.detach()
        m["rewards/chosen"].append(self._gather_mean(cr))
        m["rewards/rejected"].append(self._gather_mean(rr))
        m["rewards/accuracies"].append(self._gather_mean((cr > rr).float()))
        m["rewards/margins"].append(self._gather_mean(cr - rr))
        seq = (policy.detach() * mask).sum(1)
        B = seq.shape[0] // 2
        m["logps/chosen"].append(self._gather_mean(seq[:B]))
        m["logps/rejected"].append(self._gather_mean(seq[B:]))
        for key, val in (res.metrics or {}).items():
            if key in m and key.startswith(("rewards/", "logps/")):
                continue  # logged above from the per-pair values, gathered like TRL does
            val = val if isinstance(val, torch.Tensor) else torch.tensor(float(val), device=policy.device)
            m[key].append(self._gather_mean(val))
        if outputs.entropy is not None:
            self._log_head_metrics(m, outputs, mask, T1)
        if mode == "train":
            n_tok = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n_tok // self._tp_size
        m["num_tokens"] = [self._total_train_tokens]

        if return_outputs:
            with torch.no_grad():
                outputs = model(**model_kwargs)
            return loss, outputs
        return loss

    def _log_head_metrics(self, m, outputs, mask, T1):
        g = lambda x: self.accelerator.gather_for_metrics(x.reshape(1)).sum().item()  # noqa: E731
        maskf = mask.float()
        B = mask.shape[0] // 2
        tot = g(maskf.sum())
        m["entropy"].append(g((outputs.entropy[:, -T1:].detach() * maskf).sum()) / tot if tot else 0.0)
        ml = outputs.mean_logits[:, -T1:].detach() * maskf
        for name, sl in (("chosen", slice(None, B)), ("rejected", slice(B, None))):
            n = g(maskf[sl].sum())
            m[f"logits/{name}"].append(g(ml[sl].sum()) / n if n else 0.0)
        top = (outputs.is_top1[:, -T1:] & mask)[:B].float().sum()
        n = g(maskf[:B].sum())
        m["mean_token_accuracy"].append(g(top) / n if n else 0.0)


# ---------------------------------------------------------------------- patch_trl

class _NoEntropyGrad(torch.autograd.Function):
    """Identity on the (no-grad) entropy; refuses a non-zero gradient instead of dropping it."""

    @staticmethod
    def forward(ctx, entropy, anchor):
        return entropy.clone()

    @staticmethod
    def backward(ctx, g):
        if g is not None and bool((g != 0).any()):
            raise RuntimeError(
                "sgdpo_fast.patch_trl(): this trainer differentiates the entropy (e.g. GRPO's entropy "
                "bonus), which sgdpo_fast's fused head does not; call sgdpo_fast.integrations.trl."
                "unpatch_trl() for it")
        return None, None


class _ChunkedLogProbShim:
    """Stands in for ``trl.kernels.ChunkedLogProbFunction`` (same ``apply`` signature and
    5-tuple result): log-probs and the metric fields from one sweep of sgdpo_fast's op
    (the metrics without gradient), with the backend given to :func:`patch_trl`."""

    def __init__(self, backend: str = "auto"):
        self.backend = backend

    def apply(self, hidden, weight, bias, targets, temperature, chunk_size,
              final_logit_softcapping=None, logit_scale=1.0, outputs=METRICS):
        dev = hidden.device
        cdt = torch.get_autocast_dtype(dev.type) if torch.is_autocast_enabled(dev.type) else hidden.dtype
        h = hidden.to(cdt)
        softcap = None if final_logit_softcapping is None else float(final_logit_softcapping)
        which = tuple(o for o in outputs if o in METRICS)
        with torch.autocast(dev.type, enabled=False):
            # casts the head to h's dtype and, under ZeRO-3, re-gathers it for the backward
            logp, vals = head_logprobs_and_metrics(
                h, weight, targets, bias=bias, temperature=float(temperature), softcap=softcap,
                logit_scale=float(logit_scale), backend=self.backend,
                plan=LogprobPlan(metrics=which))
        ent = vals.get("entropy")
        if ent is not None and torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
            ent = _NoEntropyGrad.apply(ent, hidden if hidden.requires_grad else weight)
        top1 = vals.get("is_top1")
        return (logp, ent, vals.get("log_sum_sq_probs"), vals.get("mean_logits"),
                None if top1 is None else top1 > 0.5)


_SAVED = {}


def patch_trl(backend: str = "auto") -> None:
    """Make TRL's own fused LM head (``add_fused_lm_head``, used by the DPO, KTO, SFT,
    GRPO and RLOO trainers) run sgdpo_fast's log-prob op.  Idempotent; models patched
    before or after the call are both affected (the kernel is looked up per call).
    Entropy stays a metric without gradient: a trainer that backpropagates a non-zero
    gradient through it gets a RuntimeError naming :func:`unpatch_trl`."""
    import trl.trainer.utils as tu

    if "_ChunkedLogProbFunction" not in _SAVED:
        _SAVED["_ChunkedLogProbFunction"] = tu._ChunkedLogProbFunction
    tu._ChunkedLogProbFunction = _ChunkedLogProbShim(backend)


def unpatch_trl() -> None:
    """Undo :func:`patch_trl`."""
    import trl.trainer.utils as tu

    if "_ChunkedLogProbFunction" in _SAVED:
        tu._ChunkedLogProbFunction = _SAVED.pop("_ChunkedLogProbFunction")


def is_trl_patched() -> bool:
    import trl.trainer.utils as tu

    return isinstance(tu._ChunkedLogProbFunction, _ChunkedLogProbShim)
