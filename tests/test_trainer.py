"""The thin trainer on a tiny random Llama (CPU, seconds): learning, exact resume after a
kill, interrupt checkpoints, the fused head only, metrics + plot, schedule, config errors."""
import json
import math
import os

import pytest
import torch

from sgdpo_fast.trainer import TrainConfig, Trainer, cosine_with_warmup, make_objective, train
from sgdpo_fast.trainer.batches import answer_mask, collate, encode, token_logps
from tiny_lm import PAIRS, tiny_model, tiny_tokenizer



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
    train(other, tok, PAIRS, cfg.replace(max_steps=2), run, overwrite=True)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000001", "step-000002"]
    obj = make_objective(PAIRS, tok, cfg)
    obj.prepare(tiny_model(11), str(tmp_path))
    from safetensors.torch import load_file
    stored = load_file(os.path.join(run, "reference_logps.safetensors"))
    stored = torch.split(stored["logps"], stored["lengths"].tolist())
    assert len(stored) == len(obj.ref_logps) == 2 * len(PAIRS)
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


# --------------------------------------------------------------------------- reliability (issue 11)

def _snapshot(folder):
    """Every file under ``folder`` with its bytes: what a refused call must leave untouched."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = fh.read()
    return out


def _stop_at(n):
    def cb(step, metrics):
        if step == n:
            raise Killed()
    return cb


def test_a_finished_run_is_never_cleared_without_overwrite(tok, tmp_path):
    """Item 4: rerunning in a finished run folder without resume, or with a bad setting,
    touches nothing; overwrite=True starts afresh (after validating everything)."""
    run = str(tmp_path / "run")
    cfg = _cfg(loss_type="sigmoid", max_steps=2, save_every=1)
    train(tiny_model(10), tok, PAIRS, cfg, run)
    before = _snapshot(run)
    with pytest.raises(ValueError, match="resume.*overwrite"):
        train(tiny_model(10), tok, PAIRS, cfg, run)
    for bad in (dict(beta=-1.0), dict(pilot_ratio_chosen=1.5), dict(max_grad_norm=-1.0),
                dict(label_smoothing=0.7)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            train(tiny_model(10), tok, PAIRS, cfg.replace(**bad), run, overwrite=True)
    with pytest.raises(ValueError, match="resume.*overwrite"):
        train(tiny_model(10), tok, PAIRS, cfg, run, resume=True, overwrite=True)
    assert _snapshot(run) == before


@pytest.mark.parametrize("dtype,lr", [(torch.float16, 1e5), (torch.float32, 1e39)])
def test_a_step_that_makes_the_weights_non_finite_stops_before_anything_is_saved(tok, tmp_path,
                                                                                 dtype, lr):
    """Item 2: loss and gradients are finite, but the first update overflows (fp16 weights and
    lr 1e5: the parameters become inf; fp32 and lr 1e39: torch refuses the step size): the run
    stops at step 1 naming it, with no checkpoint, no metrics row and no final model."""
    from sgdpo_fast.trainer import NonFiniteError
    run = str(tmp_path / "run")
    cfg = _cfg(loss_type="sigmoid", max_steps=3, save_every=1, lr=lr, save_final=True)
    with pytest.raises(NonFiniteError, match="step 1"):
        train(tiny_model(12).to(dtype), tok, PAIRS, cfg, run)
    ck = os.path.join(run, "checkpoints")
    assert not os.path.isdir(ck) or not [d for d in os.listdir(ck) if d.startswith("step-")]
    assert not os.path.exists(os.path.join(run, "final"))
    assert not os.path.isfile(os.path.join(run, "metrics.jsonl")) or \
        open(os.path.join(run, "metrics.jsonl")).read() == ""


def test_non_finite_loss_later_keeps_the_last_good_checkpoint(tok, tmp_path):
    """A NaN that appears at step 3 stops the run there; step 2's checkpoint stays and a
    resume from it would continue (nothing non-finite is ever written)."""
    from sgdpo_fast.trainer import NonFiniteError
    model = tiny_model(13)
    run = str(tmp_path / "run")

    def poison(step, metrics):
        if step == 2:
            with torch.no_grad():
                model.model.norm.weight[0] = float("nan")

    cfg = _cfg(loss_type="sigmoid", max_steps=4, save_every=1, keep_checkpoints=5, save_final=True)
    with pytest.raises(NonFiniteError, match="step 3") as e:
        train(model, tok, PAIRS, cfg, run, callbacks=[poison])
    assert "step-000002" in str(e.value)  # names the last good checkpoint
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step-000001", "step-000002"]
    assert not os.path.exists(os.path.join(run, "final"))
    from sgdpo_fast.trainer.checkpoint import read_checkpoint
    st = read_checkpoint(os.path.join(run, "checkpoints", "step-000002"))
    assert all(torch.isfinite(v).all() for v in st["model"].values())


def test_max_grad_norm_none_disables_clipping(tok, tmp_path):
    """Item 3: clipping is off with max_grad_norm=None (never with 0 or a negative number)."""
    a, b = tiny_model(14), tiny_model(14)
    cfg = _cfg(loss_type="sigmoid", max_steps=2)
    train(a, tok, PAIRS, cfg.replace(max_grad_norm=None), str(tmp_path / "a"))
    train(b, tok, PAIRS, cfg.replace(max_grad_norm=1e30), str(tmp_path / "b"))
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k
    assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                      tiny_model(14).state_dict().values()))


@pytest.mark.parametrize("kw,match", [
    (dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"), (dict(lr=-1e-3), "lr"),
    (dict(max_grad_norm=-1.0), "max_grad_norm"), (dict(max_grad_norm=0.0), "max_grad_norm"),
    (dict(max_grad_norm=float("nan")), "max_grad_norm"), (dict(beta=-1.0), "beta"),
    (dict(beta=float("inf")), "beta"), (dict(pilot_ratio_chosen=0.0), "pilot_ratio_chosen"),
    (dict(pilot_ratio_rejected=1.5), "pilot_ratio_rejected"), (dict(pilot_mode="x"), "pilot_mode"),
    (dict(label_smoothing=0.7), "label_smoothing"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas"), (dict(nll_alpha=float("nan")), "nll_alpha"),
    (dict(simpo_gamma=float("inf")), "simpo_gamma"), (dict(max_length=1), "max_length"),
    (dict(seed=-1), "seed"), (dict(keep_checkpoints=-1), "keep_checkpoints"),
    (dict(backend="gpu"), "backend"), (dict(epochs=1.5), "epochs"), (dict(warmup_ratio=-0.1), "warmup_ratio"),
])
def test_every_numeric_setting_is_validated(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).validate()


def _killed_run(tok, tmp_path, cfg, at, seed=3):
    run = str(tmp_path / "killed")
    with pytest.raises(Killed):
        train(tiny_model(seed, dropout=0.2), tok, PAIRS, cfg, run, callbacks=[_stop_at(at)])
    return run


RESUME_CFG = dict(loss_type="sgdpo", max_steps=5, batch_size=1, grad_accum=2, save_every=1,
                  keep_checkpoints=3, warmup_ratio=0.3)


@pytest.fixture(scope="module")
def uninterrupted(tok, tmp_path_factory):
    """The weights after an uninterrupted RESUME_CFG run (computed once for the module)."""
    full = tiny_model(3, dropout=0.2)
    train(full, tok, PAIRS, _cfg(**RESUME_CFG), str(tmp_path_factory.mktemp("full")))
    return _params(full)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tok, tmp_path, capsys, damage,
                                                           uninterrupted):
    """Item 6: the newest checkpoint is damaged (cut short, a flipped byte, emptied): resume
    names the bad file, continues from the one before, and still ends bit-exact."""
    cfg = _cfg(**RESUME_CFG)
    want = uninterrupted
    run = _killed_run(tok, tmp_path, cfg, at=4)
    newest = os.path.join(run, "checkpoints", "step-000004")
    files = [os.path.join(newest, f) for f in os.listdir(newest)]
    bad = max(files, key=os.path.getsize)
    size = os.path.getsize(bad)
    with open(bad, "r+b") as f:
        if damage == "truncate":
            f.truncate(size // 2)
        elif damage == "empty":
            f.truncate(0)
        else:
            f.seek(size - 3)
            byte = f.read(1)
            f.seek(size - 3)
            f.write(bytes([byte[0] ^ 0x40]))
    capsys.readouterr()
    resumed = tiny_model(3, dropout=0.2)
    res = train(resumed, tok, PAIRS, cfg, run, resume=True)
    err = capsys.readouterr().err
    assert bad in err and "step-000003" in err, err
    assert res["steps"] == 5
    got = _params(resumed)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_a_damaged_reference_file_is_recomputed(tok, tmp_path, capsys, uninterrupted):
    cfg = _cfg(**RESUME_CFG)
    want = uninterrupted
    run = _killed_run(tok, tmp_path, cfg, at=2)
    (ref,) = [os.path.join(run, f) for f in os.listdir(run) if f.startswith("reference_logps")]
    with open(ref, "r+b") as f:
        f.truncate(os.path.getsize(ref) // 2)
    capsys.readouterr()
    resumed = tiny_model(3, dropout=0.2)
    train(resumed, tok, PAIRS, cfg, run, resume=True)
    err = capsys.readouterr().err
    assert ref in err and "recomput" in err, err
    got = _params(resumed)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_resume_with_other_data_model_or_config_is_an_error(tok, tmp_path):
    """Item 9: the run's fingerprints (tokenized data, base model, settings) must match."""
    cfg = _cfg(**RESUME_CFG)
    run = _killed_run(tok, tmp_path, cfg, at=2)
    before = _snapshot(run)
    other = [dict(p) for p in PAIRS]
    other[0]["chosen"] = "yes indeed"
    with pytest.raises(ValueError, match="data"):
        train(tiny_model(3, dropout=0.2), tok, other, cfg, run, resume=True)
    with pytest.raises(ValueError, match="lr"):
        train(tiny_model(3, dropout=0.2), tok, PAIRS, cfg.replace(lr=1e-2), run, resume=True)
    with pytest.raises(ValueError, match="model"):
        train(tiny_model(4, dropout=0.2), tok, PAIRS, cfg, run, resume=True)
    assert _snapshot(run) == before
    # how the run is shown or kept may change
    res = train(tiny_model(3, dropout=0.2), tok, PAIRS, cfg.replace(save_every=2, keep_checkpoints=1),
                run, resume=True)
    assert res["steps"] == 5


