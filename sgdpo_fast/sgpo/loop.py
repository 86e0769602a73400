"""The SGPO loop (arXiv 2507.20181): one model, policy and improver roles.

Iteration ``i`` (folder ``<out>/iter-<i>/``), every stage written to disk so a
killed run resumes where it stopped (``resume=True``) and can be inspected:

1. ``drafts.jsonl``      the policy answers the improver-training SFT prompts.
2. ``improver/``         NLL training (the trainer with ``loss_type="sft"``) on
                         (improver prompt with the prompt and the model's own
                         draft) -> SFT reference, mixed with ``policy_mix`` plain
                         policy examples per improver example so the policy role
                         is kept: prompt -> SFT reference (``policy_target=
                         "reference"``, the paper's SFT) or prompt -> the model's
                         own draft (``"draft"``: the policy role is anchored to what
                         it already does, and only preference training moves it).
                         ``improver_stage`` runs stages 1-2 alone.
3. ``candidates.jsonl``  the updated policy answers the preference prompts; the
                         improver rewrites each answer; the per-token perplexity
                         of the improved answer under the policy (fused log-prob op).
4. ``pairs.jsonl``       every candidate with its filter decision (``filters.py``:
                         empty / identical / too similar / perplexity outside Tukey's
                         fences); ``kept.jsonl`` the kept ones as preference records
                         (chosen = improved, rejected = original).
5. ``preference/``       DPO or SGDPO on the kept pairs (``pref_train.loss_type``).

A finished training stage leaves ``weights.safetensors`` (the model after it) and
``DONE``; its intermediate checkpoints are deleted.  An iteration with no kept
pair skips stage 5 (the summary says so).

Under ``torchrun`` / ``accelerate launch`` every rank runs this loop: generation and the
perplexity pass are sharded over the ranks, training is data-parallel, rank 0 writes the
files (``sharded.py``).
"""
from __future__ import annotations

import json
import math
import os
import random
import re
from dataclasses import asdict, dataclass, field, replace
from typing import List, Optional, Sequence

import torch

from .. import distributed
from ..data.records import read_jsonl, write_jsonl
from ..model.generation import GenConfig, generate
from ..model.chat import chat_prompt
from ..trainer import TrainConfig, train
from ..trainer.run_folder import RunFolderError, clear_run
from ..trainer.batches import answer_mask, collate, encode, token_logps
from . import sharded
from .filters import decide
from .prompts import IMPROVER_TEMPLATE, improver_prompt, policy_prompt


POLICY_TARGETS = ("reference", "draft")


@dataclass
class SGPOConfig:
    iterations: int = 1
    n_improver_prompts: Optional[int] = None   # SFT prompts for improver training (None: all)
    n_pref_prompts: Optional[int] = None       # prompts for preference pairs (None: all)
    policy_mix: float = 1.0                    # plain policy examples per improver example
    policy_target: str = "reference"           # their answers: "reference" | "draft"
    tukey_k: float = 1.5
    max_similarity: float = 0.9
    drop_truncated: bool = True                # drop pairs with an answer cut at max_new_tokens
    improver_template: str = IMPROVER_TEMPLATE
    seed: int = 0
    gen: GenConfig = field(default_factory=lambda: GenConfig(max_new_tokens=64))
    improver_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        loss_type="sft", lr=1e-5, epochs=1, save_final=False))
    pref_train: TrainConfig = field(default_factory=lambda: TrainConfig(
        loss_type="sgdpo", save_final=False))

    def validate(self) -> "SGPOConfig":
        if self.iterations < 1:
            raise ValueError(f"iterations must be >= 1, got {self.iterations}")
        if self.policy_mix < 0:
            raise ValueError(f"policy_mix must be >= 0, got {self.policy_mix}")
        if self.policy_target not in POLICY_TARGETS:
            raise ValueError(f"policy_target must be one of {POLICY_TARGETS}, got "
                             f"{self.policy_target!r}")
        if "{prompt}" not in self.improver_template or "{draft}" not in self.improver_template:
            raise ValueError("improver_template must contain {prompt} and {draft}")
        if self.improver_train.loss_type != "sft":
            raise ValueError("improver_train.loss_type must be 'sft'")
        if self.pref_train.loss_type == "sft":
            raise ValueError("pref_train.loss_type must be a preference loss")
        self.improver_train.validate()
        self.pref_train.validate()
        return self


