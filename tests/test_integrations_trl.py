"""TRL integration on a tiny random Llama with a tokenizer built offline (WordLevel
vocabulary wrapped in PreTrainedTokenizerFast, with a chat template; no download).

* SGDPOTrainer with TRL's loss types == TRL's DPOTrainer (loss rel 1e-5, grads rel 1e-4),
  with sgdpo_fast's op verifiably doing the LM head;
* loss_type="sgdpo" trains a few steps: finite loss, reward and pilot metrics logged;
* patch_trl() leaves TRL's results unchanged (same tolerances) and unpatch_trl() restores.
"""
import copy
import math
import os
import random

import pytest
import torch

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

import sgdpo_fast.integrations.hf as hf_mod  # noqa: E402
from sgdpo_fast.integrations import trl as sgtrl  # noqa: E402
from sgdpo_fast.integrations.trl import SGDPOConfig, SGDPOTrainer, patch_trl, unpatch_trl  # noqa: E402
from oracle import SEED, rel_err  # noqa: E402

WORDS = ("the a cat dog sat on mat ran fast slow red blue big small is was and or not yes no "
         "good bad hello world what why how user assistant").split()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def make_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2}
    for w in WORDS:
        vocab[w] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tk = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                 unk_token="<unk>")
    tk.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}assistant {% endif %}")
    return tk


def _sentence(rng, lo, hi):
    return " ".join(rng.choice(WORDS[:-2]) for _ in range(rng.randint(lo, hi)))


@pytest.fixture(scope="module")
def dataset():
    rng = random.Random(SEED)
    rows = []
    for i in range(8):
        prompt = _sentence(rng, 2, 5)
        if i % 2:  # conversational rows go through the chat template
            rows.append({"prompt": [{"role": "user", "content": prompt}],
                         "chosen": [{"role": "assistant", "content": _sentence(rng, 1, 6)}],
                         "rejected": [{"role": "assistant", "content": _sentence(rng, 1, 6)}]})
        else:
            rows.append({"prompt": prompt, "chosen": " " + _sentence(rng, 1, 6),
                         "rejected": " " + _sentence(rng, 1, 6)})
    conv = Dataset.from_list([r for r in rows if isinstance(r["prompt"], list)])
    plain = Dataset.from_list([r for r in rows if not isinstance(r["prompt"], list)])
    return {"conv": conv, "plain": plain}


@pytest.fixture(scope="module")
def models_():
    return make_models()


def make_models():
    torch.manual_seed(SEED)
    cfg = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      pad_token_id=0, eos_token_id=1, bos_token_id=None)
    ref = LlamaForCausalLM(cfg)
    policy = copy.deepcopy(ref)
    with torch.no_grad():  # policy != reference, so the loss is not the trivial log 2
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return policy, ref


def _trainer(cls, cfg_cls, models_, tokenizer, data, tmp_path, **kw):
    policy, ref = models_
    # fp32: TRL 1.16 defaults to bf16 autocast even on CPU, where its chunked head rounds the
    # logits to bf16 and ours keeps them in fp32 (the numerics contract): equality is an fp32
    # property
    kw.setdefault("bf16", False)
    args = cfg_cls(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=4,
                   use_cpu=True, save_strategy="no", logging_steps=1, disable_dropout=True, **kw)
    return cls(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
               train_dataset=data, processing_class=tokenizer)


def _loss_and_grads(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in trainer.model.parameters()])
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics


class _Counter:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a, **k):
        self.calls += 1
        return self.fn(*a, **k)


@pytest.mark.parametrize("loss_type,extra", [
    ("sigmoid", {}),
    ("ipo", {}),
    ("robust", {"label_smoothing": 0.1}),
])
def test_trl_loss_types_match_dpo_trainer(models_, tokenizer, dataset, tmp_path, monkeypatch,
                                          loss_type, extra):
    for split in ("plain", "conv"):
        theirs = _trainer(DPOTrainer, DPOConfig, models_, tokenizer, dataset[split], tmp_path,
                          loss_type=loss_type, **extra)
        counter = _Counter(hf_mod.causal_lm_logprobs)
        monkeypatch.setattr(hf_mod, "causal_lm_logprobs", counter)
        ours = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset[split], tmp_path,
                        loss_type=loss_type, **extra)
        batch = next(iter(theirs.get_train_dataloader()))
        l1, g1, m1 = _loss_and_grads(theirs, batch)
        assert counter.calls == 0  # TRL's trainer does not touch our op
        l2, g2, m2 = _loss_and_grads(ours, batch)
        assert counter.calls == 2  # policy and reference heads both ran our op
        assert not math.isclose(l1.item(), math.log(2), rel_tol=1e-4)
        assert torch.allclose(l2, l1, rtol=1e-5, atol=1e-7), (l1, l2)
        assert rel_err(g2, g1) < 1e-4
        for key in ("rewards/margins", "logps/chosen", "entropy", "mean_token_accuracy",
                    "logits/chosen"):
            assert math.isclose(m1[key], m2[key], rel_tol=1e-4, abs_tol=1e-5), key
        monkeypatch.undo()


