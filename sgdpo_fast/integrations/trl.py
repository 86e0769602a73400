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
logits) for *every* TRL loss type, and (2) overrides ``_compute_loss`` when
``"sgdpo"`` is among the loss types, because SGDPO's pilots need the *per-token*
log-ratios that TRL sums away; without it, TRL's own code computes the loss.

With ``"sgdpo"`` among the loss types the whole list goes through
:func:`sgdpo_fast.preference_loss` (TRL's loss types are the same formulas there, tested
against TRL's code); ``precompute_ref_log_probs=True`` then stores *per-token* reference
log-probs with the dataset (``ref_chosen_token_logps`` / ``ref_rejected_token_logps``,
the completion tokens only), since SGDPO's pilots need them, and no reference model stays
in memory.  Configuration mistakes fail when the trainer is built (see
:class:`SGDPOConfig`).

:func:`patch_trl` swaps ``_ChunkedLogProbFunction`` (all TRL 1.x trainers: DPO,
KTO, SFT, GRPO, RLOO) for a shim running our op; :func:`unpatch_trl` restores it.
"""
from __future__ import annotations

import contextlib
import os
import sys
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
# TRL 1.16's DPO loss types (DPOTrainer._compute_loss)
TRL_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                  "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
TOKEN_REF_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")
# TRL 1.16 reads label_smoothing in these loss types only (sgdpo_fast's sigmoid would apply cDPO)
_TRL_SMOOTHED = frozenset({"robust", "exo_pair", "aot", "aot_unpaired"})


def _foreign_trainer_check(args) -> None:
    """Called while a ``transformers.Trainer`` is being built with ``args``: refuse
    loss_type 'sgdpo' in a trainer that is not :class:`SGDPOTrainer` (TRL's DPOTrainer
    would fail at its first step with 'Unknown loss type')."""
    from transformers import Trainer
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_name == "__init__":
            obj = frame.f_locals.get("self")
            if isinstance(obj, Trainer):
                if not isinstance(obj, SGDPOTrainer):
                    raise ValueError(
                        f"{type(obj).__name__} does not know loss_type='sgdpo' (it would fail at its first "
                        f"step): build sgdpo_fast.integrations.trl.SGDPOTrainer instead, with the same "
                        f"arguments (model, ref_model, args, train_dataset, processing_class, ...)")
                return
        frame = frame.f_back


@dataclass
class SGDPOConfig(DPOConfig):
    """``DPOConfig`` plus SGDPO and the fused-head options.  Default ``loss_type`` is
    ``["sgdpo"]`` (a plain ``DPOConfig`` keeps TRL's ``["sigmoid"]``).

    Every TRL loss type keeps working.  ``"sgdpo"`` may be combined with TRL's loss types
    (``loss_weights``, e.g. ``["sgdpo", "sft"]``) and used with ``ld_alpha``,
    ``f_divergence_type``, ``use_weighting`` and ``precompute_ref_log_probs=True``
    (per-token reference log-probs stored with the dataset).  Mistakes raise here, or
    when a trainer other than :class:`SGDPOTrainer` is built with a config whose loss
    types include ``"sgdpo"``.  Evaluation draws its pilots from a generator re-seeded
    with ``pilot_eval_seed`` at every ``evaluate()`` call, so ``eval_loss`` is
    reproducible.
    """

    loss_type: list = field(default_factory=lambda: ["sgdpo"], metadata={
        "help": "Loss type(s): 'sgdpo' (default) or any of TRL's DPO loss types, or a list combined "
                "with loss_weights."})
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
    pilot_eval_seed: int = field(default=1234, metadata={
        "help": "Seed of the evaluation pilots, re-applied at every evaluate() call (per process: "
                "seed + process index), so the sgdpo eval_loss of a model on a dataset is reproducible."})
    fused_backend: str = field(default="auto", metadata={
        "help": "Backend of sgdpo_fast's log-prob op: auto, torch, cpu, triton or cuda."})
    head_metrics: bool = field(default=True, metadata={
        "help": "With loss_type='sgdpo': log entropy / mean logits / token accuracy like TRL does "
                "(one extra no-grad GEMM pass over the vocabulary). TRL's own loss types always log them."})

    def __post_init__(self):
        super().__post_init__()
        from ..ops.plan import BACKENDS
        if self.fused_backend not in ("auto",) + BACKENDS:
            raise ValueError(f"fused_backend must be one of {('auto',) + BACKENDS}, got "
                             f"{self.fused_backend!r}")
        if "sgdpo" not in self.loss_type:
            return
        from ..losses.preference import loss_type_list, validate_loss_options
        types = loss_type_list(self.loss_type)
        unknown = [t for t in types if t not in TRL_LOSS_TYPES and t != "sgdpo"]
        if unknown:
            raise ValueError(f"loss_type {unknown}: SGDPOTrainer combines 'sgdpo' with TRL's loss types "
                             f"{list(TRL_LOSS_TYPES)}")
        if self.label_smoothing and any(t not in _TRL_SMOOTHED and t not in ("sgdpo", "sft") for t in types):
            raise ValueError(
                f"label_smoothing={self.label_smoothing} with loss_type {types}: TRL 1.16 ignores it for "
                f"{[t for t in types if t not in _TRL_SMOOTHED and t not in ('sgdpo', 'sft')]} while "
                f"sgdpo_fast would apply it (cDPO); combine 'sgdpo' with those loss types at "
                f"label_smoothing=0")
        validate_loss_options(
            types, beta=self.beta, label_smoothing=self.label_smoothing,
            loss_weights=self.loss_weights, discopop_tau=self.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=self.f_alpha_divergence_coef, ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting, r1=self.pilot_ratio_chosen,
            r2=self.pilot_ratio_rejected, pilot_mode=self.pilot_mode)
        if "robust" not in types and not self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")

    def get_process_log_level(self):
        # transformers.Trainer.__init__ calls this: the place to refuse a trainer that does
        # not know loss_type='sgdpo', while it is being built rather than at its first step
        if "sgdpo" in self.loss_type:
            _foreign_trainer_check(self)
        return super().get_process_log_level()


@contextlib.contextmanager
def _our_head_in_dpo_init(backend: str, only_log_probs: bool):
    """While ``DPOTrainer.__init__`` runs, its ``add_fused_lm_head`` installs our head."""
    import trl.trainer.dpo_trainer as dpo_mod

    saved = dpo_mod.add_fused_lm_head

    def add_fused_lm_head(model, temperature=1.0, cast_lm_head_to_fp32=False, outputs=("log_probs",)):
        if only_log_probs:  # the WPO weights still need log_sum_sq_probs
            outputs = tuple(o for o in outputs if o in ("log_probs", "log_sum_sq_probs"))
        return apply_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs,
                                   backend=backend)

    dpo_mod.add_fused_lm_head = add_fused_lm_head
    try:
        yield
    finally:
        dpo_mod.add_fused_lm_head = saved


class _TokenRefCollator:
    """Wraps the preference collator: per-token reference log-probs stored with the dataset
    (``TOKEN_REF_COLUMNS``: one float per completion token the head scores) become
    ``ref_token_logps`` [2B, T-1], placed at the batch's scored completion positions
    (``completion_mask[:, 1:]``).  Examples without them pass through unchanged."""

    def __init__(self, base):
        self.base = base

    def __call__(self, examples):
        if not examples or TOKEN_REF_COLUMNS[0] not in examples[0]:
            return self.base(examples)
        vals = [list(e[TOKEN_REF_COLUMNS[0]]) for e in examples] + \
               [list(e[TOKEN_REF_COLUMNS[1]]) for e in examples]
        out = self.base([{k: v for k, v in e.items() if k not in TOKEN_REF_COLUMNS} for e in examples])
        mask = out["completion_mask"][:, 1:].bool()
        counts = mask.sum(1).tolist()
        for r, (n, v) in enumerate(zip(counts, vals)):
            if n != len(v):
                raise ValueError(
                    f"stored per-token reference log-probs of batch row {r} have {len(v)} values but "
                    f"the collated row scores {n} completion tokens (max_length / truncation changed "
                    f"since they were precomputed?); delete the dataset cache or keep the settings")
        ref = torch.zeros(mask.shape, dtype=torch.float32)
        ref[mask] = torch.tensor([x for v in vals for x in v], dtype=torch.float32)
        out["ref_token_logps"] = ref
        return out


class SGDPOTrainer(DPOTrainer):
    """TRL's ``DPOTrainer`` with sgdpo_fast's fused LM head and ``loss_type="sgdpo"``.

    Same constructor as ``DPOTrainer``; ``args`` must be an :class:`SGDPOConfig` when its
    loss types include ``"sgdpo"`` (a plain ``DPOConfig`` works for TRL's loss types).
    Logged metrics for SGDPO: TRL's ``rewards/*``, ``logps/*`` (and, with
    ``head_metrics``, ``entropy``, ``logits/*``, ``mean_token_accuracy``), plus the
    loss's own metrics (pilot rewards, ``nll_loss``) under their names.  With
    ``precompute_ref_log_probs=True`` and ``"sgdpo"``, per-token reference log-probs are
    computed once (before training, by the reference model, or the policy when none is
    given) and stored with the dataset; no reference model is kept.
    """

    _tag_names = ["trl", "dpo", "sgdpo", "sgdpo_fast"]

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SGDPOConfig(f"{str(name).split('/')[-1] or 'model'}-SGDPO")
        types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        if "sgdpo" in types and not isinstance(args, SGDPOConfig):
            raise ValueError(
                "SGDPOTrainer got a plain DPOConfig with loss_type 'sgdpo': build the config as "
                "sgdpo_fast.integrations.trl.SGDPOConfig(loss_type='sgdpo', ...) (the same fields plus "
                "SGDPO's pilot_ratio_chosen, pilot_ratio_rejected, pilot_mode, pilot_grad, pilot_seed)")
        unknown = [t for t in types if t not in TRL_LOSS_TYPES and t != "sgdpo"]
        if unknown:
            raise ValueError(f"unknown loss_type {unknown}: SGDPOTrainer takes 'sgdpo' and TRL's "
                             f"{list(TRL_LOSS_TYPES)}")
        self._sgdpo = "sgdpo" in types
        self._pilot_generators = {}
        backend = getattr(args, "fused_backend", "auto")
        only_lp = self._sgdpo and not getattr(args, "head_metrics", True)
        # TRL's DPOTrainer refuses a non-reverse_kl f-divergence for loss types outside its
        # own list, 'sgdpo' among them; SGDPOConfig has checked the combination already, so
        # TRL's __init__ sees reverse_kl and the trainer keeps the configured one
        fdiv = args.f_divergence_type
        if self._sgdpo and fdiv != "reverse_kl":
            args.f_divergence_type = "reverse_kl"
        try:
            with _our_head_in_dpo_init(backend, only_lp):
                super().__init__(model, ref_model, args, *rest, **kwargs)
        finally:
            args.f_divergence_type = fdiv
        self.f_divergence_type = fdiv
        if self._sgdpo:
            self.data_collator = _TokenRefCollator(self.data_collator)

    # ------------------------------------------------------------------ sgdpo loss
    def _pilot_gen(self, device: torch.device, mode: str) -> torch.Generator:
        g = self._pilot_generators.get(mode)
        if g is None or g.device != device:
            if mode == "eval":
                seed = self.args.pilot_eval_seed
            else:
                seed = getattr(self.args, "pilot_seed", None)
                seed = self.args.seed if seed is None else seed
            g = torch.Generator(device=device)
            g.manual_seed(int(seed) + int(self.accelerator.process_index))
            self._pilot_generators[mode] = g
        return g

    def evaluate(self, *args, **kwargs):
        # every evaluation draws the same pilots (pilot_eval_seed), so eval_loss is reproducible
        self._pilot_generators.pop("eval", None)
        return super().evaluate(*args, **kwargs)

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if self._sgdpo and self._signature_columns is not None:
            self._signature_columns = list(self._signature_columns) + [
                c for c in TOKEN_REF_COLUMNS if c not in self._signature_columns]

    def _ref_forward(self, model, ref_kwargs, labels):
        """The reference's per-token log-probs (no grad): ``model``, or, for PEFT without a
        reference model, the policy with its adapter disabled (TRL's convention)."""
        from accelerate.utils import is_peft_model
        from trl.models.utils import disable_gradient_checkpointing

        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if model is None and is_peft_model(self.model):
                from trl.trainer.utils import use_adapter
                unwrapped = self.accelerator.unwrap_model(self.model)
                name = "ref" if "ref" in unwrapped.peft_config else None
                with use_adapter(unwrapped, adapter_name=name):
                    out = self.model(**ref_kwargs, labels=labels, fused_lm_head=True)
            else:
                out = (model if model is not None else self.model)(**ref_kwargs, labels=labels,
                                                                    fused_lm_head=True)
        return out.log_probs

    def _reference_token_logps(self, ref_kwargs, labels):
        return self._ref_forward(self.ref_model, ref_kwargs, labels)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        """SGDPO: per-token reference log-probs, stored with the dataset (TRL stores only
        their sums, which SGDPO's pilots cannot use).  Cached like TRL's (a dataset cache
        file keyed by the dataset, the reference model and the truncation settings)."""
        if not self._sgdpo:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        from accelerate.utils import broadcast_object_list
        from datasets import Dataset, IterableDataset, concatenate_datasets
        from datasets.fingerprint import Hasher
        from torch.utils.data import DataLoader
        from trl.models import prepare_deepspeed

        if isinstance(dataset, IterableDataset):
            raise ValueError("precompute_ref_log_probs=True needs a map-style Dataset, not an IterableDataset")
        fingerprint = [Hasher.hash((dataset._fingerprint, self._precompute_model_hash,
                                    "sgdpo_fast per-token reference", self.args.max_length,
                                    self.args.truncation_mode))]
        broadcast_object_list(fingerprint, from_process=0)
        cache_file = dataset._get_cache_file_path(fingerprint[0])
        if not os.path.exists(cache_file):
            loader = self.accelerator.prepare(DataLoader(
                dataset, batch_size=batch_size, collate_fn=self.data_collator,
                num_workers=self.args.dataloader_num_workers,
                pin_memory=self.args.dataloader_pin_memory, shuffle=False))
            if self.ref_model is None and self.is_deepspeed_enabled:
                if self._precompute_engine is None:
                    self._precompute_engine = prepare_deepspeed(self.model, self.accelerator)
                model = self._precompute_engine
            else:
                model = self.ref_model
            chosen, rejected = [], []
            for batch in loader:
                skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_token_logps"}
                kw = {k: v for k, v in batch.items() if k not in skip}
                kw["use_cache"] = False
                labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
                mask = batch["completion_mask"][:, 1:].bool()
                with self.accelerator.autocast():
                    lp = self._ref_forward(model, kw, labels)[:, -mask.shape[1]:].float()
                # NaN off the completion: rows of any length survive the padded gather.
                # Each rank holds its chosen rows, then its rejected rows: split before
                # gathering (gathered, the halves of the ranks would interleave), one gather
                # per half so the last uneven batch is trimmed by examples
                lp = lp.masked_fill(~mask, float("nan"))
                for half, dst in zip(lp.chunk(2), (chosen, rejected)):
                    half = self.accelerator.pad_across_processes(half, dim=1, pad_index=float("nan"))
                    half = self.accelerator.gather_for_metrics(half).cpu()
                    dst.extend(r[~torch.isnan(r)].tolist() for r in half)
            if self.accelerator.is_main_process:
                def add(_batch, indices):
                    return {TOKEN_REF_COLUMNS[0]: [chosen[i] for i in indices],
                            TOKEN_REF_COLUMNS[1]: [rejected[i] for i in indices]}

                dataset.map(add, with_indices=True, batched=True, remove_columns=dataset.column_names,
                            new_fingerprint=fingerprint[0], cache_file_name=cache_file,
                            desc=f"Caching per-token reference log probs for {name} dataset")
            self.accelerator.wait_for_everyone()
        return concatenate_datasets([dataset, Dataset.from_file(cache_file)], axis=1)

    def _gather_mean(self, x: torch.Tensor) -> float:
        return self.accelerator.gather_for_metrics(x.detach().float().reshape(-1)).mean().item()

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._sgdpo:
            return super()._compute_loss(model, inputs, return_outputs)
        from ..losses import preference_loss

        mode = "train" if self.model.training else "eval"
        args = self.args
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps", "ref_token_logps"}
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
        if "ref_token_logps" in inputs:      # precomputed, stored with the dataset
            ref = inputs["ref_token_logps"][:, -T1:].to(policy.device)
        else:
            ref_kwargs = {k: v for k, v in model_kwargs.items() if k != "output_router_logits"}
            ref = self._reference_token_logps(ref_kwargs, labels)[:, -T1:]
        lss = outputs.log_sum_sq_probs[:, -T1:] if args.use_weighting else None

        res = preference_loss(
            policy, ref, mask, loss_type=list(self.loss_types), loss_weights=self.loss_weights,
            beta=self.beta, label_smoothing=self.label_smoothing,
            pilot_ratio_chosen=args.pilot_ratio_chosen, pilot_ratio_rejected=args.pilot_ratio_rejected,
            pilot_grad=args.pilot_grad, pilot_mode=args.pilot_mode,
            generator=self._pilot_gen(policy.device, mode), discopop_tau=args.discopop_tau,
            f_divergence_type=self.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, ld_alpha=self.ld_alpha,
            use_weighting=self.use_weighting, log_sum_sq_probs=lss)
        loss = res.loss
        if self.aux_loss_enabled and outputs.aux_loss is not None:
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss
            self._metrics[mode]["aux_loss"].append(self._gather_mean(outputs.aux_loss))

        m = self._metrics[mode]
        cr, rr = res.chosen_rewards.detach(), res.rejected_rewards.detach()
        m["rewards/chosen"].append(self._gather_mean(cr))
        m["rewards/rejected"].append(self._gather_mean(rr))
        m["rewards/accuracies"].append(self._gather_mean((cr > rr).float()))
        m["rewards/margins"].append(self._gather_mean(cr - rr))
        m["logps/chosen"].append(self._gather_mean(res.chosen_logps))
        m["logps/rejected"].append(self._gather_mean(res.rejected_logps))
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
    from ..ops.plan import BACKENDS

    if backend not in ("auto",) + BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {backend!r}")
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
