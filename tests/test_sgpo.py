"""SGPO: the filters (Tukey fences, minimum change) and the loop on a tiny random Llama:
well-formed pairs, decisions that drop what they should, resume, perplexity via the op."""
import json
import math
import os

import numpy as np
import pytest
import torch

from sgdpo_fast.data.records import read_jsonl
from sgdpo_fast.model.generation import GenConfig, generate
from sgdpo_fast.model.chat import chat_prompt
from sgdpo_fast.sgpo import SGPOConfig, answer_perplexity, decide, run_sgpo, similarity, tukey_fences
from sgdpo_fast.sgpo import loop as sgpo_loop
from sgdpo_fast.trainer import TrainConfig
from tiny_lm import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.mark.parametrize("vals", [[3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0], [1.0, 2.0, 3.0, 4.0],
                                  list(np.random.default_rng(0).lognormal(size=23))])
def test_tukey_fences_match_numpy_quartiles(vals):
    q1, q3 = np.percentile(vals, [25, 75])
    lo, hi = tukey_fences(vals, 1.5)
    assert lo == pytest.approx(q1 - 1.5 * (q3 - q1)) and hi == pytest.approx(q3 + 1.5 * (q3 - q1))


def test_tukey_needs_four_values():
    assert tukey_fences([1.0, 100.0, 2.0]) == (-math.inf, math.inf)


def test_decide_drops_what_it_should():
    originals = ["The answer is 4", "Paris", "hello world", "abc", "x", "y", "z", "w", "v", "u"]
    improved = ["The answer is 4", "  paris ", "hello world!", "", "a long new answer",
                "another new one", "third change", "fourth change", "fifth change", "outlier"]
    ppl = [5.0, 5.0, 5.0, 5.0, 3.0, 3.2, 2.9, 3.1, 3.0, 80.0]
    reasons, (lo, hi) = decide(originals, improved, ppl, max_similarity=0.9)
    assert reasons == ["identical", "identical", "too_similar", "empty", "kept", "kept", "kept",
                       "kept", "kept", "ppl_high"]
    assert hi < 80.0
    # a cut-off answer is dropped before the text rules, only when `finished` says so
    reasons, _ = decide(["a", "b"], ["new one", "other"], [2.0, 2.0], finished=[True, False])
    assert reasons == ["kept", "truncated"]
    # a low outlier, and a looser similarity threshold keeping the near-duplicate
    reasons, _ = decide(["a"] * 6, ["bb", "cc", "dd", "ee", "ff", "gg"],
                        [10.0, 10.5, 9.8, 10.2, 10.1, 0.5])
    assert reasons[-1] == "ppl_low" and reasons[:5] == ["kept"] * 5
    assert similarity("hello world", "hello world!") > 0.9
    assert decide(["hello world"], ["hello world!"], [1.0], max_similarity=1.0)[0] == ["kept"]


def test_answer_perplexity_matches_full_logits(tok):
    model = tiny_model(11)
    prompts, answers = ["Say hi.", "Count: 1 2 3"], ["hi", "4 5 6"]
    got = answer_perplexity(model, tok, prompts, answers)
    from sgdpo_fast.trainer.batches import encode
    for p, a, g in zip(prompts, answers, got):
        e = encode(tok, p, a)
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        tgt = torch.tensor(e.labels[1:])
        m = tgt != -100
        want = math.exp(-lp[m].gather(-1, tgt[m].unsqueeze(-1)).mean().item())
        assert g == pytest.approx(want, rel=1e-5)


def test_generate_is_batched_and_order_preserving(tok):
    model = tiny_model(12)
    prompts = [chat_prompt(tok, p) for p in ["a", "a much longer prompt here", "mid prompt"]]
    one = [generate(model, tok, [p], GenConfig(max_new_tokens=6, progress=False))[0] for p in prompts]
    batched = generate(model, tok, prompts, GenConfig(max_new_tokens=6, batch_size=3, progress=False))
    assert batched == one  # left padding does not change greedy answers


