"""What the trainer minimizes: a preference loss on pairs, or NLL on SFT examples.

Both compute per-token log-probs with :func:`batches.token_logps` (backbone +
fused LM head: no full logits).  An objective owns its tokenized examples and,
for preference losses, the reference: per-token reference log-probs computed
once before training and stored in the run folder (``reference="precompute"``,
the default: no second model in memory), or a frozen copy of the initial model
(``reference="copy"``).

**Results that do not depend on how a step is split.**  A step's examples are spread over
micro-batches and ranks (``loop.py``); :meth:`loss` with ``totals`` (the counts of the
*whole step*, :meth:`totals`) returns the micro-batch's share of the step's loss, so the
shares add up to the same loss however the step is split:

* preferences: the sum of the pairs' losses / the step's number of pairs, plus, with
  ``nll_alpha``, ``nll_alpha x`` the chosen answers' NLL summed / the step's number of chosen
  answer tokens (a token mean over the whole step, not per micro-batch);
* SFT: the NLL summed / the step's number of answer tokens.

SGDPO's pilot subsets are drawn per pair, from a generator seeded with ``(seed, step, pair
index)`` and sized to that pair's own answers (:func:`pilot_seed`), so a pair gets the same
pilots whichever micro-batch, rank or padding it lands in.

The reference precompute is sharded over ranks as whole batches (``distributed.round_robin``),
each computed as one process computes it, and gathered on every rank; rank 0 writes the file.
"""
from __future__ import annotations

import array
import copy
import hashlib
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

