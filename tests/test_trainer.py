"""The thin trainer on a tiny random Llama (CPU, seconds): learning, exact resume after a
kill, interrupt checkpoints, the fused head only, metrics + plot, schedule, config errors."""
import json
import math
import os

import pytest
import torch

from sgdpo_fast.trainer import TrainConfig, Trainer, cosine_with_warmup, make_objective, train
from sgdpo_fast.trainer.batches import answer_mask, collate, encode, token_logps
from tiny_lm import tiny_model, tiny_tokenizer

PAIRS = [
    {"prompt": "Say yes.", "chosen": "yes", "rejected": "no way"},
    {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
    {"prompt": "Color of sky?", "chosen": "blue", "rejected": "green!"},
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
    {"prompt": "Opposite of up?", "chosen": "down", "rejected": "sideways"},
]


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _cfg(**kw):
    base = dict(lr=3e-3, batch_size=2, grad_accum=1, warmup_ratio=0.0, save_every=0,
                progress=False, save_final=False, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _perturbed_model(seed=0, **kw):
    m = tiny_model(seed, **kw)
    return m


@pytest.mark.parametrize("loss_type,reference", [("sigmoid", "precompute"), ("sgdpo", "copy"),
                                                 ("ipo", "precompute"), ("simpo", "precompute")])
def test_few_steps_on_fixed_batch_lower_the_loss(tok, tmp_path, loss_type, reference):
    model = tiny_model(1)
    cfg = _cfg(loss_type=loss_type, reference=reference, max_steps=6, batch_size=2)
    obj = make_objective(PAIRS[:2], tok, cfg)
    tr = Trainer(model, tok, obj, cfg, str(tmp_path))

    def loss_now():
        with torch.no_grad():  # same pilot draw both times: a generator seeded alike
            return obj.loss(model, [0, 1], torch.Generator().manual_seed(5))[0].item()

    obj.prepare(model, str(tmp_path))
    before = loss_now()
    tr.train()
    after = loss_now()
    assert math.isfinite(after) and after < before - 0.05 * abs(before), (before, after)


def test_sft_lowers_nll(tok, tmp_path):
    recs = [{"prompt": "Name a fruit.", "response": "apple"}, {"prompt": "Hi", "response": "hello"}]
    model = tiny_model(2)
    cfg = _cfg(loss_type="sft", max_steps=8, lr=1e-2)
    obj = make_objective(recs, tok, cfg)
    before = obj.loss(model, [0, 1], None)[0].item()
    Trainer(model, tok, obj, cfg, str(tmp_path)).train()
    after = obj.loss(model, [0, 1], None)[0].item()
    assert after < 0.8 * before, (before, after)


def _params(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


class Killed(RuntimeError):
    pass


@pytest.mark.parametrize("reference", ["precompute", "copy"])
def test_killed_and_resumed_equals_uninterrupted(tok, tmp_path, reference):
    """5 pairs, batch 1, accumulation 2: 3 steps per epoch (the last one ragged), 7 steps so
    the run crosses two epoch boundaries; SGDPO pilots (a generator) and attention dropout
    (torch's RNG) make every random state matter.  The killed run dies after step 5, whose
    work is lost (last checkpoint: step 4); resuming must replay it exactly."""
    cfg = _cfg(loss_type="sgdpo", reference=reference, max_steps=7, batch_size=1, grad_accum=2,
               save_every=2, keep_checkpoints=2, warmup_ratio=0.3)
    full = tiny_model(3, dropout=0.2)
    train(full, tok, PAIRS, cfg, str(tmp_path / "full"))
    want = _params(full)

    def kill(step, metrics):
        if step == 5:
            raise Killed()

    run = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train(tiny_model(3, dropout=0.2), tok, PAIRS, cfg, run, callbacks=[kill])
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000002", "step-000004"]
    resumed = tiny_model(3, dropout=0.2)  # the base model as loaded again by a new process
    res = train(resumed, tok, PAIRS, cfg, run, resume=True)
    assert res["steps"] == 7
    got = _params(resumed)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    with open(os.path.join(run, "metrics.jsonl")) as f:
        steps = [json.loads(l)["step"] for l in f]
    assert steps == list(range(1, 8))
    with open(os.path.join(tmp_path / "full", "metrics.jsonl")) as f:
        full_loss = [json.loads(l)["loss"] for l in f]
    with open(os.path.join(run, "metrics.jsonl")) as f:
        run_loss = [json.loads(l)["loss"] for l in f]
    assert run_loss == full_loss


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes(tok, tmp_path):
    cfg = _cfg(loss_type="sigmoid", max_steps=4, save_every=0)

    def interrupt(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    run = str(tmp_path / "run")
    with pytest.raises(KeyboardInterrupt):
        train(tiny_model(4), tok, PAIRS, cfg, run, callbacks=[interrupt])
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step-000003"]
    resumed = tiny_model(4)
    res = train(resumed, tok, PAIRS, cfg, run, resume=True)
    assert res["steps"] == 4
    full = tiny_model(4)
    train(full, tok, PAIRS, cfg, str(tmp_path / "full"))
    w1, w2, w0 = _params(full), _params(resumed), _params(tiny_model(4))
    assert any(not torch.equal(w1[k], w0[k]) for k in w1)  # training changed the weights
    for k in w1:
        assert torch.equal(w1[k], w2[k]), k


def test_precomputed_and_copied_reference_agree(tok, tmp_path):
    """The stored per-token reference, scattered back into shuffled, ragged batches, equals
    what a frozen copy computes on the same batches."""
    model = tiny_model(9)
    pre = make_objective(PAIRS, tok, _cfg(reference="precompute"))
    cp = make_objective(PAIRS, tok, _cfg(reference="copy"))
    pre.prepare(model, str(tmp_path))
    cp.prepare(model, str(tmp_path))
    for idx in ([3, 0], [4], [2, 1, 4]):
        b = pre.batch(idx)
        policy = token_logps(model, b)
        torch.testing.assert_close(pre._ref(idx, b, policy), cp._ref(idx, b, policy),
                                   rtol=1e-6, atol=1e-6)


def test_fresh_run_in_an_old_folder_keeps_nothing_of_it(tok, tmp_path):
    run = str(tmp_path / "run")
    cfg = _cfg(loss_type="sigmoid", max_steps=3, save_every=1, keep_checkpoints=5)
    train(tiny_model(10), tok, PAIRS, cfg, run)
    other = tiny_model(11)  # another model, same data: its own reference, its own checkpoints
    train(other, tok, PAIRS, cfg.replace(max_steps=2), run)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000001", "step-000002"]
    obj = make_objective(PAIRS, tok, cfg)
    obj.prepare(tiny_model(11), str(tmp_path))
    stored = torch.load(os.path.join(run, "reference_logps.pt"))["logps"]
    for a, b in zip(stored, obj.ref_logps):
        torch.testing.assert_close(a, b)


def test_trainer_never_calls_the_full_logit_head(tok, tmp_path, monkeypatch):
    model = tiny_model(5)

    def boom(*a, **k):
        raise AssertionError("the [B, T, V] logits were computed")

    monkeypatch.setattr(model.lm_head, "forward", boom)
    monkeypatch.setattr(type(model), "forward", boom)  # the CausalLM forward builds logits
    res = train(model, tok, PAIRS[:2], _cfg(loss_type="sgdpo", max_steps=2), str(tmp_path / "a"))
    assert res["steps"] == 2
    recs = [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS]
    assert train(model, tok, recs, _cfg(loss_type="sft", max_steps=1), str(tmp_path / "b"))["steps"] == 1


def test_token_logps_match_full_logits(tok):
    """The fused per-token log-probs equal log_softmax of the model's own logits."""
    model = tiny_model(6)
    seqs = [encode(tok, p["prompt"], p["chosen"]) for p in PAIRS[:3]]
    b = collate(seqs, tok.pad_token_id)
    got = token_logps(model, b)
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    lp = torch.log_softmax(logits[:, :-1], -1)
    tgt = b["labels"][:, 1:]
    m = answer_mask(b["labels"])
    want = lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1) * m
    assert m.sum() == sum(s.n_answer for s in seqs)
    torch.testing.assert_close(got.detach().double(), want, rtol=1e-5, atol=1e-5)


def test_metrics_jsonl_and_plot(tok, tmp_path):
    res = train(tiny_model(7), tok, PAIRS, _cfg(loss_type="sgdpo", max_steps=3, save_final=True),
                str(tmp_path))
    with open(res["metrics"]) as f:
        rows = [json.loads(l) for l in f]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("loss", "lr", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                "rewards/accuracies", "logps/chosen", "sgdpo/pilot_chosen", "sgdpo/pilot_rejected"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert os.path.getsize(res["plot"]) > 10_000
    with open(res["plot"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.path.isfile(os.path.join(res["final"], "config.json"))


def test_cosine_schedule():
    f = cosine_with_warmup(2, 10)
    vals = [f(s) for s in range(11)]
    assert vals[0] == pytest.approx(1 / 3) and vals[1] == pytest.approx(2 / 3)
    assert vals[2] == pytest.approx(1.0) and vals[10] == pytest.approx(0.0)
    assert vals[6] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(vals[2:], vals[3:]))


@pytest.mark.parametrize("kw,match", [
    (dict(loss_type="nope"), "loss_type"), (dict(reference="other"), "reference"),
    (dict(batch_size=0), "batch_size"), (dict(lr=0.0), "lr"), (dict(max_steps=0), "max_steps"),
    (dict(warmup_ratio=1.0), "warmup_ratio"),
])
def test_config_errors(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def test_empty_data_is_an_error(tok):
    with pytest.raises(ValueError, match="no preference pairs"):
        make_objective([], tok, TrainConfig())


def test_gradient_checkpointing_gives_the_same_step(tok, tmp_path):
    """Activation recomputation changes memory, not results: one step with and without."""
    a, b = tiny_model(8), tiny_model(8)
    cfg = _cfg(loss_type="sigmoid", max_steps=1)
    train(a, tok, PAIRS[:2], cfg, str(tmp_path / "a"))
    train(b, tok, PAIRS[:2], cfg.replace(gradient_checkpointing=True), str(tmp_path / "b"))
    flag = getattr(b, "is_activation_checkpointing", None)
    assert flag if flag is not None else b.is_gradient_checkpointing
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=k)