SFT = [{"prompt": f"Q{i}: repeat {w}", "response": w}
       for i, w in enumerate(["cat", "dog", "sun", "tree", "blue", "seven", "map", "owl"])]


def _fake_generate(calls):
    """Policy answers 'draft <prompt tail>'; the improver answers per prompt: unchanged,
    nearly unchanged, empty, or a real change."""
    def gen(model, tokenizer, prompts, cfg=None, desc="", with_finished=False):
        calls.append(desc)
        out = []
        for p in prompts:
            if "Draft answer" in p:
                q = p.split("Instruction:\n")[1].split("\n")[0]
                idx = int(q[1:q.index(":")])
                draft = p.split("Draft answer:\n")[1].split("<|im_end|>")[0]
                out.append([draft, draft + ".", "", f"better answer number {idx} " * 2][idx % 4]
                           if idx < 4 else f"a clearly improved reply {idx}")
            else:
                out.append("draft " + p.split("repeat ")[-1].split("<|im_end|>")[0])
        # the improvement of prompt 7 hit the token limit
        done = [not ("Draft answer" in p and "Q7:" in p) for p in prompts]
        return (out, done) if with_finished else out
    return gen


def _sgpo_cfg(iterations=1):
    t = dict(progress=False, lr=1e-3, batch_size=2, max_steps=2, save_every=1, warmup_ratio=0.0)
    return SGPOConfig(iterations=iterations, gen=GenConfig(max_new_tokens=8, progress=False),
                      improver_train=TrainConfig(loss_type="sft", save_final=False, **t),
                      pref_train=TrainConfig(loss_type="sgdpo", save_final=False, **t))