def test_sgdpo_trains_and_logs(models_, tokenizer, dataset, tmp_path):
    pytest.importorskip("sgdpo_fast.losses")
    trainer = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                       loss_type="sgdpo", max_steps=3, learning_rate=1e-2, pilot_seed=7)
    before = copy.deepcopy(trainer.model.lm_head.weight.detach())
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3
    for h in logs:
        assert math.isfinite(h["loss"])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "entropy", "mean_token_accuracy"):
            assert math.isfinite(h[key]), key
    trl_keys = {"loss", "grad_norm", "learning_rate", "epoch", "step", "num_tokens", "entropy",
                "mean_token_accuracy"}
    pilot_keys = [k for k in logs[0] if "pilot" in k and k not in trl_keys]
    assert pilot_keys, f"no pilot metrics logged: {sorted(logs[0])}"
    assert not torch.equal(trainer.model.lm_head.weight.detach(), before)


def test_sgdpo_with_unit_ratios_equal_length_is_half_dpo_gradient(models_, tokenizer, tmp_path):
    """DESIGN: r1 = r2 = 1 on equal-length pairs gives DPO's loss and half its gradient."""
    pytest.importorskip("sgdpo_fast.losses")
    rng = random.Random(SEED)
    rows = []
    for _ in range(4):
        n = rng.randint(2, 5)
        rows.append({"prompt": _sentence(rng, 2, 4), "chosen": " " + _sentence(rng, n, n),
                     "rejected": " " + _sentence(rng, n, n)})
    data = Dataset.from_list(rows)
    dpo = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, data, tmp_path, loss_type="sigmoid")
    sg = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, data, tmp_path, loss_type="sgdpo",
                  pilot_ratio_chosen=1.0, pilot_ratio_rejected=1.0)
    batch = next(iter(dpo.get_train_dataloader()))
    c, r = batch["completion_mask"].chunk(2)
    assert torch.equal(c.sum(1), r.sum(1))  # equal completion lengths (EOS included)
    l1, g1, _ = _loss_and_grads(dpo, batch)
    l2, g2, _ = _loss_and_grads(sg, batch)
    assert torch.allclose(l2, l1, rtol=1e-5)
    assert rel_err(g2, 0.5 * g1) < 1e-4


def test_patch_trl_leaves_results_unchanged(models_, tokenizer, dataset, tmp_path, monkeypatch):
    import trl.trainer.utils as tu
    original = tu._ChunkedLogProbFunction
    vanilla = _trainer(DPOTrainer, DPOConfig, models_, tokenizer, dataset["plain"], tmp_path)
    batch = next(iter(vanilla.get_train_dataloader()))
    l1, g1, m1 = _loss_and_grads(vanilla, batch)
    counter = _Counter(sgtrl.head_logprobs_and_metrics)
    monkeypatch.setattr(sgtrl, "head_logprobs_and_metrics", counter)
    patch_trl()
    try:
        patch_trl()  # idempotent
        assert sgtrl.is_trl_patched()
        # a model TRL patched before patch_trl() uses our op too
        l2, g2, m2 = _loss_and_grads(vanilla, batch)
        assert counter.calls == 2
        fresh = _trainer(DPOTrainer, DPOConfig, models_, tokenizer, dataset["plain"], tmp_path)
        l3, g3, m3 = _loss_and_grads(fresh, batch)
        assert counter.calls == 4
    finally:
        unpatch_trl()
    assert tu._ChunkedLogProbFunction is original and not sgtrl.is_trl_patched()
    for l_, g_, m_ in ((l2, g2, m2), (l3, g3, m3)):
        assert torch.allclose(l_, l1, rtol=1e-5, atol=1e-7)
        assert rel_err(g_, g1) < 1e-4
        for key in ("rewards/margins", "entropy", "mean_token_accuracy", "logits/rejected"):
            assert math.isclose(m1[key], m_[key], rel_tol=1e-4, abs_tol=1e-5), key


def test_patched_head_refuses_entropy_gradient():
    h = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    t = torch.randint(0, 11, (5,))
    lp, ent, _, _, _ = sgtrl._ChunkedLogProbShim().apply(h, w, None, t, 1.0, 4096, None, 1.0,
                                                        ("entropy",))
    (lp.sum() + 0.0 * ent.sum()).backward()  # a zero entropy coefficient is fine
    with pytest.raises(RuntimeError, match="unpatch_trl"):
        (lp.sum() + ent.sum()).backward()


