"""``python -m bench.quality``: does SGDPO beat DPO, does SGPO help without preference data,
and what does training cost outside its tasks?  (issue 15; docs/study.md explains the
design and how to read the output.)

Arms, at equal compute (the same frozen pairs, optimizer steps, batch and learning-rate
schedule for every DPO-family arm; the SGPO arms' two preference stages add up to the
same number of steps):

* ``base``        the model as loaded (no training; one record, seed 0);
* ``dpo``         DPO (sigmoid loss);
* ``sgdpo``       SGDPO with the paper's defaults: r1 0.6, r2 0.9, Pilot_d, detached pilots;
* ``sgdpo_same``  SGDPO with Pilot_s (``pilot_mode="same"``);
* ``sgdpo_grad``  SGDPO with gradients through the pilots (``pilot_grad=True``);
* ``sgpo_dpo`` / ``sgpo_sgdpo``  two SGPO iterations from the SFT data only (the bundled
  train split), DPO or SGDPO inside.

The DPO-family arms train on ONE frozen file of on-policy pairs (``pairs.jsonl``: the
task's reference answer > the base model's own wrong greedy draft, on bundled train
prompts), shared by all arms and seeds; seeds change the data order and the pilot draws
(SGPO: also the prompts it samples).

Per arm and seed: held-out checker accuracy (overall, per family, bootstrap 95% interval
over prompts); held-out preference accuracy (the implicit reward ranks the reference
above the base model's wrong answer, on held-out prompts); mean response length; mean
log-ratio to the base model of the policy's own held-out answers (a KL proxy); and,
on the probe split (four task families no arm trains on): checker accuracy and the mean
log-likelihood of the reference answers (the general-ability probe).  Then paired
bootstrap differences between arms on the same prompts, the spread over seeds, and
leave-one-family-out (train on five families, evaluate on the sixth).  ``--search``
runs a settings search instead (learning rate, steps, beta, pilot ratios, NLL term,
reference-answer style, SGPO improver settings) and reports the trade-off between the
trained tasks and the probe.

Output: ``<out>/results.json`` (one record per arm and seed, the issue's fields),
``analysis.json`` (everything else, per-prompt correctness included, so the report can
be rebuilt from the folder), ``results.md``, ``accuracy.png``, ``training.png``,
``pairs.jsonl``.  Work files (runs, checkpoints) go to ``--work``; a killed study
continues where it stopped when started again with the same command.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, fields
from typing import Dict, List, Optional, Sequence

import torch

from sgdpo_fast.data.records import load_sft, read_jsonl, write_jsonl
from sgdpo_fast.data.tasks import FAMILIES, PROBE_FAMILIES, check, distractor, styled_response
from sgdpo_fast.model.chat import chat_prompt
from sgdpo_fast.model.generation import GenConfig, generate
from sgdpo_fast.model.loading import load_model
from sgdpo_fast.sgpo import SGPOConfig, improver_stage, run_sgpo
from sgdpo_fast.trainer import TrainConfig, train
from sgdpo_fast.trainer.batches import answer_mask, collate, encode, token_logps
from sgdpo_fast.trainer.objectives import REF_FILE, make_objective
from sgdpo_fast.trainer.run_folder import model_fingerprint

from . import quality_report as report
from .quality_stats import bootstrap_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_ROOT = os.path.join(ROOT, "bench", "results")
ARMS = ("base", "dpo", "sgdpo", "sgdpo_same", "sgdpo_grad", "sgpo_dpo", "sgpo_sgdpo")
PAIR_ARMS = ("dpo", "sgdpo", "sgdpo_same", "sgdpo_grad")
SGPO_ARMS = ("sgpo_dpo", "sgpo_sgdpo")
SEARCH_ARMS = PAIR_ARMS + SGPO_ARMS + ("improver",)
RESULT_FIELDS = ("arm", "seed", "heldout_accuracy", "heldout_accuracy_ci", "per_family",
                 "pref_accuracy", "mean_length", "logratio", "steps", "wall_s")
TIE = 1e-3  # implicit-reward margins within this many nats count as ties (half right)


@dataclass(frozen=True)
class Plan:
    """Every size and setting of a study; stored in ``<work>/plan.json``."""
    # the frozen pair file: base-model drafts on this many train prompts per family
    pair_prompts_per_family: int = 40
    style: str = "bare"                  # chosen (reference) answers: bare | sentence
    # preference training: every DPO-family arm; the SGPO preference stages add up to it
    steps: int = 16
    batch_size: int = 2
    grad_accum: int = 2
    lr: float = 5e-6
    beta: float = 0.1
    warmup_ratio: float = 0.1
    nll_alpha: float = 0.0               # RPO: + alpha * NLL of the chosen answer
    pilot_ratio_chosen: float = 0.6
    pilot_ratio_rejected: float = 0.9
    max_length: int = 192
    max_prompt_length: int = 128
    # SGPO arms
    sgpo_iterations: int = 2
    improver_prompts: int = 16           # SFT prompts per iteration for the improver
    pref_prompts: int = 48               # prompts per iteration for self-generated pairs
    improver_steps: int = 8
    improver_lr: float = 2e-6
    policy_mix: float = 1.0
    policy_target: str = "draft"         # the policy examples' answers: reference | draft
    sgpo_max_new_tokens: int = 32
    sgpo_drop_truncated: bool = True     # SGPO filter: drop pairs with an answer cut short
    sgpo_temperature: float = 0.0        # SGPO sampling (0: greedy)
    # evaluation
    heldout_per_family: int = 50
    probe_per_family: int = 40
    pref_per_family: int = 10            # held-out pairs per family (preference accuracy)
    kl_per_family: int = 10              # own answers per family (log-ratio, KL proxy)
    max_new_tokens: int = 24
    gen_batch: int = 32
    n_boot: int = 2000
    # leave-one-family-out
    lofo_arm: str = "sgdpo"
    lofo_steps: int = 16
    lofo_seed: int = 0
    # search: held-out tasks per family for each point (the probe is used whole)
    search_heldout_per_family: int = 20
    # machinery
    save_every: int = 8                  # checkpoint period (steps): what a kill can lose

    def replace(self, **kw) -> "Plan":
        return dataclasses.replace(self, **kw)

    def validate(self) -> "Plan":
        if self.style not in ("bare", "sentence"):
            raise ValueError(f"style must be bare or sentence, got {self.style!r}")
        if self.policy_target not in ("reference", "draft"):
            raise ValueError(f"policy_target must be reference or draft, got {self.policy_target!r}")
        if self.lofo_arm not in PAIR_ARMS:
            raise ValueError(f"lofo_arm must be one of {PAIR_ARMS}, got {self.lofo_arm!r}")
        for f in ("steps", "batch_size", "grad_accum", "sgpo_iterations", "heldout_per_family",
                  "probe_per_family", "max_new_tokens", "gen_batch", "n_boot", "lofo_steps",
                  "pair_prompts_per_family", "improver_prompts", "pref_prompts", "improver_steps"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.steps % self.sgpo_iterations:
            raise ValueError(f"steps ({self.steps}) must be a multiple of sgpo_iterations "
                             f"({self.sgpo_iterations}): the SGPO arms split them evenly")
        return self


# sizes of `--quick` (a tiny random model: checks the pipeline and the result format)
QUICK = dict(pair_prompts_per_family=2, steps=2, grad_accum=1, sgpo_iterations=2,
             improver_prompts=3, pref_prompts=4, improver_steps=1, sgpo_max_new_tokens=6,
             sgpo_drop_truncated=False,  # a random model never stops: keep its pairs
             sgpo_temperature=1.0,       # ... and greedy, it often says the same twice
             heldout_per_family=3, probe_per_family=2, pref_per_family=2, kl_per_family=2,
             max_new_tokens=6, n_boot=200, lofo_steps=1, search_heldout_per_family=2,
             save_every=1, max_length=160, max_prompt_length=120)


def parse_overrides(items: Sequence[str], plan: Plan) -> Dict[str, object]:
    """``["lr=1e-5", "style=sentence", ...]`` (or one ``"a=1,b=2"``) -> typed Plan fields."""
    types = {f.name: f.type for f in fields(Plan)}
    out: Dict[str, object] = {}
    for item in items:
        for kv in filter(None, (x.strip() for x in item.split(","))):
            if "=" not in kv:
                raise ValueError(f"setting {kv!r}: expected name=value")
            k, v = (x.strip() for x in kv.split("=", 1))
            if k == "arm":
                out[k] = v
                continue
            if k not in types:
                raise ValueError(f"unknown setting {k!r}; known: {sorted(types)}")
            cur = getattr(plan, k)
            if isinstance(cur, bool):
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"setting {k}={v!r}: expected true or false")
                out[k] = v.lower() in ("true", "1")
                continue
            try:
                out[k] = type(cur)(float(v)) if isinstance(cur, int) else type(cur)(v)
            except ValueError:
                raise ValueError(f"setting {k}={v!r}: expected a {type(cur).__name__}") from None
            if isinstance(cur, int) and float(v) != out[k]:
                raise ValueError(f"setting {k}={v!r}: expected an integer")
    return out


# ---------------------------------------------------------------------------------------
# configurations of the arms
# ---------------------------------------------------------------------------------------

def train_config(plan: Plan, arm: str, seed: int, steps: Optional[int] = None) -> TrainConfig:
    """The preference-training config of a DPO-family arm (also used inside the SGPO arms)."""
    if arm not in PAIR_ARMS:
        raise ValueError(f"not a pair-training arm: {arm!r}")
    return TrainConfig(
        loss_type="sigmoid" if arm == "dpo" else "sgdpo", beta=plan.beta, lr=plan.lr,
        warmup_ratio=plan.warmup_ratio, nll_alpha=plan.nll_alpha,
        pilot_ratio_chosen=plan.pilot_ratio_chosen, pilot_ratio_rejected=plan.pilot_ratio_rejected,
        pilot_mode="same" if arm == "sgdpo_same" else "different",
        pilot_grad=arm == "sgdpo_grad", max_steps=steps or plan.steps,
        batch_size=plan.batch_size, grad_accum=plan.grad_accum, max_length=plan.max_length,
        max_prompt_length=plan.max_prompt_length, seed=seed, save_every=plan.save_every,
        keep_checkpoints=1, save_final=False, progress=False)


def sgpo_config(plan: Plan, arm: str, seed: int) -> SGPOConfig:
    """Two (``sgpo_iterations``) SGPO iterations; each preference stage gets
    ``steps / sgpo_iterations`` optimizer steps, so the arm totals ``steps`` like the others."""
    inner = {"sgpo_dpo": "dpo", "sgpo_sgdpo": "sgdpo", "improver": "sgdpo"}[arm]
    pref = train_config(plan, inner, seed, steps=plan.steps // plan.sgpo_iterations)
    imp = pref.replace(loss_type="sft", lr=plan.improver_lr, max_steps=plan.improver_steps,
                       max_length=plan.max_length + 96, max_prompt_length=plan.max_prompt_length + 96)
    return SGPOConfig(
        iterations=plan.sgpo_iterations, n_improver_prompts=plan.improver_prompts,
        n_pref_prompts=plan.pref_prompts, policy_mix=plan.policy_mix,
        policy_target=plan.policy_target, drop_truncated=plan.sgpo_drop_truncated, seed=seed,
        gen=GenConfig(max_new_tokens=plan.sgpo_max_new_tokens, batch_size=plan.gen_batch,
                      temperature=plan.sgpo_temperature, seed=seed, progress=False),
        improver_train=imp, pref_train=pref)


# ---------------------------------------------------------------------------------------
# log-probs through the fused op
# ---------------------------------------------------------------------------------------

def seq_logps(model, tok, prompts: Sequence[str], answers: Sequence[str], plan: Plan,
              batch: int = 16):
    """Per answer (with its end-of-turn token) after its chat-formatted prompt: the sum of
    its token log-probs and its token count, from the fused head (no full logits)."""
    sums: List[float] = []
    counts: List[int] = []
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(prompts), batch):
                seqs = [encode(tok, p, a, max_length=plan.max_length,
                               max_prompt_length=plan.max_prompt_length)
                        for p, a in zip(prompts[s:s + batch], answers[s:s + batch])]
                b = collate(seqs, tok.pad_token_id)
                lp = token_logps(model, b).double().cpu()
                m = answer_mask(b["labels"])
                sums += [float(lp[r][m[r]].sum()) for r in range(len(seqs))]
                counts += [int(m[r].sum()) for r in range(len(seqs))]
    finally:
        model.train(was)
    return sums, counts


# ---------------------------------------------------------------------------------------
# the study's data
# ---------------------------------------------------------------------------------------

def _per_family(recs: Sequence[dict], n: int, families) -> List[dict]:
    return [r for f in families for r in [x for x in recs if x["family"] == f][:n]]


class Study:
    """The state of one study: model, base weights, frozen data, folders."""

    def __init__(self, model, tok, plan: Plan, work: str, out: str, log=print):
        self.model, self.tok, self.plan = model, tok, plan.validate()
        self.work, self.out, self.log = work, out, log
        self.t0 = time.perf_counter()
        self.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        self.families = list(FAMILIES)
        self.heldout = _per_family(load_sft("bundled:heldout"), plan.heldout_per_family,
                                   self.families)
        self.probe = [dict(r, distractor=distractor(r)) for r in _per_family(
            load_sft("bundled:probe"), plan.probe_per_family, list(PROBE_FAMILIES))]
        self.train_recs = load_sft("bundled:train")
        self.by_id = {r["id"]: r for r in self.train_recs + self.heldout + self.probe}
        os.makedirs(work, exist_ok=True)

    # -- helpers ---------------------------------------------------------------------------
    def say(self, msg: str) -> None:
        self.log(f"[{time.perf_counter() - self.t0:7.0f} s] {msg}")

    def gen_cfg(self, **kw) -> GenConfig:
        return GenConfig(max_new_tokens=self.plan.max_new_tokens, batch_size=self.plan.gen_batch,
                         progress=False, **kw)

    def reset(self) -> None:
        self.model.load_state_dict(self.base_state)

    def answer(self, recs: Sequence[dict]):
        return generate(self.model, self.tok, [chat_prompt(self.tok, r["prompt"]) for r in recs],
                        self.gen_cfg(), with_finished=True)

    # -- frozen data -----------------------------------------------------------------------
    def prepare(self) -> None:
        """Base answers on the held-out and probe prompts, the held-out pairs, the frozen
        training pairs, and the base model's log-probs every evaluation compares with."""
        p = self.plan
        base_ans = os.path.join(self.work, "base_answers.jsonl")
        if not os.path.isfile(base_ans):
            self.reset()
            recs = self.heldout + self.probe
            texts, done = self.answer(recs)
            write_jsonl(base_ans, [{"id": r["id"], "answer": a, "finished": f}
                                   for r, a, f in zip(recs, texts, done)])
            self.say(f"base answers on {len(recs)} held-out + probe prompts")
        self.base_answers = {x["id"]: x for x in read_jsonl(base_ans)}
        # held-out pairs: reference > the base model's own wrong answer
        hp = os.path.join(self.work, "heldout_pairs.jsonl")
        if not os.path.isfile(hp):
            pairs = []
            for f in self.families:
                wrong = [r for r in self.heldout if r["family"] == f
                         and self.base_answers[r["id"]]["answer"].strip()
                         and not check(r, self.base_answers[r["id"]]["answer"])]
                pairs += [{"id": r["id"], "family": f, "prompt": r["prompt"],
                           "chosen": styled_response(r, p.style),
                           "rejected": self.base_answers[r["id"]]["answer"]}
                          for r in wrong[:p.pref_per_family]]
            write_jsonl(hp, pairs)
        self.heldout_pairs = read_jsonl(hp)
        self.kl_recs = _per_family(self.heldout, p.kl_per_family, self.families)
        # the frozen training pairs (bare references; other styles are made at train time)
        pp = os.path.join(self.work, "pairs.jsonl")
        if not os.path.isfile(pp):
            self.reset()
            recs = _per_family(self.train_recs, p.pair_prompts_per_family, self.families)
            texts, done = self.answer(recs)
            pairs = [{"id": r["id"], "family": r["family"], "prompt": r["prompt"],
                      "chosen": r["response"], "rejected": a}
                     for r, a in zip(recs, texts) if a.strip() and not check(r, a)]
            write_jsonl(pp, pairs)
            self.say(f"frozen pairs: {len(pairs)} of {len(recs)} base drafts were wrong")
        self.pairs = read_jsonl(pp)
        # the base model's log-probs (reference of every metric)
        rp = os.path.join(self.work, "base_logps.pt")
        key = ["v2"] + [[r["id"] for r in rs]
                        for rs in (self.heldout_pairs, self.probe, self.kl_recs)]
        self.base_lp = torch.load(rp) if os.path.isfile(rp) else {}
        if self.base_lp.get("key") != key:  # computed for other records: recompute
            hc = self._lp(self.ref_model, self.heldout_pairs, "chosen")
            hr = self._lp(self.ref_model, self.heldout_pairs, "rejected")
            pr = self._lp(self.ref_model, self.probe, "response")
            pd = self._lp(self.ref_model, self.probe, "distractor")
            hd = self._lp(self.ref_model, self.kl_recs, "response")
            self.base_lp = {"pair_chosen": hc[0], "pair_rejected": hr[0], "probe": pr,
                            "probe_distractor": pd, "heldout_ref": hd, "key": key}
            torch.save(self.base_lp, rp + ".tmp")
            os.replace(rp + ".tmp", rp)
            self.say("base log-probs of the held-out pairs, probe and held-out references")

    def _lp(self, model, recs, key):
        return seq_logps(model, self.tok, [r["prompt"] for r in recs], [r[key] for r in recs],
                         self.plan)

    def train_pairs(self, plan: Plan, exclude_family: Optional[str] = None) -> List[dict]:
        """The frozen pairs with the chosen answer in ``plan.style`` (less one family)."""
        return [dict(x, chosen=styled_response(self.by_id[x["id"]], plan.style))
                for x in self.pairs if x["family"] != exclude_family]

    # -- evaluation ------------------------------------------------------------------------
    def evaluate(self, heldout: Optional[Sequence[dict]] = None, answers=None) -> dict:
        """Every metric of the current model; ``heldout``: a subset of the held-out tasks
        (the search), ``answers``: {id: {"answer", "finished"}} instead of generating."""
        p = self.plan
        heldout = list(self.heldout if heldout is None else heldout)
        recs = heldout + self.probe
        if answers is None:
            texts, done = self.answer(recs)
        else:
            texts = [answers[r["id"]]["answer"] for r in recs]
            done = [answers[r["id"]]["finished"] for r in recs]
        ok = [bool(check(r, a)) for r, a in zip(recs, texts)]
        nh = len(heldout)
        h_ok, p_ok = ok[:nh], ok[nh:]
        ids = {r["id"] for r in heldout}
        own = {r["id"]: a for r, a in zip(recs, texts)}

        def fam_acc(rs, oks):
            out = {}
            for r, o in zip(rs, oks):
                out.setdefault(r["family"], []).append(o)
            return {f: sum(v) / len(v) for f, v in out.items()}

        lengths = [len(self.tok(a, add_special_tokens=False)["input_ids"]) for a in texts[:nh]]
        # preference accuracy on the held-out pairs (implicit reward, base as reference)
        idx = [i for i, x in enumerate(self.heldout_pairs) if x["id"] in ids]
        hp = [self.heldout_pairs[i] for i in idx]
        pc, _ = self._lp(self.model, hp, "chosen")
        pr, _ = self._lp(self.model, hp, "rejected")
        margins = [(c - self.base_lp["pair_chosen"][i]) - (r - self.base_lp["pair_rejected"][i])
                   for i, c, r in zip(idx, pc, pr)]
        pref = (sum(1.0 if m > TIE else 0.5 if m >= -TIE else 0.0 for m in margins) / len(margins)
                if margins else float("nan"))
        # KL proxy: log pi/pi_base of the policy's own greedy answers
        kl = [r for r in self.kl_recs if r["id"] in ids]
        kl_ans = [dict(r, own=own[r["id"]]) for r in kl]
        lp_pol, _ = self._lp(self.model, kl_ans, "own")
        lp_ref, _ = self._lp(self.ref_model, kl_ans, "own")
        logratio = sum(a - b for a, b in zip(lp_pol, lp_ref)) / max(1, len(kl))
        # general-ability probe: log-likelihood of the probe's reference answers, and whether
        # it beats a wrong answer in the same format (knowledge, whatever the answer style)
        ps, pn = self._lp(self.model, self.probe, "response")
        pd, _ = self._lp(self.model, self.probe, "distractor")
        bs, bn = self.base_lp["probe"]
        choice = [1 if a > b else 0 for a, b in zip(ps, pd)]
        # ... and of the held-out references (the trained families), on the KL subset
        hs, hn = self._lp(self.model, kl, "response")
        bhs = [self.base_lp["heldout_ref"][0][i] for i, r in enumerate(self.kl_recs)
               if r["id"] in ids]
        lo, hi = bootstrap_ci(h_ok, p.n_boot, seed=1)
        plo, phi = bootstrap_ci(p_ok, p.n_boot, seed=2)
        return {
            "heldout_accuracy": sum(h_ok) / nh, "heldout_accuracy_ci": [lo, hi],
            "per_family": fam_acc(heldout, h_ok), "pref_accuracy": pref,
            "mean_length": sum(lengths) / len(lengths), "logratio": logratio,
            "extra": {
                "probe_accuracy": sum(p_ok) / len(p_ok), "probe_accuracy_ci": [plo, phi],
                "probe_per_family": fam_acc(self.probe, p_ok),
                "probe_logp": sum(ps) / sum(pn),
                "probe_choice_accuracy": sum(choice) / len(choice),
                "probe_logp_delta": (sum(ps) - sum(bs)) / sum(pn),
                "heldout_ref_logp_delta": (sum(hs) - sum(bhs)) / sum(hn),
                "truncated": sum(not d for d in done[:nh]) / nh,
                "n_heldout": nh, "n_probe": len(p_ok), "n_pref_pairs": len(margins),
                "correct": {"heldout": "".join("1" if o else "0" for o in h_ok),
                            "probe": "".join("1" if o else "0" for o in p_ok),
                            "probe_choice": "".join(map(str, choice))},
                "heldout_ids": [r["id"] for r in heldout]},
            "answers": [{"id": r["id"], "family": r["family"], "answer": a, "correct": o,
                         "finished": d} for r, a, o, d in zip(recs, texts, ok, done)],
        }

    # -- one run ---------------------------------------------------------------------------
    def _train_pairs_arm(self, plan, arm, seed, d, pairs, steps, bar=None) -> dict:
        tdir = os.path.join(d, "train")
        os.makedirs(tdir, exist_ok=True)
        cfg = train_config(plan, arm, seed, steps)
        self._share_reference(pairs, cfg, tdir)
        torch.manual_seed(seed)
        cbs = [lambda step, m: bar.update(1)] if bar is not None else []
        res = train(self.model, self.tok, pairs, cfg, tdir, resume=True, callbacks=cbs)
        return {"steps": res["steps"], "improver_steps": 0, "last": res["last"],
                "curves": [os.path.relpath(res["metrics"], self.work)]}

    def _share_reference(self, pairs, cfg: TrainConfig, tdir: str) -> None:
        """The base model's reference log-probs of a pair set are the same for every arm and
        seed: computed once per pair set and copied into each run folder (the trainer checks
        its fingerprint and recomputes a file that does not match)."""
        if os.path.isfile(os.path.join(tdir, REF_FILE)):
            return
        obj = make_objective(pairs, self.tok, cfg)
        self.reset()
        # the file carries the fingerprint the trainer checks: the data's and the base model's
        # (without the model's it would never match and every run would recompute it)
        model_fp = model_fingerprint(self.model)
        shared = os.path.join(self.work, "reference", obj.fingerprint()[:16] + "-" + model_fp[:8])
        os.makedirs(shared, exist_ok=True)
        if not os.path.isfile(os.path.join(shared, REF_FILE)):
            dev = next(self.model.parameters()).device
            bf16 = cfg.bf16 if cfg.bf16 is not None else dev.type == "cuda"
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
                # under the autocast the trainer's policy uses
                obj.prepare(self.model, shared, model_fp)
        shutil.copyfile(os.path.join(shared, REF_FILE), os.path.join(tdir, REF_FILE) + ".tmp")
        os.replace(os.path.join(tdir, REF_FILE) + ".tmp", os.path.join(tdir, REF_FILE))

    def _train_sgpo_arm(self, plan, arm, seed, d) -> dict:
        cfg = sgpo_config(plan, arm, seed)
        torch.manual_seed(seed)
        sdir = os.path.join(d, "sgpo")
        if arm == "improver":  # the SGPO improver stage alone (search only)
            import random
            recs = random.Random(seed).sample(self.train_recs, plan.improver_prompts)
            s = improver_stage(self.model, self.tok, recs, cfg.validate(), os.path.join(sdir, "iter-0"),
                               0, resume=True)
            return {"steps": 0, "improver_steps": s["improver"]["steps"], "last": s["improver"]["last"],
                    "curves": []}
        sums = run_sgpo(self.model, self.tok, self.train_recs, cfg, sdir, resume=True)
        curves = [os.path.relpath(os.path.join(sdir, f"iter-{s['iteration']}", "preference",
                                               "metrics.jsonl"), self.work)
                  for s in sums if s["preference"]]
        return {"steps": sum(s["preference"]["steps"] for s in sums if s["preference"]),
                "improver_steps": sum(s["improver"]["steps"] for s in sums),
                "last": (sums[-1]["preference"] or {}).get("last", {}), "curves": curves,
                "sgpo": [{k: s[k] for k in ("iteration", "improver_examples", "candidates", "kept",
                                            "decisions")} for s in sums]}

    def run(self, arm: str, seed: int, d: str, plan: Optional[Plan] = None, heldout=None,
            bar=None) -> dict:
        """Train (unless ``base``) and evaluate one arm and seed in folder ``d``; the record is
        ``d/record.json`` (a finished run is read back, an interrupted one continues)."""
        rec_path = os.path.join(d, "record.json")
        if os.path.isfile(rec_path):
            with open(rec_path) as f:
                return json.load(f)
        plan = plan or self.plan
        os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        self.reset()
        if arm == "base":
            info = {"steps": 0, "improver_steps": 0, "last": {}, "curves": []}
            answers = self.base_answers
        else:
            answers = None
            if arm in PAIR_ARMS:
                info = self._train_pairs_arm(plan, arm, seed, d, self.train_pairs(plan), plan.steps, bar)
            else:
                info = self._train_sgpo_arm(plan, arm, seed, d)
        t_train = time.perf_counter() - t0
        ev = self.evaluate(heldout, answers)
        write_jsonl(os.path.join(d, "answers.jsonl"), ev.pop("answers"))
        extra = ev.pop("extra")
        wall = time.perf_counter() - t0
        result = {"arm": arm, "seed": seed, **ev, "steps": info["steps"], "wall_s": round(wall, 1)}
        result = {k: result[k] for k in RESULT_FIELDS}
        extra.update(arm=arm, seed=seed, improver_steps=info["improver_steps"],
                     train_s=round(t_train, 1), eval_s=round(wall - t_train, 1),
                     last_train_metrics=info["last"],
                     curve=_curve([os.path.join(self.work, c) for c in info["curves"]]),
                     **({"sgpo": info["sgpo"]} if "sgpo" in info else {}))
        record = {"result": result, "extra": extra}
        with open(rec_path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        _drop_weights(d)  # checkpoints and stage weights: the record is what stays
        self.say(f"{arm} seed {seed}: held-out {result['heldout_accuracy']:.3f} "
                 f"[{result['heldout_accuracy_ci'][0]:.3f}, {result['heldout_accuracy_ci'][1]:.3f}], "
                 f"probe {extra['probe_accuracy']:.3f} (by likelihood {extra['probe_choice_accuracy']:.3f}, "
                 f"log-lik {extra['probe_logp_delta']:+.3f}/token), "
                 f"pref {result['pref_accuracy']:.3f}, length {result['mean_length']:.1f}, "
                 f"log-ratio {result['logratio']:+.2f}; train {t_train:.0f} s, eval "
                 f"{wall - t_train:.0f} s")
        return record

    def run_lofo(self, family: str, bar=None) -> dict:
        """Train ``plan.lofo_arm`` on the pairs of the other five families, evaluate on the
        held-out tasks of ``family``."""
        p = self.plan
        d = os.path.join(self.work, "lofo", family)
        rec_path = os.path.join(d, "record.json")
        if os.path.isfile(rec_path):
            with open(rec_path) as f:
                return json.load(f)
        os.makedirs(d, exist_ok=True)
        t0 = time.perf_counter()
        self.reset()
        pairs = self.train_pairs(p, exclude_family=family)
        info = self._train_pairs_arm(p, p.lofo_arm, p.lofo_seed, d, pairs, p.lofo_steps, bar)
        recs = [r for r in self.heldout if r["family"] == family]
        texts, _ = self.answer(recs)
        ok = [bool(check(r, a)) for r, a in zip(recs, texts)]
        base_ok = [bool(check(r, self.base_answers[r["id"]]["answer"])) for r in recs]
        record = {"family": family, "arm": p.lofo_arm, "seed": p.lofo_seed, "steps": info["steps"],
                  "pairs": len(pairs), "accuracy": sum(ok) / len(ok),
                  "accuracy_ci": list(bootstrap_ci(ok, p.n_boot, seed=3)),
                  "base_accuracy": sum(base_ok) / len(base_ok), "n": len(ok),
                  "correct": "".join("1" if o else "0" for o in ok),
                  "wall_s": round(time.perf_counter() - t0, 1)}
        with open(rec_path + ".tmp", "w") as f:
            json.dump(record, f, indent=1)
        os.replace(rec_path + ".tmp", rec_path)
        _drop_weights(d)
        self.say(f"leave out {family}: {record['accuracy']:.3f} (base {record['base_accuracy']:.3f}) "
                 f"after {info['steps']} steps on {len(pairs)} pairs of the other families")
        return record


CURVE_KEYS = {"loss": "loss", "margin": "rewards/margins", "accuracy": "rewards/accuracies"}


def _curve(paths: Sequence[str]) -> Dict[str, list]:
    """Training curves of a run (its metric files in order, steps continued across files:
    the SGPO arms' preference stages): ``{"step": [...], "loss": [...], ...}``."""
    out: Dict[str, list] = {"step": [], **{k: [] for k in CURVE_KEYS}}
    offset = 0
    for path in paths:
        rows = [json.loads(line) for line in open(path) if line.strip()] if os.path.isfile(path) else []
        for r in rows:
            out["step"].append(offset + r["step"])
            for k, src in CURVE_KEYS.items():
                out[k].append(r.get(src))
        offset += len(rows)
    return out


def _drop_weights(d: str) -> None:
    for root, dirs, files in os.walk(d, topdown=False):
        if os.path.basename(root) == "checkpoints":
            shutil.rmtree(root, ignore_errors=True)
        for f in files:
            if f == "weights.pt":
                os.remove(os.path.join(root, f))


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

def _bar(total: int, desc: str, enabled: bool):
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, leave=True)