def test_sgpo_iteration_pairs_and_filters(tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sgpo_loop, "generate", _fake_generate(calls))
    model = tiny_model(13)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    out = str(tmp_path / "run")
    (s,) = run_sgpo(model, tok, SFT, _sgpo_cfg(), out)
    d = os.path.join(out, "iter-0")
    drafts = read_jsonl(os.path.join(d, "drafts.jsonl"))
    assert [x["draft"] for x in drafts] == ["draft " + r["response"] for r in SFT]
    pairs = read_jsonl(os.path.join(d, "pairs.jsonl"))
    assert len(pairs) == len(SFT) == s["candidates"]
    for p in pairs:
        assert set(p) >= {"prompt", "original", "improved", "ppl", "kept", "reason"}
        assert p["ppl"] > 1.0 and math.isfinite(p["ppl"])  # a random model: ppl well above 1
    by_idx = {int(p["prompt"][1:p["prompt"].index(":")]): p for p in pairs}
    assert by_idx[0]["reason"] == "identical" and by_idx[1]["reason"] == "too_similar"
    assert by_idx[2]["reason"] == "empty" and by_idx[7]["reason"] == "truncated"
    assert by_idx[7]["improved_finished"] is False and by_idx[6]["improved_finished"] is True
    # Tukey fences over the perplexities of the changed answers, recomputed here
    changed = [p for p in pairs if p["reason"] in ("kept", "ppl_high", "ppl_low")]
    lo, hi = tukey_fences([p["ppl"] for p in changed])
    for p in changed:
        assert p["kept"] == (lo <= p["ppl"] <= hi)
    kept = read_jsonl(os.path.join(d, "kept.jsonl"))
    assert kept == [{"prompt": p["prompt"], "chosen": p["improved"], "rejected": p["original"]}
                    for p in pairs if p["kept"]]
    assert s["kept"] == len(kept) >= 3
    # improver examples: 8 improver prompts with the model's drafts + 8 plain policy examples
    assert s["improver_examples"] == 16 and s["preference"]["steps"] == 2
    assert os.path.isfile(os.path.join(d, "preference", "weights.safetensors"))
    assert not os.path.exists(os.path.join(d, "preference", "checkpoints"))
    assert any(not torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    assert calls == ["iter 0: drafts", "iter 0: answers", "iter 0: improve"]


def test_sgpo_resume_skips_finished_work(tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sgpo_loop, "generate", _fake_generate(calls))
    out = str(tmp_path / "run")
    m1 = tiny_model(14)
    run_sgpo(m1, tok, SFT, _sgpo_cfg(1), out)
    with pytest.raises(ValueError, match="resume"):
        run_sgpo(tiny_model(14), tok, SFT, _sgpo_cfg(2), out)
    calls.clear()
    m2 = tiny_model(14)
    res = run_sgpo(m2, tok, SFT, _sgpo_cfg(2), out, resume=True)
    assert len(res) == 2
    assert calls == ["iter 1: drafts", "iter 1: answers", "iter 1: improve"]  # iteration 0 reused
    # the same two iterations in one go give the same model
    calls.clear()
    m3 = tiny_model(14)
    run_sgpo(m3, tok, SFT, _sgpo_cfg(2), str(tmp_path / "once"))
    for k, v in m3.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


def test_sgpo_config_errors():
    with pytest.raises(ValueError, match="iterations"):
        SGPOConfig(iterations=0).validate()
    with pytest.raises(ValueError, match="improver_template"):
        SGPOConfig(improver_template="no slots").validate()
    with pytest.raises(ValueError, match="pref_train"):
        SGPOConfig(pref_train=TrainConfig(loss_type="sft")).validate()


DRAFTS = [{"prompt": "Q0", "draft": "own answer 0", "response": "ref 0", "finished": True},
          {"prompt": "Q1", "draft": "cut off ans", "response": "ref 1", "finished": False},
          {"prompt": "Q2", "draft": "  ", "response": "ref 2", "finished": True}]


@pytest.mark.parametrize("target, policy", [
    ("reference", [("Q0", "ref 0"), ("Q1", "ref 1"), ("Q2", "ref 2"), ("Q0", "ref 0")]),
    # the model's own finished, non-empty drafts only: cut or empty ones would teach the policy
    # to stop mid-answer or say nothing
    ("draft", [("Q0", "own answer 0"), ("Q0", "own answer 0")]),
])
def test_improver_examples_policy_target(target, policy):
    cfg = SGPOConfig(policy_mix=4 / 3, policy_target=target)
    ex = sgpo_loop.improver_examples(DRAFTS, cfg)
    imp, pol = ex[:3], ex[3:]
    for x, d in zip(imp, DRAFTS):  # improver examples: the improver prompt -> the SFT reference
        assert "Draft answer:" in x["prompt"] and d["prompt"] in x["prompt"]
        assert x["response"] == d["response"]
    assert "(empty)" in imp[2]["prompt"]
    assert [(x["prompt"], x["response"]) for x in pol] == policy
    assert sgpo_loop.improver_examples(DRAFTS, SGPOConfig(policy_mix=0)) == imp


def test_improver_stage_alone_trains_and_resumes(tok, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sgpo_loop, "generate", _fake_generate(calls))
    cfg = _sgpo_cfg()
    cfg.policy_target = "draft"
    model = tiny_model(15)
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    d = str(tmp_path / "iter-0")
    info = sgpo_loop.improver_stage(model, tok, SFT[:4], cfg.validate(), d)
    drafts = read_jsonl(os.path.join(d, "drafts.jsonl"))
    assert [x["finished"] for x in drafts] == [True] * 4
    assert info["improver_examples"] == 8 and info["improver"]["steps"] == 2
    assert any(not torch.equal(v, w0[k]) for k, v in model.state_dict().items())
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    calls.clear()
    again = tiny_model(15)
    assert sgpo_loop.improver_stage(again, tok, SFT[:4], cfg, d, resume=True) == info
    assert calls == []  # drafts and training reused; the weights come from the stage
    for k, v in again.state_dict().items():
        assert torch.equal(v, trained[k]), k


def test_policy_target_is_checked():
    with pytest.raises(ValueError, match="policy_target"):
        SGPOConfig(policy_target="self").validate()