def test_sgdpo_config_validation(tmp_path):
    base = dict(output_dir=str(tmp_path), report_to="none", use_cpu=True)
    with pytest.raises(ValueError, match="kto"):
        SGDPOConfig(**base, loss_type=["sgdpo", "kto"])
    with pytest.raises(ValueError, match="TRL's loss types"):
        SGDPOConfig(**base, loss_type=["sgdpo", "simpo"])
    with pytest.raises(ValueError, match="pilot_ratio_chosen"):
        SGDPOConfig(**base, loss_type="sgdpo", pilot_ratio_chosen=0.0)
    with pytest.raises(ValueError, match="pilot_mode"):
        SGDPOConfig(**base, loss_type="sgdpo", pilot_mode="both")
    with pytest.raises(ValueError, match="TRL 1.16 ignores it"):
        SGDPOConfig(**base, loss_type=["sgdpo", "sigmoid"], label_smoothing=0.1)
    with pytest.raises(ValueError, match="f_divergence_type"):
        SGDPOConfig(**base, loss_type=["sgdpo", "bco_pair"], f_divergence_type="forward_kl")
    with pytest.raises(ValueError, match="loss_weights"):
        SGDPOConfig(**base, loss_type=["sgdpo", "sft"], loss_weights=[1.0])
    cfg = SGDPOConfig(**base)
    assert cfg.loss_type == ["sgdpo"]                      # the default of this entry point
    assert (cfg.pilot_ratio_chosen, cfg.pilot_ratio_rejected, cfg.beta) == (0.6, 0.9, 0.1)
    SGDPOConfig(**base, loss_type=["sgdpo", "sft"], precompute_ref_log_probs=True, ld_alpha=0.5,
                f_divergence_type="js_divergence", label_smoothing=0.1)
    assert DPOConfig(**base).loss_type == ["sigmoid"]     # TRL's default is untouched


def test_config_mistakes_fail_when_the_trainer_is_built(models_, tokenizer, dataset, tmp_path):
    """Issue 13 item 4: not at the first step, and the message says what to use."""
    with pytest.raises(ValueError, match="SGDPOConfig"):
        _trainer(SGDPOTrainer, DPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                 loss_type="sgdpo")
    with pytest.raises(ValueError, match="build sgdpo_fast.integrations.trl.SGDPOTrainer"):
        _trainer(DPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                 loss_type="sgdpo")
    with pytest.raises(ValueError, match="unknown loss_type"):
        _trainer(SGDPOTrainer, DPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                 loss_type="kto")
    # TRL's loss types in TRL's trainer with our config class are fine
    _trainer(DPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path, loss_type="hinge")


@pytest.mark.parametrize("extra", [{}, {"ld_alpha": 0.5}])
def test_sgdpo_path_runs_trl_types_as_trl_does(models_, tokenizer, dataset, tmp_path, extra):
    """With 'sgdpo' in the list the whole list goes through preference_loss: weight 0 on
    sgdpo leaves TRL's own loss types, which must equal TRL's trainer on the same batch."""
    types, weights = ["bco_pair", "sft"], [0.2, 1.0]
    theirs = _trainer(DPOTrainer, DPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                      loss_type=types, loss_weights=weights, **extra)
    ours = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                    loss_type=["sgdpo"] + types, loss_weights=[0.0] + weights, **extra)
    batch = next(iter(theirs.get_train_dataloader()))
    l1, g1, m1 = _loss_and_grads(theirs, batch)
    l2, g2, m2 = _loss_and_grads(ours, batch)
    assert torch.allclose(l2, l1, rtol=1e-5, atol=1e-7), (l1, l2)
    assert rel_err(g2, g1) < 1e-4
    for key in ("rewards/margins", "logps/chosen", "logps/rejected", "entropy"):
        assert math.isclose(m1[key], m2[key], rel_tol=1e-4, abs_tol=1e-5), key


def _final_params(trainer):
    return torch.cat([p.detach().flatten() for p in trainer.model.parameters()])


