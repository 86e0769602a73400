"""What the trainer minimizes: a preference loss on pairs, or NLL on SFT examples.

Both compute per-token log-probs with :func:`batches.token_logps` (backbone +
fused LM head: no full logits).  An objective owns its tokenized examples and,
for preference losses, the reference: per-token reference log-probs computed
once before training and stored in the run folder (``reference="precompute"``,
the default: no second model in memory), or a frozen copy of the initial model
(``reference="copy"``).
"""
from __future__ import annotations

import copy
import hashlib
import os
from typing import Dict, List, Sequence

import torch

from ..losses import formulas
from ..losses.preference import preference_loss
from .batches import Encoded, answer_mask, collate, encode, token_logps
from .config import TrainConfig

REF_FILE = "reference_logps.pt"


def _progress(total, desc, enabled):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, leave=False)


class PreferenceObjective:
    """DPO-family / SGDPO loss on ``{"prompt", "chosen", "rejected"}`` records."""

    name = "preference"

    def __init__(self, records: Sequence[dict], tokenizer, cfg: TrainConfig):
        if not records:
            raise ValueError("no preference pairs to train on")
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        kw = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  system=cfg.system_prompt)
        self.pairs = [(encode(tokenizer, r["prompt"], r["chosen"], **kw),
                       encode(tokenizer, r["prompt"], r["rejected"], **kw)) for r in records]
        self.needs_ref = cfg.loss_type in formulas.NEEDS_REF
        self.ref_logps: List[torch.Tensor] = []  # per sequence: chosen_i, rejected_i, ...
        self.ref_model = None

    def __len__(self):
        return len(self.pairs)

    def batch(self, idx: Sequence[int]):
        seqs = [self.pairs[i][0] for i in idx] + [self.pairs[i][1] for i in idx]
        return collate(seqs, self.pad_id)

    def prepare(self, model, out_dir: str) -> None:
        """Set up the reference from ``model`` as it is now (before any training step).
        Precomputed reference log-probs are stored in ``out_dir`` and reloaded on resume,
        so a resumed run uses the initial model's, not the checkpoint's."""
        if not self.needs_ref:
            return
        if self.cfg.reference == "copy":
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        path = os.path.join(out_dir, REF_FILE)
        fp = self.fingerprint()
        if os.path.isfile(path):
            saved = torch.load(path)
            if isinstance(saved, dict) and saved.get("fingerprint") == fp:
                self.ref_logps = saved["logps"]
                return
            print(f"[sgdpo_fast] {path} was computed for other data; recomputing it", flush=True)
        was_training = model.training
        model.eval()
        out: List[torch.Tensor] = [None] * (2 * len(self.pairs))
        bs = self.cfg.batch_size * 2
        bar = _progress(len(self.pairs), "reference log-probs", self.cfg.progress)
        with torch.no_grad():
            for s in range(0, len(self.pairs), bs):
                idx = list(range(s, min(len(self.pairs), s + bs)))
                b = self.batch(idx)
                lp = token_logps(model, b, self.cfg.backend).float().cpu()
                m = answer_mask(b["labels"])
                for r, i in enumerate(idx):
                    out[2 * i] = lp[r][m[r]].clone()
                    out[2 * i + 1] = lp[len(idx) + r][m[len(idx) + r]].clone()
                if bar is not None:
                    bar.update(len(idx))
        if bar is not None:
            bar.close()
        model.train(was_training)
        self.ref_logps = out
        tmp = path + ".tmp"
        torch.save({"fingerprint": fp, "logps": out}, tmp)
        os.replace(tmp, path)

    def fingerprint(self) -> str:
        """Hash of every tokenized pair (ids and labels): a stored reference is reused only
        for the very same sequences."""
        h = hashlib.sha256()
        for pair in self.pairs:
            for s in pair:
                h.update(repr((s.input_ids, s.labels)).encode())
        return h.hexdigest()

    def weight(self, idx: Sequence[int]) -> float:
        """Share of a micro-batch in its step's loss: its number of pairs."""
        return float(len(idx))

    def _ref(self, idx, b, policy):
        if not self.needs_ref:
            return None
        if self.ref_model is not None:
            with torch.no_grad():
                return token_logps(self.ref_model, b, self.cfg.backend)
        vals = [self.ref_logps[2 * i] for i in idx] + [self.ref_logps[2 * i + 1] for i in idx]
        m = answer_mask(b["labels"]).to(policy.device)
        return policy.new_zeros(m.shape).masked_scatter(m, torch.cat(vals).to(policy.device))

    def loss(self, model, idx: Sequence[int], generator: torch.Generator):
        """``(loss [], metrics {name: float})`` for the pairs ``idx``."""
        c = self.cfg
        b = self.batch(idx)
        policy = token_logps(model, b, c.backend)
        m = answer_mask(b["labels"]).to(policy.device)
        out = preference_loss(
            policy, self._ref(idx, b, policy), m, loss_type=c.loss_type, beta=c.beta,
            label_smoothing=c.label_smoothing, pilot_ratio_chosen=c.pilot_ratio_chosen,
            pilot_ratio_rejected=c.pilot_ratio_rejected, pilot_grad=c.pilot_grad,
            pilot_mode=c.pilot_mode, generator=generator, simpo_gamma=c.simpo_gamma,
            nll_alpha=c.nll_alpha)
        metrics: Dict[str, float] = {k: float(v) for k, v in out.metrics.items()}
        metrics["tokens"] = float(m.sum())
        return out.loss, metrics


class SFTObjective:
    """Mean token NLL of the answers of ``{"prompt", "response"}`` records (prompts are
    chat-formatted unless a record says ``"formatted": true``)."""

    name = "sft"
    needs_ref = False

    def __init__(self, records: Sequence[dict], tokenizer, cfg: TrainConfig):
        if not records:
            raise ValueError("no SFT examples to train on")
        self.cfg = cfg
        self.pad_id = tokenizer.pad_token_id
        self.seqs: List[Encoded] = [
            encode(tokenizer, r["prompt"], r["response"], max_length=cfg.max_length,
                   max_prompt_length=cfg.max_prompt_length, system=cfg.system_prompt,
                   formatted=bool(r.get("formatted", False))) for r in records]

    def __len__(self):
        return len(self.seqs)

    def prepare(self, model, out_dir: str) -> None:
        return None

    def weight(self, idx: Sequence[int]) -> float:
        """Share of a micro-batch in its step's loss: its answer tokens (so a step's loss is
        the mean NLL over all its tokens, however they are split into micro-batches)."""
        return float(sum(self.seqs[i].n_answer for i in idx))

    def loss(self, model, idx: Sequence[int], generator: torch.Generator):
        b = collate([self.seqs[i] for i in idx], self.pad_id)
        lp = token_logps(model, b, self.cfg.backend)
        n = answer_mask(b["labels"]).sum()
        loss = -lp.sum() / n.clamp(min=1)
        return loss, {"nll": loss.item(), "tokens": float(n)}


def make_objective(records, tokenizer, cfg: TrainConfig):
    return (SFTObjective if cfg.loss_type == "sft" else PreferenceObjective)(records, tokenizer, cfg)