def test_a_checkpoint_cannot_run_code(tok, tmp_path, capsys):
    """Item 1: a crafted pickle where a checkpoint is looked for is never unpickled."""
    cfg = _cfg(**RESUME_CFG)
    run = _killed_run(tok, tmp_path, cfg, at=2)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    evil = os.path.join(run, "checkpoints", "step-000099")
    os.makedirs(evil)
    import pickle
    for name in ("state.pt", "state.json", "state.safetensors"):
        with open(os.path.join(evil, name), "wb") as f:
            pickle.dump({"model": Payload()}, f)
    torch.save({"model": Payload(), "step": 99}, os.path.join(evil, "state.pt"))
    capsys.readouterr()
    res = train(tiny_model(3, dropout=0.2), tok, PAIRS, cfg, run, resume=True)
    assert not marker.exists()
    assert "step-000099" in capsys.readouterr().err
    assert res["steps"] == 5


def test_checkpoints_are_pickle_free(tok, tmp_path):
    """A checkpoint is JSON + safetensors: readable by those parsers alone, no pickle inside."""
    import json as _json
    from safetensors import safe_open
    cfg = _cfg(**RESUME_CFG)
    run = _killed_run(tok, tmp_path, cfg, at=2)
    d = os.path.join(run, "checkpoints", "step-000002")
    assert sorted(os.listdir(d)) == ["state.json", "state.safetensors"]
    meta = _json.load(open(os.path.join(d, "state.json")))
    assert meta["step"] == 2
    with safe_open(os.path.join(d, "state.safetensors"), "pt") as f:
        assert any(k.startswith("model/") for k in f.keys())
    for f in os.listdir(run):
        if os.path.isfile(os.path.join(run, f)):
            with open(os.path.join(run, f), "rb") as fh:
                assert not fh.read(2).startswith(b"\x80"), f  # no pickle protocol header
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for top in ("sgdpo_fast", "bench"):
        for dirpath, _, names in os.walk(os.path.join(root, top)):
            for n in names:
                if n.endswith(".py"):
                    src = open(os.path.join(dirpath, n)).read()
                    assert "weights_only=False" not in src, n
                    assert "import pickle" not in src, n