def test_sgdpo_precomputed_reference_equals_live_reference(models_, tokenizer, dataset, tmp_path):
    """precompute_ref_log_probs=True with sgdpo: per-token reference log-probs stored with
    the dataset, no reference model kept, and the same training as a live reference."""
    kw = dict(loss_type="sgdpo", max_steps=3, learning_rate=1e-2, pilot_seed=7)
    live = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path / "a", **kw)
    policy, _ = models_
    pre = SGDPOTrainer(model=copy.deepcopy(policy), ref_model=None, args=SGDPOConfig(
        output_dir=str(tmp_path / "b"), report_to="none", per_device_train_batch_size=4, use_cpu=True,
        save_strategy="no", logging_steps=1, disable_dropout=True, bf16=False,
        precompute_ref_log_probs=True, **kw),
        train_dataset=dataset["plain"], processing_class=tokenizer)
    # the live run's reference is a copy of the initial policy, like the precompute's
    live.ref_model.load_state_dict(policy.state_dict())
    assert pre.ref_model is None
    cols = pre.train_dataset.column_names
    assert "ref_chosen_token_logps" in cols and "ref_rejected_token_logps" in cols
    row = pre.train_dataset[0]
    assert len(row["ref_chosen_token_logps"]) >= 1 and all(x <= 0 for x in row["ref_chosen_token_logps"])
    live.train()
    pre.train()
    la = [h["loss"] for h in live.state.log_history if "loss" in h]
    lb = [h["loss"] for h in pre.state.log_history if "loss" in h]
    assert len(la) == 3 and len(lb) == 3
    for a, b in zip(la, lb):
        assert math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-6), (la, lb)
    assert rel_err(_final_params(pre), _final_params(live)) < 1e-5


def test_sgdpo_evaluation_is_deterministic(models_, tokenizer, dataset, tmp_path):
    trainer = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                       loss_type="sgdpo", per_device_eval_batch_size=2, pilot_ratio_chosen=0.3,
                       pilot_ratio_rejected=0.3)
    a = trainer.evaluate(dataset["plain"])["eval_loss"]
    b = trainer.evaluate(dataset["plain"])["eval_loss"]
    assert a == b
    other = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                     loss_type="sgdpo", per_device_eval_batch_size=2, pilot_ratio_chosen=0.3,
                     pilot_ratio_rejected=0.3, pilot_eval_seed=99)
    assert other.evaluate(dataset["plain"])["eval_loss"] != a   # the pilots do matter here


def test_sgdpo_combined_with_sft_trains(models_, tokenizer, dataset, tmp_path):
    trainer = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                       loss_type=["sgdpo", "sft"], loss_weights=[1.0, 0.5], max_steps=2,
                       learning_rate=1e-2, use_weighting=True, ld_alpha=0.5)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) and "nll_loss" in h for h in logs)


def test_precomputed_token_reference_on_two_processes_equals_one(dataset, tmp_path):
    """Each rank stores its chosen rows and its rejected rows: gathered across processes they
    must land on the right dataset rows (2 CPU processes under torch.distributed.run, gloo,
    5 examples so the last batch is uneven, against one process)."""
    import json
    import subprocess
    import sys
    from datasets import concatenate_datasets
    data = concatenate_datasets([dataset["plain"], dataset["plain"].select([0])])
    worker = os.path.join(os.path.dirname(__file__), "_trl_precompute_worker.py")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_DATASETS_CACHE=str(tmp_path / "hfcache"),
               PYTHONPATH=root)  # tests/oracle.py imports bench.baselines
    res = {}
    for name, launch in (("one", [sys.executable]),
                         ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                  "--nproc-per-node", "2"])):
        out = str(tmp_path / f"{name}.json")
        data_dir = str(tmp_path / f"data-{name}")  # its own copy: no shared precompute cache
        data.save_to_disk(data_dir)
        p = subprocess.run(launch + [worker, data_dir, out], env=env, capture_output=True,
                           text=True, timeout=600)
        assert p.returncode == 0, p.stderr[-3000:]
        with open(out) as f:
            res[name] = json.load(f)
    for col in ("ref_chosen_token_logps", "ref_rejected_token_logps"):
        one, two = res["one"][col], res["two"][col]
        assert [len(x) for x in two] == [len(x) for x in one], col
        for a, b in zip(one, two):
            assert max(abs(x - y) for x, y in zip(a, b)) < 1e-5, col


def test_sgdpo_with_an_f_divergence_builds_and_trains(models_, tokenizer, dataset, tmp_path):
    """TRL's DPOTrainer refuses an f-divergence for loss types outside its list ('sgdpo');
    SGDPOTrainer checks the combination itself and keeps the configured divergence."""
    t = _trainer(SGDPOTrainer, SGDPOConfig, models_, tokenizer, dataset["plain"], tmp_path,
                 loss_type=["sgdpo", "sft"], loss_weights=[1.0, 0.5],
                 f_divergence_type="js_divergence", max_steps=1)
    assert t.f_divergence_type == "js_divergence" and t.args.f_divergence_type == "js_divergence"
    batch = next(iter(t.get_train_dataloader()))
    loss, grads, _ = _loss_and_grads(t, batch)
    assert math.isfinite(loss.item()) and torch.isfinite(grads).all()


def test_backend_names_are_checked_when_configured(tmp_path):
    with pytest.raises(ValueError, match="fused_backend must be one of"):
        SGDPOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, fused_backend="bogus",
                    loss_type="sigmoid")
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_trl("bogus")
