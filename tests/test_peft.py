"""PEFT (LoRA) with the fused head (issue 13 item 6), on tiny random Llamas (no download):
the head path against the model's own logits with adapters on the backbone and on
``lm_head`` (merged weight), the refusals, our trainer and SGDPOTrainer."""
import copy
import math

import pytest
import torch

peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

import sgdpo_fast as sf  # noqa: E402
from sgdpo_fast.model.head import causal_lm_logprobs  # noqa: E402
from oracle import SEED, rel_err  # noqa: E402
from tiny_lm import tiny_model, tiny_tokenizer  # noqa: E402


def _lora(model, targets, dropout=0.0, **kw):
    torch.manual_seed(SEED)
    pm = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                          target_modules=targets, **kw))
    with torch.no_grad():  # non-zero B: the adapters must change the numbers
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return pm


def _batch(V, B=3, T=10):
    g = torch.Generator().manual_seed(SEED)
    ids = torch.randint(4, V, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, -2:] = -100
    return ids, labels


def _logits_logps(model, ids, labels):
    """fp64 log_softmax of the PEFT model's own logits (its LoRA head forward included)."""
    logits = model(input_ids=ids).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    out = lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(tgt != -100, out, torch.zeros_like(out))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["q_proj", "lm_head"]])
def test_lora_head_path_matches_model_logits(targets):
    model = _lora(tiny_model(3), targets)
    model.train()   # dropout 0: training mode, gradients on
    ids, labels = _batch(model.config.vocab_size)
    want = _logits_logps(model, ids, labels)
    up = torch.randn(want.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    (want * up).sum().backward()
    lora = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head" in n for n in lora) == ("lm_head" in targets)
    ref_grads = {n: p.grad.clone() for n, p in lora.items()}
    model.zero_grad()
    got = causal_lm_logprobs(model, input_ids=ids, labels=labels).log_probs
    assert rel_err(got, want) < 1e-5
    (got.double() * up).sum().backward()
    for n, p in lora.items():
        assert rel_err(p.grad, ref_grads[n]) < 1e-4, n
    # adapters off (TRL's PEFT reference): the base model's numbers
    with model.disable_adapter():
        off = causal_lm_logprobs(model, input_ids=ids, labels=labels).log_probs
        assert rel_err(off, _logits_logps(model, ids, labels)) < 1e-5
    assert rel_err(off, got) > 1e-3


def test_fused_head_patch_on_a_peft_model():
    model = _lora(tiny_model(4), ["v_proj", "lm_head"]).eval()
    ids, labels = _batch(model.config.vocab_size)
    sf.apply_fused_lm_head(model)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert rel_err(out.log_probs, _logits_logps(model, ids, labels)) < 1e-5


def test_modules_to_save_head_uses_the_trained_copy():
    model = get_peft_model(tiny_model(5), LoraConfig(r=4, target_modules=["q_proj"],
                                                      modules_to_save=["lm_head"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n and "lm_head" in n:
                p.mul_(1.5)
    ids, labels = _batch(model.config.vocab_size)
    got = causal_lm_logprobs(model, input_ids=ids, labels=labels).log_probs
    assert rel_err(got, _logits_logps(model, ids, labels)) < 1e-5


def test_what_a_merged_weight_cannot_express_is_refused():
    model = _lora(tiny_model(6), ["lm_head"], dropout=0.1)
    ids, labels = _batch(model.config.vocab_size)
    model.train()
    with pytest.raises(ValueError, match="lora_dropout"):
        causal_lm_logprobs(model, input_ids=ids, labels=labels)
    model.eval()    # dropout is the identity in eval mode: fine
    got = causal_lm_logprobs(model, input_ids=ids, labels=labels).log_probs
    assert rel_err(got, _logits_logps(model, ids, labels)) < 1e-5
    dora = _lora(tiny_model(6), ["lm_head"], use_dora=True)
    with pytest.raises(ValueError, match="DoRA"):
        causal_lm_logprobs(dora, input_ids=ids, labels=labels)


PAIRS = [{"prompt": "Say yes.", "chosen": "yes", "rejected": "no way"},
         {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
         {"prompt": "Sky?", "chosen": "blue", "rejected": "green!"},
         {"prompt": "Up?", "chosen": "down", "rejected": "sideways"}]


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["v_proj", "lm_head"]])
def test_our_trainer_trains_lora_adapters(tmp_path, targets):
    """sgdpo_fast.trainer.train on a PeftModel: SGDPO lowers the loss, only the adapters move."""
    from sgdpo_fast.trainer import TrainConfig, make_objective, train
    tok = tiny_tokenizer()
    model = _lora(tiny_model(7), targets)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    lora0 = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(loss_type="sgdpo", lr=2e-2, batch_size=2, max_steps=6, warmup_ratio=0.0,
                      save_every=0, progress=False, save_final=False, seed=0)
    obj = make_objective(PAIRS[:2], tok, cfg)
    obj.prepare(model, str(tmp_path))

    def loss_now():
        with torch.no_grad():
            return obj.loss(model, [0, 1], torch.Generator().manual_seed(5))[0].item()

    before = loss_now()
    train(model, tok, PAIRS[:2], cfg, str(tmp_path / "run"))
    after = loss_now()
    assert math.isfinite(after) and after < before - 0.05 * abs(before), (before, after)
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, lora0[n]) for n, p in model.named_parameters() if n in lora0)


def test_sgdpo_trainer_with_lora(tmp_path):
    """TRL's PEFT route: peft_config to SGDPOTrainer, no reference model (adapters disabled give
    the reference), sgdpo trains the adapters through sgdpo_fast's head."""
    from datasets import Dataset
    from sgdpo_fast.integrations.trl import SGDPOConfig, SGDPOTrainer
    tok = tiny_tokenizer()
    data = Dataset.from_list(PAIRS)
    base = tiny_model(8)
    args = SGDPOConfig(output_dir=str(tmp_path), report_to="none", per_device_train_batch_size=2,
                       use_cpu=True, save_strategy="no", logging_steps=1, bf16=False, max_steps=2,
                       learning_rate=1e-2, loss_type="sgdpo", pilot_seed=1)
    trainer = SGDPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=data,
                           processing_class=tok,
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    assert trainer.ref_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert math.isclose(logs[0]["loss"], math.log(2), rel_tol=1e-5)   # LoRA starts at the base
    assert any(not torch.equal(p, before[n]) for n, p in trainer.model.named_parameters() if n in before)
    # TRL itself refuses an adapter on lm_head (it reads lm_head.weight directly)
    with pytest.raises(ValueError, match="lm_head"):
        SGDPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=data, processing_class=tok,
                     peft_config=LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
