"""Report of the quality study: ``results.json`` (the issue's fields, one record per arm and
seed), ``analysis.json`` (seed spread, paired differences, probe, leave-one-family-out,
per-prompt correctness, training curves), ``results.md`` and the plots.

``python -m bench.quality_report <results folder>`` rebuilds the markdown and the plots
from the two JSON files alone.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np

from .quality_stats import paired_bootstrap, seed_spread

# (a, b): "does a beat b?" on the same prompts; pairs whose arms are both present are kept
COMPARISONS = [
    ("dpo", "base"), ("sgdpo", "base"), ("sgdpo_same", "base"), ("sgdpo_grad", "base"),
    ("sgpo_dpo", "base"), ("sgpo_sgdpo", "base"),
    ("sgdpo", "dpo"), ("sgdpo_same", "sgdpo"), ("sgdpo_grad", "sgdpo"),
    ("sgpo_dpo", "dpo"), ("sgpo_sgdpo", "sgdpo"), ("sgpo_sgdpo", "sgpo_dpo"),
]
SPREAD_KEYS = ("heldout_accuracy", "pref_accuracy", "mean_length", "logratio")
EXTRA_SPREAD_KEYS = ("probe_accuracy", "probe_choice_accuracy", "probe_logp_delta",
                     "heldout_ref_logp_delta", "truncated")


def _bits(s: str) -> List[int]:
    return [1 if c == "1" else 0 for c in s]


def analyse(records: Sequence[dict], lofo: Sequence[dict], n_boot: int = 2000) -> dict:
    """Seed spread per arm and paired bootstrap differences (held-out and probe)."""
    arms: Dict[str, List[dict]] = {}
    for r in records:
        arms.setdefault(r["result"]["arm"], []).append(r)
    spread = {}
    for arm, rs in arms.items():
        spread[arm] = {k: seed_spread([r["result"][k] for r in rs]) for k in SPREAD_KEYS}
        spread[arm].update({k: seed_spread([r["extra"][k] for r in rs]) for k in EXTRA_SPREAD_KEYS})
        fams = sorted(rs[0]["result"]["per_family"])
        spread[arm]["per_family"] = {f: seed_spread([r["result"]["per_family"][f] for r in rs])
                                     for f in fams}
        spread[arm]["probe_per_family"] = {
            f: seed_spread([r["extra"]["probe_per_family"][f] for r in rs])
            for f in sorted(rs[0]["extra"]["probe_per_family"])}
    paired = []
    for a, b in COMPARISONS:
        if a not in arms or b not in arms:
            continue
        row = {"a": a, "b": b}
        for split in ("heldout", "probe", "probe_choice"):
            A = [_bits(r["extra"]["correct"][split]) for r in arms[a]]
            B = [_bits(r["extra"]["correct"][split]) for r in arms[b]]
            row[split] = paired_bootstrap(A, B, n_boot=n_boot, seed=7)
            row[split]["significant"] = row[split]["lo"] > 0 or row[split]["hi"] < 0
        paired.append(row)
    return {"spread": spread, "paired": paired, "lofo": list(lofo)}


def _pm(s: dict, fmt: str = "{:.3f}") -> str:
    return (fmt + " ± " + fmt).format(s["mean"], s["sd"]) if s["n"] > 1 else fmt.format(s["mean"])


def markdown(results: Sequence[dict], analysis: dict) -> str:
    meta, plan = analysis.get("meta", {}), analysis.get("plan", {})
    spread = analysis["spread"]
    arms = list(dict.fromkeys(r["arm"] for r in results))
    by_arm = {a: [r for r in results if r["arm"] == a] for a in arms}
    lines = [f"# Quality study: {meta.get('model', '?')} on {meta.get('device', '?')} "
             f"(`{meta.get('machine', '?')}`)", ""]
    lines.append(
        f"Held-out: {analysis.get('n_heldout', '?')} tasks (6 families), probe: "
        f"{analysis.get('n_probe', '?')} tasks (4 untrained families); {analysis.get('n_pairs', '?')} "
        f"frozen pairs; {plan.get('steps', '?')} steps x batch {plan.get('batch_size', '?')} x "
        f"accumulation {plan.get('grad_accum', '?')}, lr {plan.get('lr', '?')}, beta "
        f"{plan.get('beta', '?')}; seeds {meta.get('seeds', '?')}. Mean ± sd over seeds; "
        f"[interval] = bootstrap 95% over prompts of the seeds' pooled answers.")
    lines += ["", "| arm | seeds | held-out acc | 95% CI (pooled) | pref acc | mean length | "
                  "log-ratio | probe acc | probe by likelihood | probe log-lik Δ/token | steps | "
                  "wall s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in arms:
        sp = spread[a]
        ci = analysis.get("pooled_ci", {}).get(a)
        cis = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"
        wall = sum(r["wall_s"] for r in by_arm[a]) / len(by_arm[a])
        lines.append(f"| {a} | {len(by_arm[a])} | {_pm(sp['heldout_accuracy'])} | {cis} | "
                     f"{_pm(sp['pref_accuracy'])} | {_pm(sp['mean_length'], '{:.1f}')} | "
                     f"{_pm(sp['logratio'], '{:+.2f}')} | {_pm(sp['probe_accuracy'])} | "
                     f"{_pm(sp['probe_choice_accuracy'])} | "
                     f"{_pm(sp['probe_logp_delta'], '{:+.3f}')} | {by_arm[a][0]['steps']} | "
                     f"{wall:.0f} |")
    fams = sorted(spread[arms[0]]["per_family"]) if arms else []
    pf = sorted(spread[arms[0]]["probe_per_family"]) if arms else []
    lines += ["", "Per family (held-out, then probe; mean over seeds):", "",
              "| arm | " + " | ".join(fams + [f"probe: {f}" for f in pf]) + " |",
              "|---|" + "---|" * (len(fams) + len(pf))]
    for a in arms:
        sp = spread[a]
        lines.append(f"| {a} | " + " | ".join(
            [f"{sp['per_family'][f]['mean']:.2f}" for f in fams]
            + [f"{sp['probe_per_family'][f]['mean']:.2f}" for f in pf]) + " |")
    if analysis["paired"]:
        lines += ["", "Paired differences A − B on the same prompts (bootstrap over prompts and "
                      "seeds, 95%; * = the interval excludes 0):", "",
                  "| A − B | held-out | interval | p | probe | interval | p | probe by likelihood "
                  "| interval | p |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for row in analysis["paired"]:
            cells = []
            for split in ("heldout", "probe", "probe_choice"):
                d = row[split]
                cells += [f"{d['diff']:+.3f}{' *' if d['significant'] else ''}",
                          f"[{d['lo']:+.3f}, {d['hi']:+.3f}]", f"{d['p']:.3f}"]
            lines.append(f"| {row['a']} − {row['b']} | " + " | ".join(cells) + " |")
    if analysis["lofo"]:
        lines += ["", "Leave-one-family-out (train on the other five families' pairs, evaluate the "
                      "left-out family's held-out tasks):", "",
                  "| left out | arm | steps | pairs | accuracy | 95% CI | base | trained with it |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in analysis["lofo"]:
            with_it = spread.get(r["arm"], {}).get("per_family", {}).get(r["family"])
            lines.append(f"| {r['family']} | {r['arm']} | {r['steps']} | {r['pairs']} | "
                         f"{r['accuracy']:.3f} | [{r['accuracy_ci'][0]:.3f}, "
                         f"{r['accuracy_ci'][1]:.3f}] | {r['base_accuracy']:.3f} | "
                         + (f"{with_it['mean']:.3f}" if with_it else "-") + " |")
    lines += ["", "Columns: *pref acc* = share of held-out pairs (reference answer vs the base "
                  "model's wrong answer) whose implicit reward (log-ratio to the base model) ranks "
                  "the reference first (ties half); *mean length* = tokens of the held-out answers "
                  f"(cut at {plan.get('max_new_tokens', '?')}); *log-ratio* = mean log "
                  "pi(y|x)/pi_base(y|x) of the model's own greedy held-out answers (KL proxy); "
                  "*probe by likelihood* = share of probe tasks whose reference answer is more "
                  "likely than a wrong answer in the same format (what the model knows on "
                  "untrained tasks, whatever style it answers in); *probe log-lik Δ* = change of "
                  "the mean per-token log-likelihood of the probe's reference answers against the "
                  "base model: it also rises when the model adopts the references' terse format, "
                  "so read it with the two probe accuracies."]
    return "\n".join(lines) + "\n"


def plot(results: Sequence[dict], analysis: dict, out: str) -> List[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return []
    arms = list(dict.fromkeys(r["arm"] for r in results))
    written = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for ax, key, title in ((axes[0], "heldout", "held-out accuracy (trained families)"),
                           (axes[1], "probe", "probe accuracy (untrained families)")):
        for i, a in enumerate(arms):
            ex = [e for e in analysis["extra"] if e["arm"] == a]
            accs = [e["probe_accuracy"] if key == "probe" else
                    next(r["heldout_accuracy"] for r in results if r["arm"] == a
                         and r["seed"] == e["seed"]) for e in ex]
            cis = [e["probe_accuracy_ci"] if key == "probe" else
                   next(r["heldout_accuracy_ci"] for r in results if r["arm"] == a
                        and r["seed"] == e["seed"]) for e in ex]
            xs = [i + (j - (len(ex) - 1) / 2) * 0.12 for j in range(len(ex))]
            ax.errorbar(xs, accs, yerr=[[m - c[0] for m, c in zip(accs, cis)],
                                        [c[1] - m for m, c in zip(accs, cis)]],
                        fmt="o", ms=4, capsize=2, color=f"C{i}")
            ax.hlines(np.mean(accs), i - 0.3, i + 0.3, color=f"C{i}")
        ax.set_xticks(range(len(arms)))
        ax.set_xticklabels(arms, rotation=30, ha="right", fontsize=8)
        ax.set_title(title + ": seeds, 95% CI", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = os.path.join(out, "accuracy.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    written.append(path)
    trained = [a for a in arms if any(e["curve"]["step"] for e in analysis["extra"] if e["arm"] == a)]
    if trained:
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
        for k, (key, title) in enumerate((("loss", "loss"), ("margin", "reward margin"),
                                          ("accuracy", "reward accuracy (train batch)"))):
            ax = axes[k]
            for i, a in enumerate(arms):
                if a not in trained:
                    continue
                for j, e in enumerate(x for x in analysis["extra"] if x["arm"] == a):
                    c = e["curve"]
                    pts = [(s, v) for s, v in zip(c["step"], c[key]) if v is not None]
                    if pts:
                        ax.plot(*zip(*pts), color=f"C{i}", alpha=0.7, lw=1,
                                label=a if j == 0 else None)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("preference step")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(out, "training.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write(out: str, records: Sequence[dict], lofo: Sequence[dict], plan, meta: dict, work: str,
          pairs: Sequence[dict]) -> None:
    """Write every output file of a study into ``out``."""
    import dataclasses

    from .quality_stats import bootstrap_ci
    os.makedirs(out, exist_ok=True)
    results = [r["result"] for r in records]
    analysis = analyse(records, lofo, plan.n_boot)
    pooled = {}
    for a in dict.fromkeys(r["arm"] for r in results):
        bits = [b for r in records if r["result"]["arm"] == a
                for b in _bits(r["extra"]["correct"]["heldout"])]
        pooled[a] = list(bootstrap_ci(bits, plan.n_boot, seed=5))
    analysis.update(meta=meta, plan=dataclasses.asdict(plan), pooled_ci=pooled,
                    n_pairs=len(pairs), n_heldout=records[0]["extra"]["n_heldout"],
                    n_probe=records[0]["extra"]["n_probe"],
                    extra=[r["extra"] for r in records])
    _dump(os.path.join(out, "results.json"), results)
    _dump(os.path.join(out, "analysis.json"), analysis)
    src = os.path.join(work, "pairs.jsonl")
    if os.path.isfile(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, "pairs.jsonl")):
        shutil.copyfile(src, os.path.join(out, "pairs.jsonl"))
    rebuild(out)


def rebuild(out: str) -> str:
    """results.md and the plots from results.json + analysis.json."""
    with open(os.path.join(out, "results.json")) as f:
        results = json.load(f)
    with open(os.path.join(out, "analysis.json")) as f:
        analysis = json.load(f)
    md = markdown(results, analysis)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    plot(results, analysis, out)
    return md


def summary_text(out: str) -> str:
    with open(os.path.join(out, "results.md")) as f:
        return f.read()


def _dump(path: str, obj) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    print(rebuild(sys.argv[1]))