def answer_perplexity(model, tokenizer, prompts: Sequence[str], answers: Sequence[str], *,
                      system=None, batch_size: int = 8, max_length: int = 512,
                      max_prompt_length: int = 256, backend: str = "auto") -> List[float]:
    """Per-token perplexity ``exp(-mean log p)`` of each answer (with its end-of-turn
    token) after its chat-formatted prompt, under ``model``; log-probs from the fused op."""
    out: List[float] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                seqs = [encode(tokenizer, p, a, max_length=max_length,
                               max_prompt_length=max_prompt_length, system=system)
                        for p, a in zip(prompts[s:s + batch_size], answers[s:s + batch_size])]
                b = collate(seqs, tokenizer.pad_token_id)
                lp = token_logps(model, b, backend).float().cpu()
                m = answer_mask(b["labels"])
                for r in range(len(seqs)):
                    out.append(math.exp(-lp[r][m[r]].mean().item()))
    finally:
        model.train(was)
    return out


def _done(d):
    return os.path.isfile(os.path.join(d, "DONE"))


def _mark_done(d, info: dict):
    with open(os.path.join(d, "DONE.tmp"), "w") as f:
        json.dump(info, f)
    os.replace(os.path.join(d, "DONE.tmp"), os.path.join(d, "DONE"))


def _train_stage(model, tokenizer, records, cfg: TrainConfig, d: str, resume: bool) -> dict:
    """A training stage that survives interruption (``sharded.train_stage``: its trainer
    checkpoints in ``d``; when it finishes, ``weights.safetensors`` holds the model)."""
    return sharded.train_stage(model, tokenizer, records, cfg, d, resume, train)


def _cached_jsonl(path: str, make):
    return sharded.cached_jsonl(path, make)


def _gen_cfg(cfg: SGPOConfig, it: int, stage: int) -> GenConfig:
    """A distinct sampling seed per iteration and stage."""
    return replace(cfg.gen, seed=cfg.gen.seed + 1000 * it + stage, distributed=True)


def _policy_prompts(tokenizer, texts, system):
    return [chat_prompt(tokenizer, policy_prompt(t), system) for t in texts]


def improver_examples(drafts: Sequence[dict], cfg: SGPOConfig) -> List[dict]:
    """SFT examples of stage 2 from ``drafts`` (``{"prompt", "draft", "response"}``): one
    improver example per draft, then ``round(policy_mix * len(drafts))`` plain policy
    examples (cycling through the drafts) answered per ``cfg.policy_target``; with
    ``"draft"`` an empty draft, or one cut at the token limit (``"finished": False``),
    gives no policy example: it would teach the policy to stop mid-answer."""
    sft = [{"prompt": improver_prompt(x["prompt"], x["draft"], cfg.improver_template),
            "response": x["response"]} for x in drafts]
    n_mix = int(round(cfg.policy_mix * len(drafts)))
    cycle = (list(drafts) * math.ceil(n_mix / max(1, len(drafts))))[:n_mix]
    for x in cycle:
        if cfg.policy_target == "reference":
            target = x["response"]
        else:
            target = x["draft"] if x.get("finished", True) else ""
        if target.strip():
            sft.append({"prompt": x["prompt"], "response": target})
    return sft