from .. import distributed
from ..losses import formulas
from ..losses.pilots import draw_pilot_masks
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

    def prepare(self, model, out_dir: str, model_fingerprint: str = "", module=None,
                collective: bool = False) -> None:
        """Set up the reference from ``model`` as it is now (before any training step).
        Precomputed reference log-probs are stored in ``out_dir`` and reloaded on resume,
        so a resumed run uses the initial model's, not the checkpoint's; a stored file that
        is damaged, or was computed for other data or (``model_fingerprint``) another model,
        is recomputed.

        Several ranks: rank 0 reads the stored file and sends it to the others; a missing
        one is computed in whole batches dealt round-robin over the ranks (``module``, the
        trainer's gradient-free module, computes them; ``collective``: every pass is a
        collective, so ranks with fewer batches make extra passes whose results are
        dropped), gathered on every rank and written by rank 0."""
        if not self.needs_ref:
            return
        if self.cfg.reference == "copy":
            self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
            return
        path = os.path.join(out_dir, REF_FILE)
        fp = hashlib.sha256(f"{self.fingerprint()} {model_fingerprint}".encode()).hexdigest()
        saved = None
        if distributed.is_main() and os.path.isfile(path):
            saved = load_reference(path, fp)
            if saved is not None and len(saved) != 2 * len(self.pairs):
                saved = None
        if distributed.world() > 1:
            saved = _share_from_main(saved)
        if saved is not None:
            self.ref_logps = saved
            return
        module = model if module is None else module
        was_training = model.training
        model.eval()
        module.eval()
        bs = self.cfg.batch_size * 2
        batches = [list(range(s, min(len(self.pairs), s + bs)))
                   for s in range(0, len(self.pairs), bs)]
        mine = distributed.round_robin(len(batches))
        passes = distributed.rounds(len(batches)) if collective else len(mine)
        done: List[List[torch.Tensor]] = []   # per batch of mine: its sequences' log-probs
        bar = _progress(len(self.pairs), "reference log-probs",
                        self.cfg.progress and distributed.is_main())
        with torch.no_grad():
            for j in range(passes):
                idx = batches[mine[j]] if j < len(mine) else batches[0]
                b = self.batch(idx)
                lp = token_logps(module, b, self.cfg.backend).float().cpu()
                if j >= len(mine):
                    continue  # a pass only to keep the collectives in step
                m = answer_mask(b["labels"])
                seqs = []
                for r in range(len(idx)):
                    seqs += [lp[r][m[r]].clone(), lp[len(idx) + r][m[len(idx) + r]].clone()]
                done.append(seqs)
                if bar is not None:
                    bar.update(len(idx) * distributed.world())
        if bar is not None:
            bar.close()
        model.train(was_training)
        module.train(was_training)
        per_batch = _gather_batches(done, len(batches))
        out: List[torch.Tensor] = [None] * (2 * len(self.pairs))
        for idx, seqs in zip(batches, per_batch):
            for r, i in enumerate(idx):
                out[2 * i], out[2 * i + 1] = seqs[2 * r], seqs[2 * r + 1]
        self.ref_logps = out
        if distributed.is_main():
            save_reference(path, fp, out)

    def fingerprint(self) -> str:
        """Hash of every tokenized pair (ids and labels): a stored reference is reused, and a
        run resumed, only for the very same sequences."""
        return fingerprint_sequences(s for pair in self.pairs for s in pair)

    def weight(self, idx: Sequence[int]) -> float:
        """Share of a micro-batch in its step's loss: its number of pairs."""
        return float(len(idx))

    def totals(self, idx: Sequence[int]) -> Dict[str, float]:
        """The counts a step's loss is normalized by (see the module docstring)."""
        return {"pairs": float(len(idx)),
                "chosen_tokens": float(sum(self.pairs[i][0].n_answer for i in idx))}

    def _ref(self, idx, b, policy):
        if not self.needs_ref:
            return None
        if self.ref_model is not None:
            with torch.no_grad():
                return token_logps(self.ref_model, b, self.cfg.backend)
        vals = [self.ref_logps[2 * i] for i in idx] + [self.ref_logps[2 * i + 1] for i in idx]
        m = answer_mask(b["labels"]).to(policy.device)
        return policy.new_zeros(m.shape).masked_scatter(m, torch.cat(vals).to(policy.device))

    def pilot_masks(self, idx: Sequence[int], mask: torch.Tensor, step: int) -> torch.Tensor:
        """SGDPO pilot subsets [2B, T] of the pairs ``idx`` at optimizer step ``step``: pair
        ``i`` draws from a generator seeded by :func:`pilot_seed` over its own answers only,
        so its pilots do not depend on the batch it is in (rank, micro-batch, padding)."""
        c = self.cfg
        B = len(idx)
        cpu = mask.cpu()
        out = torch.zeros_like(cpu)
        for r, i in enumerate(idx):
            T_i = max(len(self.pairs[i][0].input_ids), len(self.pairs[i][1].input_ids)) - 1
            own = torch.stack([cpu[r, :T_i], cpu[B + r, :T_i]])
            g = torch.Generator().manual_seed(pilot_seed(c.seed, step, i))
            p = draw_pilot_masks(own, c.pilot_ratio_chosen, c.pilot_ratio_rejected, c.pilot_mode, g)
            out[r, :T_i], out[B + r, :T_i] = p[0], p[1]
        return out.to(mask.device)

    def loss(self, model, idx: Sequence[int], generator: Optional[torch.Generator] = None, *,
             step: Optional[int] = None, totals: Optional[Dict[str, float]] = None):
        """``(loss [], metrics {name: float})`` for the pairs ``idx``.

        ``totals`` (:meth:`totals` of the whole optimizer step): the loss and the metrics are
        this micro-batch's *shares* of the step's (module docstring); None: of ``idx`` alone
        (its mean loss and metrics).  ``step``: SGDPO pilots per pair from
        ``(seed, step, pair index)``; None: drawn over the batch from ``generator``."""
        c = self.cfg
        tot = self.totals(idx) if totals is None else totals
        b = self.batch(idx)
        policy = token_logps(model, b, c.backend)
        m = answer_mask(b["labels"]).to(policy.device)
        pilots = None
        if step is not None and "sgdpo" == c.loss_type:
            pilots = self.pilot_masks(idx, m, step)
        out = preference_loss(
            policy, self._ref(idx, b, policy), m, loss_type=c.loss_type, beta=c.beta,
            label_smoothing=c.label_smoothing, pilot_ratio_chosen=c.pilot_ratio_chosen,
            pilot_ratio_rejected=c.pilot_ratio_rejected, pilot_grad=c.pilot_grad,
            pilot_mode=c.pilot_mode, pilot_masks=pilots,
            generator=generator if pilots is None else None, simpo_gamma=c.simpo_gamma,
            discopop_tau=c.discopop_tau, ld_alpha=c.ld_alpha,
            f_divergence_type=c.f_divergence_type,
            f_alpha_divergence_coef=c.f_alpha_divergence_coef)
        share = len(idx) / tot["pairs"]
        loss = out.losses.sum() / tot["pairs"]
        metrics: Dict[str, float] = {k: float(v) * share for k, v in out.metrics.items()}
        if c.nll_alpha:  # RPO: a token mean over the whole step's chosen answers
            nll_sum = -policy[:len(idx)].sum()   # 0 off the answers
            loss = loss + c.nll_alpha * nll_sum / max(tot["chosen_tokens"], 1.0)
            metrics["nll_loss"] = float(nll_sum.detach()) / max(tot["chosen_tokens"], 1.0)
        metrics["tokens"] = float(m.sum())
        return loss, metrics


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

    def prepare(self, model, out_dir: str, model_fingerprint: str = "", module=None,
                collective: bool = False) -> None:
        return None

    def fingerprint(self) -> str:
        """Hash of every tokenized example: a run is resumed only on the very same ones."""
        return fingerprint_sequences(self.seqs)

    def weight(self, idx: Sequence[int]) -> float:
        """Share of a micro-batch in its step's loss: its answer tokens (so a step's loss is
        the mean NLL over all its tokens, however they are split into micro-batches)."""
        return float(sum(self.seqs[i].n_answer for i in idx))

    def totals(self, idx: Sequence[int]) -> Dict[str, float]:
        return {"tokens": self.weight(idx)}

    def loss(self, model, idx: Sequence[int], generator: Optional[torch.Generator] = None, *,
             step: Optional[int] = None, totals: Optional[Dict[str, float]] = None):
        """``(loss, metrics)``: the answers' NLL summed / the step's answer tokens (``totals``;
        None: this micro-batch's own, i.e. its mean token NLL)."""
        tot = self.totals(idx) if totals is None else totals
        b = collate([self.seqs[i] for i in idx], self.pad_id)
        lp = token_logps(model, b, self.cfg.backend)
        n = answer_mask(b["labels"]).sum()
        loss = -lp.sum() / max(tot["tokens"], 1.0)
        return loss, {"nll": loss.item(), "tokens": float(n)}


