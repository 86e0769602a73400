"""apply_fused_lm_head on tiny random Hugging Face causal LMs (no download): per-token
log-probs against log_softmax of the model's own logits (fp64), softcap and
logit-scale configs included, gradients against autograd through the logits."""
import pytest
import torch

import sgdpo_fast as sf
from sgdpo_fast.integrations.hf import remove_fused_lm_head
from sgdpo_fast.model.head import head_transform_from_config
from oracle import SEED  # noqa: E402

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=53, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)


def _model(kind):
    T = transformers
    torch.manual_seed(SEED)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL))
    if kind == "gemma2_softcap":  # final_logit_softcapping, small enough to bite on random logits
        return T.Gemma2ForCausalLM(T.Gemma2Config(**SMALL, head_dim=8, final_logit_softcapping=0.3))
    if kind == "cohere_scale":  # logits * logit_scale
        return T.CohereForCausalLM(T.CohereConfig(**SMALL, logit_scale=0.37, eos_token_id=1,
                                                  bos_token_id=2, pad_token_id=0))
    if kind == "granite_scaling":  # logits / logits_scaling
        return T.GraniteForCausalLM(T.GraniteConfig(**SMALL, logits_scaling=3.0))
    raise AssertionError(kind)


def _batch(V, B=3, T=11):
    ids = torch.randint(0, V, (B, T))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[2, -3:] = -100
    return ids, labels


def _reference(model, ids, labels):
    """fp64 log_softmax of the model's own logits, shifted as HF does; also the
    gradient of sum(w * logp) w.r.t. the parameters, through the logits."""
    logits = model(ids).logits
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tgt = labels[:, 1:]
    out = lp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(tgt != -100, out, torch.zeros_like(out)), logits


@pytest.mark.parametrize("kind", ["llama", "gemma2_softcap", "cohere_scale", "granite_scaling"])
def test_fused_head_matches_model_logits(kind):
    model = _model(kind)
    model.eval()
    ids, labels = _batch(model.config.vocab_size)
    ref, logits = _reference(model, ids, labels)
    up = torch.randn(ref.shape, dtype=torch.float64)
    (ref * up).sum().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    if kind == "gemma2_softcap":  # the cap must matter, or this case tests nothing
        raw = torch.log_softmax(model.lm_head(model.model(ids).last_hidden_state).double(), -1)
        assert (raw[:, :-1] - torch.log_softmax(logits[:, :-1].double(), -1)).abs().max() > 1e-2

    sf.apply_fused_lm_head(model)
    out = model(ids, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32 and out.log_probs.shape == (3, 10)
    assert ((out.log_probs.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert (out.log_probs[labels[:, 1:] == -100] == 0).all()
    assert torch.equal(out.label_mask, labels[:, 1:] != -100)
    n = (labels[:, 1:] != -100).sum()
    assert torch.allclose(out.loss.double(), -ref.sum() / n, rtol=1e-5)
    (out.log_probs.double() * up).sum().backward()
    for name, p in model.named_parameters():
        if name in ref_grads:
            rel = ((p.grad.double() - ref_grads[name]).norm() / ref_grads[name].norm()).item()
            assert rel < 1e-4, (name, rel)
    # without the flag the original forward runs (logits, generation unchanged)
    assert torch.allclose(model(ids).logits, logits)


def test_metric_outputs_match_materialized():
    model = _model("gemma2_softcap").eval()
    ids, labels = _batch(model.config.vocab_size)
    with torch.no_grad():
        z = model(ids).logits[:, :-1].double()
    sf.apply_fused_lm_head(model, outputs=("log_probs", "entropy", "log_sum_sq_probs",
                                           "mean_logits", "is_top1"))
    out = model(ids, labels=labels, fused_lm_head=True)
    m = labels[:, 1:] != -100
    lp = torch.log_softmax(z, -1)
    p = lp.exp()
    assert torch.allclose(out.entropy.double()[m], -(p * lp).sum(-1)[m], atol=1e-5)
    assert torch.allclose(out.log_sum_sq_probs.double()[m], torch.log((p * p).sum(-1))[m], atol=1e-5)
    assert torch.allclose(out.mean_logits.double()[m], z.mean(-1)[m], atol=1e-5)
    assert torch.equal(out.is_top1[m], (z.argmax(-1) == labels[:, 1:])[m])
    assert not out.entropy.requires_grad and (out.entropy[~m] == 0).all()


def test_shift_labels_temperature_and_all_ignored():
    model = _model("llama").eval()
    ids, labels = _batch(model.config.vocab_size)
    sf.apply_fused_lm_head(model, temperature=0.7)
    shifted = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], 1)
    a = model(ids, labels=labels, fused_lm_head=True).log_probs
    b = model(ids, shift_labels=shifted, fused_lm_head=True).log_probs
    assert b.shape == (3, 11) and torch.equal(a, b[:, :-1]) and (b[:, -1] == 0).all()
    with torch.no_grad():
        z = model(ids).logits[:, :-1].double() / 0.7
    ref = torch.log_softmax(z, -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None]).squeeze(-1)
    m = labels[:, 1:] != -100
    assert torch.allclose(a.double()[m], ref[m], rtol=1e-5, atol=1e-5)
    # every label ignored: zeros, and backward still works (graph connected)
    out = model(ids, labels=torch.full_like(labels, -100), fused_lm_head=True)
    assert (out.log_probs == 0).all()
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad is not None and (model.lm_head.weight.grad == 0).all()


