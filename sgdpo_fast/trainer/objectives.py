"""What the trainer minimizes: a preference loss on pairs, or NLL on SFT examples.

Both compute per-token log-probs with :func:`batches.token_logps` (backbone +
fused LM head: no full logits).  An objective owns its tokenized examples and,
for preference losses, the reference: per-token reference log-probs computed
once before training and stored in the run folder (``reference="precompute"``,
the default: no second model in memory), or a frozen copy of the initial model
(``reference="copy"``).
"""
from __future__ import annotations

import array
import copy
import hashlib
import os
import sys
from typing import Dict, List, Sequence

import torch

from ..losses import formulas
from ..losses.preference import preference_loss
from .batches import Encoded, answer_mask, collate, encode, token_logps
from .config import TrainConfig

REF_FILE = "reference_logps.safetensors"
REF_FORMAT = "sgdpo_fast.reference/1"


def _warn(msg: str) -> None:
    print(f"[sgdpo_fast] warning: {msg}", file=sys.stderr, flush=True)


def fingerprint_sequences(seqs) -> str:
    """SHA-256 of tokenized sequences (ids and labels, in order): equal only for the very same
    training data as the model sees it (same records, tokenizer and length limits)."""
    h = hashlib.sha256()
    for s in seqs:
        for part in (s.input_ids, s.labels):
            h.update(len(part).to_bytes(8, "little"))
            h.update(array.array("q", part).tobytes())
    return h.hexdigest()


def save_reference(path: str, fingerprint: str, logps: List[torch.Tensor]) -> None:
    """Per-sequence reference log-probs as one safetensors file (pickle-free), written to a
    temporary name and renamed; the fingerprint and a hash of the values ride in its header."""
    from safetensors.torch import save_file

    from .files import writing
    flat = torch.cat([x.float().reshape(-1) for x in logps]) if logps else torch.zeros(0)
    lengths = torch.tensor([x.numel() for x in logps], dtype=torch.int64)
    digest = hashlib.sha256(flat.numpy().tobytes() + lengths.numpy().tobytes()).hexdigest()
    tmp = path + ".tmp"
    try:
        with writing(path):
            save_file({"logps": flat.contiguous(), "lengths": lengths}, tmp,
                      metadata={"format": REF_FORMAT, "fingerprint": fingerprint, "sha256": digest})
            os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_reference(path: str, fingerprint: str):
    """The stored per-sequence log-probs if ``path`` is intact and was computed for
    ``fingerprint``; else None, after a warning naming the file (it will be recomputed)."""
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
            flat, lengths = f.get_tensor("logps"), f.get_tensor("lengths")
    except Exception as e:  # a file cut short, emptied or not safetensors at all
        _warn(f"{path} is unreadable ({' '.join(str(e).split())[:200]}); recomputing the "
              f"reference log-probs")
        return None
    if meta.get("format") != REF_FORMAT or meta.get("fingerprint") != fingerprint:
        print(f"[sgdpo_fast] {path} was computed for other data or another model; recomputing it",
              flush=True)
        return None
    digest = hashlib.sha256(flat.numpy().tobytes() + lengths.numpy().tobytes()).hexdigest()
    if digest != meta.get("sha256") or int(lengths.sum()) != flat.numel():
        _warn(f"{path} holds other values than were written (damaged); recomputing the "
              f"reference log-probs")
        return None
    return [x.clone() for x in torch.split(flat, lengths.tolist())]


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

    def prepare(self, model, out_dir: str, model_fingerprint: str = "") -> None:
        """Set up the reference from ``model`` as it is now (before any training step).
        Precomputed reference log-probs are stored in ``out_dir`` and reloaded on resume,
        so a resumed run uses the initial model's, not the checkpoint's; a stored file that
        is damaged, or was computed for other data or (``model_fingerprint``) another model,
        is recomputed."""
        if not self.needs_ref:
            return
        if self.cfg.reference == "copy":
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        path = os.path.join(out_dir, REF_FILE)
        fp = hashlib.sha256(f"{self.fingerprint()} {model_fingerprint}".encode()).hexdigest()
        if os.path.isfile(path):
            saved = load_reference(path, fp)
            if saved is not None and len(saved) == 2 * len(self.pairs):
                self.ref_logps = saved
                return
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
        save_reference(path, fp, out)

    def fingerprint(self) -> str:
        """Hash of every tokenized pair (ids and labels): a stored reference is reused, and a
        run resumed, only for the very same sequences."""
        return fingerprint_sequences(s for pair in self.pairs for s in pair)

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

    def prepare(self, model, out_dir: str, model_fingerprint: str = "") -> None:
        return None

    def fingerprint(self) -> str:
        """Hash of every tokenized example: a run is resumed only on the very same ones."""
        return fingerprint_sequences(self.seqs)

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