def improver_stage(model, tokenizer, records: Sequence[dict], cfg: SGPOConfig, d: str,
                   it: int = 0, resume: bool = False) -> dict:
    """Stages 1-2 of iteration ``it`` in folder ``d``: the policy drafts answers to the SFT
    ``records`` (``drafts.jsonl``), then ``model`` is trained as the improver (``improver/``).
    Returns ``{"improver_examples", "improver"}`` (the training summary)."""
    os.makedirs(d, exist_ok=True)
    sys_p = cfg.pref_train.system_prompt
    def make_drafts():
        texts, done = generate(model, tokenizer,
                               _policy_prompts(tokenizer, [r["prompt"] for r in records], sys_p),
                               _gen_cfg(cfg, it, 0), desc=f"iter {it}: drafts", with_finished=True)
        return [{"prompt": r["prompt"], "draft": a, "response": r["response"], "finished": f}
                for r, a, f in zip(records, texts, done)]
    drafts = _cached_jsonl(os.path.join(d, "drafts.jsonl"), make_drafts)
    sft = improver_examples(drafts, cfg)
    # both roles see the same system prompt in training and in generation
    imp_cfg = cfg.improver_train.replace(seed=cfg.improver_train.seed + it, system_prompt=sys_p)
    info = _train_stage(model, tokenizer, sft, imp_cfg, os.path.join(d, "improver"), resume)
    return {"improver_examples": len(sft), "improver": info}


SGPO_ENTRIES = ("sgpo_config.json", "final")  # with iter-N: what overwrite=True deletes
_ITER = re.compile(r"iter-\d+")  # an iteration's folder


def _is_sgpo_entry(name: str) -> bool:
    return name in SGPO_ENTRIES or _ITER.fullmatch(name) is not None


def check_sgpo_start(out_dir: str, resume: bool, overwrite: bool) -> None:
    """Raise RunFolderError unless an SGPO run may start (or resume) in ``out_dir`` as asked
    (the CLI calls it before loading anything; ``run_sgpo`` again)."""
    if resume and overwrite:
        raise RunFolderError("--resume (resume=True) continues an SGPO run and --overwrite "
                             "(overwrite=True) replaces it: give one of them")
    if not resume and not overwrite and os.path.isdir(out_dir) and \
            any(_ITER.fullmatch(n) for n in os.listdir(out_dir)):
        raise RunFolderError(f"{out_dir} holds an earlier SGPO run: continue it with --resume "
                             f"(resume=True), replace it with --overwrite (overwrite=True) or "
                             f"choose another folder")