def test_final_is_written_to_a_temporary_folder_and_renamed(tok, tmp_path):
    """Item 6: a kill while final/ is written leaves no half-written final/ (a fresh run), and
    leaves the previous final/ whole (a finished run resumed)."""
    run = str(tmp_path / "run")

    def model(dying):
        m = tiny_model(15)  # the base model, as a new process would load it
        real = m.save_pretrained

        def dying_save(d, **kw):
            real(d, **kw)
            with open(os.path.join(d, "model.safetensors"), "r+b") as f:
                f.truncate(100)
            raise KeyboardInterrupt  # killed in the middle of writing

        if dying:
            m.save_pretrained = dying_save
        return m

    cfg = _cfg(loss_type="sigmoid", max_steps=1, save_final=True)
    with pytest.raises(KeyboardInterrupt):
        train(model(True), tok, PAIRS, cfg, run)
    assert not os.path.exists(os.path.join(run, "final"))
    train(model(False), tok, PAIRS, cfg, run, resume=True)
    good = _snapshot(os.path.join(run, "final"))
    assert "model.safetensors" in good
    with pytest.raises(KeyboardInterrupt):
        train(model(True), tok, PAIRS, cfg, run, resume=True)
    assert _snapshot(os.path.join(run, "final")) == good


def test_max_length_holds_when_the_prompt_alone_is_longer(tok):
    """Item 8: the sequence fits max_length whatever the prompt; at least one answer token."""
    for max_length, max_prompt in ((16, 256), (16, 8), (2, 256), (40, 39)):
        e = encode(tok, "x" * 100, "answer", max_length=max_length, max_prompt_length=max_prompt)
        assert len(e.input_ids) <= max_length and e.n_answer >= 1, (max_length, max_prompt)
        assert len(e.input_ids) == len(e.labels)
    e = encode(tok, "hi", "answer", max_length=512)
    assert e.n_answer == len("answer") + 1 and len(e.input_ids) < 40  # short: untouched