def test_errors_reapply_and_remove():
    model = _model("llama")
    with pytest.raises(ValueError, match="outputs"):
        sf.apply_fused_lm_head(model, outputs=("log_probs", "logits"))
    with pytest.raises(ValueError, match="temperature"):
        sf.apply_fused_lm_head(model, temperature=0.0)
    sf.apply_fused_lm_head(model)
    sf.apply_fused_lm_head(model)  # re-applying replaces, does not stack
    ids, labels = _batch(model.config.vocab_size)
    with pytest.raises(ValueError, match="labels"):
        model(ids, fused_lm_head=True)
    remove_fused_lm_head(model)
    assert "forward" not in model.__dict__  # the class forward again: logits, no log_probs
    out = model(ids, labels=labels)
    assert out.logits.shape == (3, 11, model.config.vocab_size) and "log_probs" not in out


def test_head_transform_from_config():
    T = transformers
    assert head_transform_from_config(T.LlamaConfig(**SMALL)) == (None, 1.0)
    assert head_transform_from_config(T.Gemma2Config(**SMALL, final_logit_softcapping=30.0))[0] == 30.0
    assert head_transform_from_config(T.GraniteConfig(**SMALL, logits_scaling=4.0)) == (None, 0.25)
    # TRL's order: logit_scale, output_multiplier, lm_head_multiplier, logits_scaling
    muse = T.LlamaConfig(**SMALL)
    muse.output_multiplier = 0.196
    assert head_transform_from_config(muse) == (None, 0.196)
    assert head_transform_from_config(T.CohereConfig(**SMALL, logit_scale=0.5,
                                                     eos_token_id=1, bos_token_id=2,
                                                     pad_token_id=0))[1] == 0.5


def test_bf16_model_close_to_fp64():
    model = _model("llama").eval()
    ids, labels = _batch(model.config.vocab_size)
    ref, _ = _reference(model, ids, labels)
    eager = _reference(model.to(torch.bfloat16), ids, labels)[0]
    sf.apply_fused_lm_head(model)
    lp = model(ids, labels=labels, fused_lm_head=True).log_probs
    assert lp.dtype == torch.float32
    err = (lp.double() - ref).norm() / ref.norm()
    eager_err = (eager - ref).norm() / ref.norm()
    assert err <= eager_err * 1.5 + 1e-3, (err, eager_err)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["llama", "gemma2_softcap"])
def test_fused_head_cuda_autocast_bf16(kind):
    """CUDA, fp32 weights under bf16 autocast (how Trainer runs bf16=True): the head runs
    in bf16 through the default backend; no worse than the model's own bf16 logits."""
    model = _model(kind).cuda().eval()
    ids, labels = _batch(model.config.vocab_size)
    ids, labels = ids.cuda(), labels.cuda()
    with torch.no_grad():
        ref, _ = _reference(model, ids, labels)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            eager, _ = _reference(model, ids, labels)
    sf.apply_fused_lm_head(model)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = model(ids, labels=labels, fused_lm_head=True)
    assert out.log_probs.dtype == torch.float32
    err = ((out.log_probs.double() - ref).norm() / ref.norm()).item()
    eager_err = ((eager - ref).norm() / ref.norm()).item()
    assert err <= eager_err * 1.5 + 1e-3, (err, eager_err)
    out.log_probs.sum().backward()
    assert model.lm_head.weight.grad.dtype == torch.float32
    assert torch.isfinite(model.lm_head.weight.grad).all()


def test_patch_survives_deepcopy_and_pickle():
    """Issue 13 item 5: the patch lives on the model object, without a closure: a deep copy
    (its own weights) and a pickled whole model (torch.save / torch.load) keep it."""
    import copy
    import io
    from sgdpo_fast.integrations.hf import has_fused_lm_head
    model = _model("llama").eval()
    ids, labels = _batch(model.config.vocab_size)
    sf.apply_fused_lm_head(model)
    want = model(ids, labels=labels, fused_lm_head=True).log_probs
    twin = copy.deepcopy(model)
    assert has_fused_lm_head(twin)
    torch.testing.assert_close(twin(ids, labels=labels, fused_lm_head=True).log_probs, want)
    with torch.no_grad():
        twin.lm_head.weight.mul_(2.0)        # the copy's head is its own
    assert not torch.allclose(twin(ids, labels=labels, fused_lm_head=True).log_probs, want)
    torch.testing.assert_close(model(ids, labels=labels, fused_lm_head=True).log_probs, want)
    assert torch.allclose(twin(ids).logits, twin.lm_head(twin.model(ids).last_hidden_state))
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert has_fused_lm_head(loaded)
    torch.testing.assert_close(loaded(ids, labels=labels, fused_lm_head=True).log_probs, want)
    out = loaded.generate(ids[:1, :4], max_new_tokens=2, do_sample=False)   # generation unchanged
    assert out.shape == (1, 6)


def test_lost_patch_fails_loudly(tmp_path):
    """A new model object (from_pretrained) or a removed patch: fused_lm_head=True raises and
    says to re-apply, instead of transformers silently returning full logits."""
    model = _model("llama").eval()
    ids, labels = _batch(model.config.vocab_size)
    sf.apply_fused_lm_head(model)
    model.save_pretrained(tmp_path)
    fresh = type(model).from_pretrained(tmp_path).eval()
    with pytest.raises(ValueError, match="apply_fused_lm_head"):
        fresh(ids, labels=labels, fused_lm_head=True)
    assert fresh(ids, labels=labels).logits.shape == (3, 11, model.config.vocab_size)
    sf.apply_fused_lm_head(fresh)                 # re-applied: works, same numbers
    torch.testing.assert_close(fresh(ids, labels=labels, fused_lm_head=True).log_probs,
                               model(ids, labels=labels, fused_lm_head=True).log_probs)
    remove_fused_lm_head(model)
    with pytest.raises(ValueError, match="apply_fused_lm_head"):
        model(ids, labels=labels, fused_lm_head=True)
