"""The quality study (bench/quality.py, issue 15): `--quick` end to end on a tiny random
Llama (the result format, every arm, seeds, leave-one-family-out, the report), resume after
an interruption, the plan guard, the settings search, and the statistics against direct
computations."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from bench import quality, quality_report, quality_search
from bench.quality_stats import bootstrap_ci, paired_bootstrap, seed_spread

FIELDS = ["arm", "seed", "heldout_accuracy", "heldout_accuracy_ci", "per_family", "pref_accuracy",
          "mean_length", "logratio", "steps", "wall_s"]
FAMILIES = {"arithmetic", "counting", "sorting", "formatting", "extraction", "sequence"}


QUICK_LOG = []  # what the quick study printed


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    import contextlib
    import io
    work = tmp_path_factory.mktemp("quality")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert quality.main(["--quick", "--work", str(work), "--no-progress"]) == 0
    QUICK_LOG.append(buf.getvalue())
    return work


def _safetensors_metadata(path):
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


def test_reference_logprobs_are_computed_once_per_pair_set(quick):
    """The arms share the base model's reference log-probs: one file per pair set, and the
    copy in each preference-arm run carries the fingerprint that run's trainer checks
    (data and base model, as recorded in its config.json), so no run recomputes it."""
    import hashlib
    log = QUICK_LOG[0]
    assert "quality study:" in log  # the study's own lines were captured
    assert "was computed for other data" not in log, log[-2000:]
    shared = {}
    for d in (quick / "reference").iterdir():
        shared[d.name] = _safetensors_metadata(d / "reference_logps.safetensors")["fingerprint"]
    used, checked = set(), 0
    for cfg_path in quick.rglob("train/config.json"):
        fp = _load(cfg_path).get("fingerprints")
        key = f"{fp['data'][:16]}-{fp['model'][:8]}" if fp else None
        if key not in shared:
            continue  # an SGPO stage's own reference
        want = hashlib.sha256(f"{fp['data']} {fp['model']}".encode()).hexdigest()
        got = _safetensors_metadata(cfg_path.parent / "reference_logps.safetensors")
        assert got["fingerprint"] == want == shared[key], cfg_path
        used.add(key)
        checked += 1
    assert checked >= len(quality.PAIR_ARMS) * 3  # every pair arm and seed (and LOFO runs)
    assert used == set(shared)  # one shared file per pair set, each one used


def _load(path):
    with open(path) as f:
        return json.load(f)


def test_quick_result_format(quick):
    out = quick / "results"
    for f in ("results.json", "analysis.json", "results.md", "accuracy.png", "training.png",
              "pairs.jsonl"):
        assert (out / f).is_file(), f
    results = _load(out / "results.json")
    assert [r["arm"] for r in results] == ["base"] + [a for a in quality.ARMS[1:] for _ in range(3)]
    for r in results:
        assert list(r) == FIELDS  # exactly the fields, in its order
        assert r["seed"] in (0, 1, 2)
        lo, hi = r["heldout_accuracy_ci"]
        assert 0 <= lo <= r["heldout_accuracy"] <= hi <= 1
        assert set(r["per_family"]) == FAMILIES
        assert 0 <= r["pref_accuracy"] <= 1 and r["mean_length"] >= 0
        assert math.isfinite(r["logratio"]) and r["wall_s"] >= 0
        # overall accuracy is the mean of the (equal-sized) families
        assert r["heldout_accuracy"] == pytest.approx(np.mean(list(r["per_family"].values())))
    base = results[0]
    assert base["steps"] == 0 and base["pref_accuracy"] == 0.5 and base["logratio"] == 0.0
    plan = quality.Plan(**quality.QUICK)
    for r in results[1:]:
        assert r["steps"] == plan.steps  # equal compute: the SGPO arms' stages add up to it
    assert {(r["arm"], r["seed"]) for r in results[1:]} == \
        {(a, s) for a in quality.ARMS[1:] for s in (0, 1, 2)}


def test_quick_analysis_and_report(quick):
    out = quick / "results"
    results, an = _load(out / "results.json"), _load(out / "analysis.json")
    assert len(an["extra"]) == len(results)
    for r, e in zip(results, an["extra"]):
        assert (e["arm"], e["seed"]) == (r["arm"], r["seed"])
        bits = e["correct"]["heldout"]
        assert len(bits) == e["n_heldout"] == an["n_heldout"]
        assert bits.count("1") / len(bits) == pytest.approx(r["heldout_accuracy"])
        assert e["correct"]["probe"].count("1") / e["n_probe"] == pytest.approx(e["probe_accuracy"])
        assert set(e["probe_per_family"]) == {"letters", "calendar", "lists", "compare"}
    base = an["extra"][0]
    assert base["probe_logp_delta"] == 0.0 and base["heldout_ref_logp_delta"] == 0.0
    trained = [e for e in an["extra"] if e["arm"] != "base"]
    assert all(e["curve"]["step"] for e in trained)
    # the quick SGPO arms keep pairs and train on them
    for e in trained:
        if e["arm"].startswith("sgpo"):
            assert len(e["sgpo"]) == 2 and all(s["kept"] > 0 for s in e["sgpo"])
            assert e["improver_steps"] == 2
    assert {(p["a"], p["b"]) for p in an["paired"]} == set(quality_report.COMPARISONS)
    assert an["spread"]["dpo"]["heldout_accuracy"]["n"] == 3
    assert [x["family"] for x in an["lofo"]] == list(quality.FAMILIES)
    for x in an["lofo"]:
        assert x["steps"] == quality.QUICK["lofo_steps"] and 0 <= x["accuracy"] <= 1
    md = (out / "results.md").read_text()
    assert "| sgdpo − dpo |" in md and "Leave-one-family-out" in md
    # the report is rebuilt from the two JSON files alone
    os.remove(out / "results.md")
    assert quality_report.rebuild(str(out)) == md


def test_quick_rerun_reuses_every_record(quick, capsys):
    rec = quick / "runs" / "sgdpo" / "seed-1" / "record.json"
    before = rec.stat().st_mtime_ns
    assert quality.main(["--quick", "--work", str(quick), "--no-progress"]) == 0
    assert rec.stat().st_mtime_ns == before
    assert "seed 1: held-out" not in capsys.readouterr().out  # nothing was run again
    with pytest.raises(ValueError, match="other settings .*steps"):
        quality.main(["--quick", "--work", str(quick), "--set", "steps=4", "--no-progress"])


class _Interrupt:
    """A progress bar whose first update (after the first optimizer step) is a Ctrl-C."""
    n = 0

    def update(self, k):
        raise KeyboardInterrupt


def test_interrupted_run_continues_to_the_same_result(quick, tmp_path):
    from sgdpo_fast.model.loading import load_model
    model, tok = load_model(str(quick / "tiny-model"))
    plan = quality.Plan(**quality.QUICK).replace(steps=4)
    st = quality.Study(model, tok, plan, str(tmp_path / "w"), str(tmp_path / "o"), log=lambda m: None)
    st.prepare()
    d = str(tmp_path / "w" / "runs" / "dpo" / "seed-0")
    with pytest.raises(KeyboardInterrupt):
        st.run("dpo", 0, d, bar=_Interrupt())
    assert os.path.isdir(os.path.join(d, "train", "checkpoints"))
    assert not os.path.isfile(os.path.join(d, "record.json"))
    resumed = st.run("dpo", 0, d)
    assert not os.path.isdir(os.path.join(d, "train", "checkpoints"))  # dropped once recorded
    fresh = st.run("dpo", 0, str(tmp_path / "w" / "fresh"))
    for k in quality.RESULT_FIELDS:
        if k != "wall_s":
            assert resumed["result"][k] == fresh["result"][k], k
    assert resumed["extra"]["curve"] == fresh["extra"]["curve"]


def test_search_writes_the_tradeoff(quick, tmp_path):
    out = tmp_path / "search"
    specs = ["arm=dpo,lr=1e-4", "arm=improver,improver_lr=1e-4,policy_target=draft"]
    assert quality.main(["--quick", "--work", str(quick), "--out", str(out), "--no-progress",
                         "--search", *specs]) == 0
    s = _load(out / "search.json")
    assert [p["spec"] for p in s["points"]] == ["base"] + specs
    assert s["points"][1]["steps"] == quality.QUICK["steps"]
    assert s["points"][2]["improver_steps"] == 1 and s["points"][2]["steps"] == 0
    assert s["n_heldout"] == 6 * quality.QUICK["search_heldout_per_family"]
    assert (out / "tradeoff.png").is_file() and "arm=dpo,lr=1e-4" in (out / "search.md").read_text()
    assert quality_search.slug("arm=dpo, lr=1e-4") == "arm=dpo_lr=1e-4"


def test_plan_overrides_are_typed_and_checked():
    p = quality.Plan()
    assert quality.parse_overrides(["lr=1e-5,steps=64", "style=sentence", "sgpo_drop_truncated=false"],
                                   p) == {"lr": 1e-5, "steps": 64, "style": "sentence",
                                          "sgpo_drop_truncated": False}
    for bad, msg in (["nope=1"], "unknown setting"), (["steps=2.5"], "integer"), \
            (["lr=fast"], "float"), (["steps"], "name=value"):
        with pytest.raises(ValueError, match=msg):
            quality.parse_overrides(bad, p)
    with pytest.raises(ValueError, match="multiple of sgpo_iterations"):
        p.replace(steps=33).validate()
    with pytest.raises(ValueError, match="style"):
        p.replace(style="long").validate()
    with pytest.raises(ValueError, match="arms"):
        quality.main(["--quick", "--arms", "base,ppo"])


def test_arm_configs_differ_only_in_the_arm():
    p = quality.Plan()
    cfgs = {a: quality.train_config(p, a, 1) for a in quality.PAIR_ARMS}
    assert cfgs["dpo"].loss_type == "sigmoid" and cfgs["sgdpo"].loss_type == "sgdpo"
    assert (cfgs["sgdpo"].pilot_mode, cfgs["sgdpo"].pilot_grad) == ("different", False)
    assert cfgs["sgdpo_same"].pilot_mode == "same" and cfgs["sgdpo_grad"].pilot_grad
    assert (cfgs["sgdpo"].pilot_ratio_chosen, cfgs["sgdpo"].pilot_ratio_rejected) == (0.6, 0.9)
    same = ("lr", "beta", "max_steps", "batch_size", "grad_accum", "warmup_ratio", "seed",
            "max_length", "nll_alpha")
    for c in cfgs.values():
        assert [getattr(c, k) for k in same] == [getattr(cfgs["dpo"], k) for k in same]
    s = quality.sgpo_config(p, "sgpo_sgdpo", 1)
    assert s.iterations == 2 and s.pref_train.max_steps * s.iterations == p.steps
    assert s.pref_train.loss_type == "sgdpo" and quality.sgpo_config(p, "sgpo_dpo", 1) \
        .pref_train.loss_type == "sigmoid"
    assert s.improver_train.lr == p.improver_lr and s.policy_target == p.policy_target


def test_seq_logps_match_full_logits(quick):
    from sgdpo_fast.model.loading import load_model
    from sgdpo_fast.trainer.batches import encode
    model, tok = load_model(str(quick / "tiny-model"))
    plan = quality.Plan(**quality.QUICK)
    prompts, answers = ["What is 2 + 2?", "Say hi."], ["4", "hello there"]
    sums, counts = quality.seq_logps(model, tok, prompts, answers, plan)
    for p, a, s, n in zip(prompts, answers, sums, counts):
        e = encode(tok, p, a, max_length=plan.max_length, max_prompt_length=plan.max_prompt_length)
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([e.input_ids])).logits[0, :-1]
                                   .double(), -1)
        tgt = torch.tensor(e.labels[1:])
        m = tgt != -100
        assert n == int(m.sum()) == len(tok(a, add_special_tokens=False)["input_ids"]) + 1
        assert s == pytest.approx(lp[m].gather(-1, tgt[m, None]).sum().item(), rel=1e-5)


# ---------------------------------------------------------------------------------------
# statistics
# ---------------------------------------------------------------------------------------

def test_bootstrap_ci_of_a_proportion():
    rng = np.random.default_rng(0)
    x = (rng.random(400) < 0.3).astype(int)
    lo, hi = bootstrap_ci(x, n_boot=4000, seed=1)
    p = x.mean()
    half = 1.96 * math.sqrt(p * (1 - p) / len(x))  # the normal approximation
    assert lo < p < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_ci([1, 1, 1]) == (1.0, 1.0)
    assert bootstrap_ci(x, seed=3) == bootstrap_ci(x, seed=3)
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_bootstrap_sees_a_small_paired_effect():
    rng = np.random.default_rng(1)
    n = 300
    a = (rng.random(n) < 0.4).astype(int)
    b = a.copy()
    flip = rng.choice(np.flatnonzero(a == 1), 15, replace=False)
    b[flip] = 0  # B = A minus 15 right answers: +0.05, invisible to unpaired intervals
    d = paired_bootstrap(a, b, n_boot=2000, seed=0, resample_seeds=False)
    assert d["diff"] == pytest.approx(15 / n)
    assert 0 < d["lo"] <= d["diff"] <= d["hi"] and d["p"] < 0.01
    la, ha = bootstrap_ci(a, seed=0)
    lb, hb = bootstrap_ci(b, seed=0)
    assert la < hb  # the two unpaired intervals overlap
    # the same arm against itself: no difference
    same = paired_bootstrap([a, a], [a], n_boot=500)
    assert (same["diff"], same["lo"], same["hi"], same["p"]) == (0.0, 0.0, 0.0, 1.0)
    # seeds that disagree widen the interval when they are resampled
    a2 = np.stack([a, 1 - a])
    wide = paired_bootstrap(a2, b, n_boot=1000, seed=0)
    narrow = paired_bootstrap(a2, b, n_boot=1000, seed=0, resample_seeds=False)
    assert wide["hi"] - wide["lo"] > narrow["hi"] - narrow["lo"]
    with pytest.raises(ValueError, match="same prompts"):
        paired_bootstrap(a, b[:-1])


def test_seed_spread():
    s = seed_spread([0.2, 0.3, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["sd"] == pytest.approx(0.1)
    assert (s["min"], s["max"], s["n"]) == (0.2, 0.4, 3)
    assert seed_spread([0.5])["sd"] == 0.0
    with pytest.raises(ValueError):
        seed_spread([])
