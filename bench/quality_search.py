"""Settings search of the quality study (``python -m bench.quality --search [SPEC ...]``):
one seed per setting, the held-out tasks cut to ``search_heldout_per_family`` per family
and the whole probe, so a point costs one short training and one evaluation.  The output
is the trade-off between the trained families (held-out accuracy) and the untrained ones
(probe accuracy, probe log-likelihood): ``search.json``, ``search.md``, ``tradeoff.png``.

A SPEC overrides plan fields, ``"lr=1e-5,beta=0.5"``; ``arm=`` picks the arm (default
``sgdpo``; ``improver`` is the SGPO improver stage alone, what the issue found harmful).
Overrides change training only; the evaluation is the study's.
"""
from __future__ import annotations

import json
import os
import re
from typing import List, Sequence

# The SGPO improver stage alone with the earlier demo's settings (the suspect) and the
# study's; SGDPO at the study's settings and one factor of the list changed at a time
# (learning rate, steps, beta, pilot ratios, the NLL/RPO term, the reference answers' style).
# The committed search.md is this grid (about 45 min on 2 cores).
DEFAULT_GRID = [
    "arm=improver,improver_lr=2e-5,policy_target=reference,improver_steps=12",
    "arm=improver",
    "arm=sgdpo,lr=2e-5",
    "arm=sgdpo",
    "arm=sgdpo,beta=0.5",
    "arm=sgdpo,steps=32",
    "arm=sgdpo,nll_alpha=0.2",
    "arm=sgdpo,style=sentence",
    "arm=sgdpo,pilot_ratio_chosen=0.3,pilot_ratio_rejected=0.6",
    "arm=sgdpo,lr=1e-6",
]


def slug(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", spec.strip()) or "default"


def run_search(st, specs: Sequence[str], out: str, show: bool = True) -> List[dict]:
    """Run every SPEC (the default grid when none) on study ``st``; write the report."""
    from .quality import PAIR_ARMS, SEARCH_ARMS, _bar, parse_overrides
    specs = list(specs) or DEFAULT_GRID
    subset = [r for f in st.families
              for r in [x for x in st.heldout if x["family"] == f][:st.plan.search_heldout_per_family]]
    root = os.path.join(st.work, "search")
    points = []
    base = st.run("base", 0, os.path.join(root, "base"), heldout=subset)
    points.append(_point("base", "base", base))
    for spec in specs:
        ov = parse_overrides([spec], st.plan)
        arm = ov.pop("arm", "sgdpo")
        if arm not in SEARCH_ARMS:
            raise ValueError(f"search arm must be one of {SEARCH_ARMS}, got {arm!r}")
        plan = st.plan.replace(**ov).validate()
        steps = plan.steps if arm in PAIR_ARMS else 0
        bar = _bar(steps + 1, spec, show)
        rec = st.run(arm, 0, os.path.join(root, slug(spec)), plan=plan, heldout=subset,
                     bar=bar if arm in PAIR_ARMS else None)
        if bar is not None:
            bar.update(steps + 1 - bar.n)
            bar.close()
        points.append(_point(spec, arm, rec))
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "search.json.tmp"), "w") as f:
        json.dump({"plan": st.plan.__dict__, "n_heldout": len(subset), "points": points}, f, indent=1)
    os.replace(os.path.join(out, "search.json.tmp"), os.path.join(out, "search.json"))
    md = markdown(points, len(subset))
    with open(os.path.join(out, "search.md"), "w") as f:
        f.write(md)
    plot(points, os.path.join(out, "tradeoff.png"))
    print(md)
    return points


def _point(spec: str, arm: str, rec: dict) -> dict:
    r, e = rec["result"], rec["extra"]
    return {"spec": spec, "arm": arm, "heldout_accuracy": r["heldout_accuracy"],
            "heldout_accuracy_ci": r["heldout_accuracy_ci"], "per_family": r["per_family"],
            "probe_accuracy": e["probe_accuracy"], "probe_accuracy_ci": e["probe_accuracy_ci"],
            "probe_per_family": e["probe_per_family"], "probe_logp_delta": e["probe_logp_delta"],
            "probe_choice_accuracy": e.get("probe_choice_accuracy"),
            "heldout_ref_logp_delta": e["heldout_ref_logp_delta"],
            "pref_accuracy": r["pref_accuracy"], "mean_length": r["mean_length"],
            "logratio": r["logratio"], "steps": r["steps"], "improver_steps": e["improver_steps"],
            "wall_s": r["wall_s"]}