def _check_plan(work: str, plan: Plan, model: str) -> None:
    """A work folder belongs to one plan and model: its frozen pairs and records were made
    with them.  A different plan is an error (use another --work, or --fresh)."""
    path = os.path.join(work, "plan.json")
    want = {"model": model, **dataclasses.asdict(plan)}
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
        if diff:
            raise ValueError(f"{work} holds a study with other settings ({', '.join(diff)}): "
                             f"continue it with the same settings, pass --fresh to start over, or "
                             f"choose another --work")
    else:
        os.makedirs(work, exist_ok=True)
        with open(path, "w") as f:
            json.dump(want, f, indent=1)


def _parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Plan fields (--set name=value): " + ", ".join(
                                     f"{f.name}={f.default}" for f in fields(Plan)))
    ap.add_argument("--quick", action="store_true",
                    help="tiny random model and sizes: checks the pipeline and format in seconds")
    ap.add_argument("--model", default=None,
                    help="local HF model folder or embedded:smollm2-135m (default; --quick: tiny)")
    ap.add_argument("--device", default="auto", help="auto (cuda if present) | cpu | cuda")
    ap.add_argument("--seeds", default="0,1,2", help="seeds of the trained arms (comma-separated)")
    ap.add_argument("--arms", default=",".join(ARMS), help=f"subset of {','.join(ARMS)}")
    ap.add_argument("--no-lofo", action="store_true", help="skip leave-one-family-out")
    ap.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override a plan field (repeatable; see the list below)")
    ap.add_argument("--search", nargs="*", default=None, metavar="SPEC",
                    help="run the settings search instead of the study: each SPEC is "
                         "'name=value,...' over the plan (arm=dpo|sgdpo|...|improver picks the "
                         "arm, default sgdpo); no SPEC: the default grid (bench/quality_search.py)")
    ap.add_argument("--out", default=None, help="results folder (default "
                    "bench/results/quality-<machine>; --quick: <work>/results)")
    ap.add_argument("--work", default=None, help="runs and checkpoints (default runs/quality-<machine>)")
    ap.add_argument("--machine", default=None, help="name in the default folders (default detected)")
    ap.add_argument("--fresh", action="store_true", help="delete the work folder first")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = _parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from .runner import machine_name
    machine = a.machine or ("quick" if a.quick else machine_name(device))
    work = a.work or os.path.join(ROOT, "runs", f"quality-{machine}")
    if a.fresh and os.path.isdir(work):
        shutil.rmtree(work)
    os.makedirs(work, exist_ok=True)
    out = a.out or (os.path.join(work, "results") if a.quick
                    else os.path.join(RESULTS_ROOT, f"quality-{machine}"))
    plan = Plan(**QUICK) if a.quick else Plan()
    plan = plan.replace(**parse_overrides(a.set, plan)).validate()
    if a.model is None:
        if a.quick:
            from .tiny_lm import save_tiny
            model_name = save_tiny(os.path.join(work, "tiny-model"))
        else:
            model_name = "embedded:smollm2-135m"
    else:
        model_name = a.model
    seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    arms = [x.strip() for x in a.arms.split(",") if x.strip()]
    bad = [x for x in arms if x not in ARMS]
    if bad or not seeds:
        raise ValueError(f"--arms: unknown {bad}; known {ARMS}" if bad else "--seeds: none given")
    _check_plan(work, plan, model_name)
    model, tok = load_model(model_name, device=device, dtype=torch.float32)
    print(f"quality study: {model_name} on {device} ({torch.get_num_threads()} threads); work "
          f"{work}; results {out}", flush=True)
    st = Study(model, tok, plan, work, out)
    st.prepare()
    show = not a.no_progress
    if a.search is not None:
        from .quality_search import run_search
        run_search(st, a.search, out, show)
        return 0
    records = []
    for arm in ["base"] + [x for x in arms if x != "base"]:
        arm_seeds = [0] if arm == "base" else seeds
        steps = 0 if arm == "base" else plan.steps
        bar = _bar(len(arm_seeds) * (steps + 1), arm, show)
        for s in arm_seeds:
            d = os.path.join(work, "runs", arm, f"seed-{s}")
            before = bar.n if bar is not None else 0
            rec = st.run(arm, s, d, bar=bar if arm in PAIR_ARMS else None)
            if bar is not None:
                bar.update(before + steps + 1 - bar.n)
                bar.set_postfix(seed=s, acc=f"{rec['result']['heldout_accuracy']:.3f}")
            records.append(rec)
        if bar is not None:
            bar.close()
    lofo = []
    if not a.no_lofo:
        bar = _bar(len(st.families) * (plan.lofo_steps + 1), "leave-one-family-out", show)
        for fam in st.families:
            before = bar.n if bar is not None else 0
            lofo.append(st.run_lofo(fam, bar))
            if bar is not None:
                bar.update(before + plan.lofo_steps + 1 - bar.n)
        if bar is not None:
            bar.close()
    report.write(out, records, lofo, plan, {"model": model_name, "device": device,
                                            "machine": machine, "seeds": seeds,
                                            "threads": torch.get_num_threads()},
                 work, st.pairs)
    print(report.summary_text(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