def run_sgpo(model, tokenizer, sft_records: Sequence[dict], cfg: SGPOConfig, out_dir: str,
             resume: bool = False, pref_records: Optional[Sequence[dict]] = None,
             overwrite: bool = False) -> List[dict]:
    """Run ``cfg.iterations`` SGPO iterations on ``model`` (updated in place).

    ``sft_records``: ``{"prompt", "response"}``; the improver is trained on them and,
    unless ``pref_records`` (``{"prompt"}``) are given, their prompts are also the
    preference prompts.  ``resume`` continues the run in ``out_dir``; ``overwrite`` deletes
    an earlier run's entries there first (``iter-N``, ``sgpo_config.json``, ``final`` and
    their ``.tmp`` / ``.old`` siblings; nothing else).  Returns one summary dict per iteration."""
    cfg.validate()
    check_sgpo_start(out_dir, resume, overwrite)
    if not sft_records:
        raise ValueError("SGPO needs SFT records (prompt, response)")
    # under a launcher, join the process group before the first barrier (the CLI has already;
    # a script of the user's may not have): otherwise every rank would act as rank 0
    distributed.init_from_env(next(model.parameters()).device.type)
    os.makedirs(out_dir, exist_ok=True)
    if overwrite and sharded.is_main():  # with the temporaries of an interrupted write
        clear_run(out_dir, _is_sgpo_entry)
    sharded.barrier()  # every rank has looked at the folder before rank 0 writes into it
    if sharded.is_main():
        with open(os.path.join(out_dir, "sgpo_config.json"), "w") as f:
            json.dump(asdict(cfg), f, indent=1, default=str)
    rng = random.Random(cfg.seed)
    sys_p = cfg.pref_train.system_prompt
    summaries = []
    for it in range(cfg.iterations):
        d = os.path.join(out_dir, f"iter-{it}")
        os.makedirs(d, exist_ok=True)
        imp_recs = list(sft_records)
        rng_it = random.Random(rng.randrange(2**31))
        if cfg.n_improver_prompts is not None:
            imp_recs = rng_it.sample(imp_recs, min(cfg.n_improver_prompts, len(imp_recs)))
        prefs = list(pref_records) if pref_records is not None else list(sft_records)
        if cfg.n_pref_prompts is not None:
            prefs = rng_it.sample(prefs, min(cfg.n_pref_prompts, len(prefs)))

        def imp(ps, drafts):
            return [chat_prompt(tokenizer, improver_prompt(p, x, cfg.improver_template), sys_p)
                    for p, x in zip(ps, drafts)]

        # 1-2. drafts of the current policy on the improver-training prompts, improver training
        stage = improver_stage(model, tokenizer, imp_recs, cfg, d, it, resume)

        # 3. on-policy answers, improved answers, perplexity of the improved ones
        def make_candidates():
            ps = [r["prompt"] for r in prefs]
            orig, o_done = generate(model, tokenizer, _policy_prompts(tokenizer, ps, sys_p),
                                    _gen_cfg(cfg, it, 1), desc=f"iter {it}: answers",
                                    with_finished=True)
            better, b_done = generate(model, tokenizer, imp(ps, orig), _gen_cfg(cfg, it, 2),
                                      desc=f"iter {it}: improve", with_finished=True)
            pt = cfg.pref_train
            ppl = sharded.map_batches(list(zip(ps, better)), 8, lambda b: answer_perplexity(
                model, tokenizer, [p for p, _ in b], [a for _, a in b], system=sys_p,
                max_length=pt.max_length, max_prompt_length=pt.max_prompt_length, backend=pt.backend))
            return [{"prompt": p, "original": o, "improved": b, "ppl": q if math.isfinite(q) else None,
                     "original_finished": od, "improved_finished": bd}
                    for p, o, b, q, od, bd in zip(ps, orig, better, ppl, o_done, b_done)]
        cands = _cached_jsonl(os.path.join(d, "candidates.jsonl"), make_candidates)
        # 4. filters
        reasons, (lo, hi) = decide([c["original"] for c in cands], [c["improved"] for c in cands],
                                   [math.inf if c["ppl"] is None else c["ppl"] for c in cands], tukey_k=cfg.tukey_k,
                                   max_similarity=cfg.max_similarity,
                                   finished=[not cfg.drop_truncated or (c.get("original_finished", True)
                                                                        and c.get("improved_finished", True))
                                             for c in cands])
        fin = lambda x: x if math.isfinite(x) else None  # JSON has no infinities
        decided = [dict(c, kept=r == "kept", reason=r, fence_lo=fin(lo), fence_hi=fin(hi))
                   for c, r in zip(cands, reasons)]
        sharded.write_jsonl(os.path.join(d, "pairs.jsonl"), decided)
        kept = [{"prompt": c["prompt"], "chosen": c["improved"], "rejected": c["original"]}
                for c in decided if c["kept"]]
        sharded.write_jsonl(os.path.join(d, "kept.jsonl"), kept)
        counts = {r: reasons.count(r) for r in sorted(set(reasons))}
        # 5. preference optimization on the kept pairs
        pref_info = None
        if kept:
            pref_info = _train_stage(model, tokenizer, kept,
                                     cfg.pref_train.replace(seed=cfg.pref_train.seed + it),
                                     os.path.join(d, "preference"), resume)
        summary = {"iteration": it, **stage,
                   "candidates": len(cands), "kept": len(kept), "decisions": counts,
                   "fences": [fin(lo), fin(hi)], "preference": pref_info,
                   "note": None if kept else "no pair survived the filters: no preference step"}
        if sharded.is_main():
            with open(os.path.join(d, "summary.json"), "w") as f:
                json.dump(summary, f, indent=1)
        summaries.append(summary)
    return summaries