def markdown(points: Sequence[dict], n_heldout: int) -> str:
    base = points[0]
    lines = [f"Settings search: one seed each, {n_heldout} held-out tasks, the whole probe. "
             "Δ = against the base model on the same prompts.", "",
             "| setting | held-out | Δ | probe | Δ | probe by likelihood | Δ | probe log-lik "
             "Δ/token | held-out ref log-lik Δ/token | pref acc | length | log-ratio | steps | "
             "wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        lines.append(
            f"| {p['spec']} | {p['heldout_accuracy']:.3f} | "
            f"{p['heldout_accuracy'] - base['heldout_accuracy']:+.3f} | {p['probe_accuracy']:.3f} | "
            f"{p['probe_accuracy'] - base['probe_accuracy']:+.3f} | "
            f"{_num(p['probe_choice_accuracy'])} | "
            f"{_delta(p['probe_choice_accuracy'], base['probe_choice_accuracy'])} | "
            f"{p['probe_logp_delta']:+.3f} | "
            f"{p['heldout_ref_logp_delta']:+.3f} | {p['pref_accuracy']:.3f} | "
            f"{p['mean_length']:.1f} | {p['logratio']:+.2f} | "
            f"{p['steps'] or p['improver_steps']} | {p['wall_s']:.0f} |")
    return "\n".join(lines) + "\n"


def _num(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def _delta(x, b) -> str:
    return "-" if x is None or b is None else f"{x - b:+.3f}"


def plot(points: Sequence[dict], path: str):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return None
    # points are numbered on the axes and named in one legend below them (a setting's
    # name is too long to print beside its point)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2 + 0.22 * len(points)))
    base = points[0]

    def colors(i):  # base is black, so C0-C9 serve 11 points; more points take tab20
        return f"C{i % 10}" if len(points) <= 11 else plt.cm.tab20(i % 20)

    for ax, xkey, xlabel in ((axes[0], "probe_accuracy", "probe accuracy (untrained families)"),
                             (axes[1], "probe_choice_accuracy",
                              "probe: reference more likely than a wrong answer")):
        at = {}  # points on the same spot share one label ("4,9")
        for i, p in enumerate(points):
            if p.get(xkey) is None:
                continue
            is_base = p["arm"] == "base"
            ax.scatter(p[xkey], p["heldout_accuracy"], marker="*" if is_base else "o",
                       s=90 if is_base else 30, color="k" if is_base else colors(i),
                       label=f"{i}: {p['spec']} (answers {p['mean_length']:.1f} tokens)")
            at.setdefault((round(p[xkey], 6), round(p["heldout_accuracy"], 6)), []).append(str(i))
        # a label that would land on an earlier one (labels are wide: within 8% of the axes'
        # width and 4% of their height) goes higher above its point
        x0, x1 = ax.get_xlim()
        y0, y1 = ax.get_ylim()
        placed = []
        for (x, y), names in at.items():
            u, v = (x - x0) / ((x1 - x0) or 1), (y - y0) / ((y1 - y0) or 1)
            near = any(abs(u - a) < 0.08 and abs(v - b) < 0.04 for a, b in placed)
            placed.append((u, v))
            ax.annotate(",".join(names), (x, y), fontsize=8, xytext=(4, 12 if near else 3),
                        textcoords="offset points")
        ax.axhline(base["heldout_accuracy"], color="k", lw=0.5, ls=":")
        ax.axvline(base[xkey], color="k", lw=0.5, ls=":")
        ax.set_xlabel(xlabel, fontsize=9)
        ax.set_ylabel("held-out accuracy (trained families)", fontsize=9)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", fontsize=7, frameon=False)
    fig.subplots_adjust(bottom=(0.17 * len(points) + 0.6) / (4.2 + 0.22 * len(points)))
    fig.suptitle("help (up) vs harm (left): one seed per setting", fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