class _CountingTokenizer:
    """The tiny tokenizer, recording the longest text it was asked to tokenize."""

    def __init__(self, tok):
        self._tok, self.longest = tok, 0

    def __call__(self, text, **kw):
        self.longest = max(self.longest, len(text))
        return self._tok(text, **kw)

    def __getattr__(self, name):
        return getattr(self._tok, name)


def test_a_huge_prompt_is_not_tokenized_whole(tok):
    """Item 8: only a tail of a 2 MB prompt (and a head of a 2 MB answer) is tokenized, and
    the tokens kept are those of the whole text."""
    counting = _CountingTokenizer(tok)
    prompt = "".join(f"word{i} " for i in range(300_000))[:2_000_000]
    answer = "reply " * 400_000
    e = encode(counting, prompt, answer, max_length=64, max_prompt_length=32)
    assert counting.longest < 20_000, counting.longest
    whole = encode(tok, prompt[-5000:], answer[:5000], max_length=64, max_prompt_length=32)
    assert e.input_ids == whole.input_ids and e.labels == whole.labels


def test_tail_tokenization_matches_whole_text_on_bpe():
    """Tokenizing only a tail of a long text gives the whole text's last tokens with a merging
    (BPE) tokenizer too, not just a character-level one."""
    import random as _random
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    from sgdpo_fast.trainer.batches import head_ids, tail_ids
    rng = _random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "the", "a", "of", "<x>", "123", "!!", "\n", "  "]
    corpus = ["".join(rng.choice(words) + rng.choice(" ,.;") for _ in range(200)) for _ in range(20)]
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tk = PreTrainedTokenizerFast(tokenizer_object=bpe)
    for s in range(20):
        text = "".join(rng.choice(words) + rng.choice(" ,.;x") for _ in range(3000))
        whole = tk(text, add_special_tokens=False)["input_ids"]
        for n in (1, 7, 100):
            assert tail_ids(tk, text, n) == whole[-n:], (s, n)
            assert head_ids(tk, text, n) == whole[:n], (s, n)