def pilot_seed(seed: int, step: int, index: int) -> int:
    """The seed of pair ``index``'s SGDPO pilots at optimizer step ``step`` of a run seeded
    ``seed``: 63 bits of SHA-256 of the three numbers (distinct draws for every pair and
    step, the same wherever the pair is computed)."""
    h = hashlib.sha256(f"sgdpo-pilots:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _share_from_main(saved: Optional[List[torch.Tensor]]) -> Optional[List[torch.Tensor]]:
    """Rank 0's stored reference log-probs (or None) on every rank."""
    have = distributed.broadcast_json(saved is not None)
    if not have:
        return None
    flat = torch.cat([x.reshape(-1) for x in saved]) if distributed.is_main() and saved \
        else torch.zeros(0)
    lengths = torch.tensor([x.numel() for x in saved], dtype=torch.int64) \
        if distributed.is_main() else torch.zeros(0, dtype=torch.int64)
    flat = distributed.all_gather_varlen(flat.float())[0]
    lengths = distributed.all_gather_varlen(lengths)[0]
    return [x.clone() for x in torch.split(flat, lengths.tolist())]


def _gather_batches(done: List[List[torch.Tensor]], n_batches: int) -> List[List[torch.Tensor]]:
    """Every rank's computed batches (``done``: this rank's, in its round-robin order) on every
    rank, listed by batch index."""
    if distributed.world() == 1:
        return done
    flat = torch.cat([x for seqs in done for x in seqs]) if done else torch.zeros(0)
    lengths = torch.tensor([x.numel() for seqs in done for x in seqs], dtype=torch.int64)
    counts = torch.tensor([len(seqs) for seqs in done], dtype=torch.int64)
    per_rank = []
    for f, ln, ct in zip(distributed.all_gather_varlen(flat.float()),
                         distributed.all_gather_varlen(lengths),
                         distributed.all_gather_varlen(counts)):
        seqs = torch.split(f, ln.tolist())
        batches, k = [], 0
        for c in ct.tolist():
            batches.append([x.clone() for x in seqs[k:k + c]])
            k += c
        per_rank.append(batches)
    return distributed.gather_in_order(per_rank, n_batches)


def make_objective(records, tokenizer, cfg: TrainConfig):
    return (SFTObjective if cfg.loss_type == "sft" else PreferenceObjective)(records, tokenizer, cfg)