def test_every_setting_has_a_rule():
    """A new TrainConfig field cannot slip past validation: each has a rule (adam_betas, a
    pair, is checked on its own)."""
    import dataclasses
    from sgdpo_fast.trainer.config import RULES
    assert {f.name for f in dataclasses.fields(TrainConfig)} == set(RULES) | {"adam_betas"}
    for name, rule in RULES.items():
        assert rule.problem(getattr(TrainConfig(), name)) is None, name  # defaults are allowed


def test_state_store_round_trip(tmp_path):
    """state_io keeps every kind of value a state_dict holds, exactly: int and str keys,
    tuples vs lists, non-finite floats, dtypes, 0-d / empty / non-contiguous tensors, and
    tensors sharing storage (tied weights: stored once, restored as one)."""
    from sgdpo_fast.trainer.state_io import read_state, save_state
    w = torch.randn(5, 3)
    tree = {"model": {"embed.weight": w, "lm_head.weight": w, "half": w[:2], "t": w.t()},
            "optimizer": {"state": {0: {"step": torch.tensor(3.0), "m": torch.zeros(0)}},
                          "param_groups": [{"betas": (0.9, 0.999), "lr": 1e-3, "params": [0, 1],
                                            "fused": None, "amsgrad": False}]},
            "x": [float("nan"), float("inf"), -float("inf"), 0.1, 2**62, "s", None],
            "bf16": torch.randn(4).bfloat16(), "u8": torch.arange(7, dtype=torch.uint8)}
    save_state(str(tmp_path), tree, {"step": 7})
    got, meta = read_state(str(tmp_path))
    assert meta == {"step": 7}
    assert torch.equal(got["model"]["embed.weight"], w) and torch.equal(got["model"]["t"], w.t())
    assert got["model"]["embed.weight"] is got["model"]["lm_head.weight"]
    assert torch.equal(got["model"]["half"], w[:2])
    assert list(got["optimizer"]["state"]) == [0] and got["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.999)
    assert got["optimizer"]["state"][0]["m"].shape == (0,)
    x = got["x"]
    assert math.isnan(x[0]) and x[1:] == [float("inf"), -float("inf"), 0.1, 2**62, "s", None]
    assert got["bf16"].dtype == torch.bfloat16 and torch.equal(got["bf16"], tree["bf16"])
    assert torch.equal(got["u8"], tree["u8"])


def test_tied_weights_checkpoint_and_resume(tok, tmp_path):
    """A model with tied input/output embeddings (as SmolLM2) checkpoints and resumes exactly."""
    cfg = _cfg(loss_type="sigmoid", max_steps=3, save_every=1)
    full = tiny_model(16, tie=True)
    train(full, tok, PAIRS, cfg, str(tmp_path / "full"))
    run = str(tmp_path / "run")
    with pytest.raises(Killed):
        train(tiny_model(16, tie=True), tok, PAIRS, cfg, run, callbacks=[_stop_at(2)])
    resumed = tiny_model(16, tie=True)
    train(resumed, tok, PAIRS, cfg, run, resume=True)
    assert resumed.lm_head.weight is resumed.model.embed_tokens.weight
    for (k, x), y in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(x, y), k
