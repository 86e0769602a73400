"""The trainer's loss options beyond beta / smoothing / pilots: discopop_tau, ld_alpha (LD-DPO),
f_divergence_type and f_alpha_divergence_coef (f-DPO).  TrainConfig fields and CLI flags,
validated by the loss's own validate_loss_options, passed to preference_loss."""
import pytest
import torch

from sgdpo_fast import cli
from sgdpo_fast.losses.preference import preference_loss
from sgdpo_fast.trainer import ConfigError, TrainConfig, make_objective
from sgdpo_fast.trainer.batches import answer_mask, token_logps
from tiny_lm import tiny_model, tiny_tokenizer

PAIRS = [{"prompt": "Say yes.", "chosen": "yes", "rejected": "no way"},
         {"prompt": "2+2?", "chosen": "4", "rejected": "five"},
         {"prompt": "Sky?", "chosen": "blue", "rejected": "green!"}]

CASES = [
    dict(loss_type="discopop", discopop_tau=0.3),
    dict(loss_type="sigmoid", ld_alpha=0.25),
    dict(loss_type="sgdpo", ld_alpha=0.0, f_divergence_type="js_divergence"),
    dict(loss_type="sigmoid", f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type="sgdpo", f_divergence_type="forward_kl", nll_alpha=0.5),
]


@pytest.mark.parametrize("opts", CASES)
def test_loss_options_reach_preference_loss(opts):
    tok = tiny_tokenizer()
    cfg = TrainConfig(reference="copy", beta=0.3, **opts).validate()
    obj = make_objective(PAIRS, tok, cfg)
    policy_model, ref_model = tiny_model(1), tiny_model(2)
    obj.prepare(ref_model, "")
    idx = [2, 0, 1]
    got, metrics = obj.loss(policy_model, idx, torch.Generator().manual_seed(4))
    b = obj.batch(idx)
    with torch.no_grad():
        pol, ref = token_logps(policy_model, b), token_logps(ref_model, b)
    m = answer_mask(b["labels"])
    want = preference_loss(pol, ref, m, beta=0.3, generator=torch.Generator().manual_seed(4),
                           **opts)
    assert got.item() == pytest.approx(want.loss.item(), rel=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(want.metrics["rewards/margins"].item(),
                                                       rel=1e-5)
    # and the option matters: the default value gives another loss
    default = {k: TrainConfig.__dataclass_fields__[k].default for k in opts if k != "loss_type"}
    other = make_objective(PAIRS, tok, TrainConfig(reference="copy", beta=0.3,
                                                   **dict(opts, **default)))
    other.prepare(ref_model, "")
    assert other.loss(policy_model, idx, torch.Generator().manual_seed(4))[0].item() != \
        pytest.approx(got.item(), rel=1e-6)


@pytest.mark.parametrize("bad,match", [
    (dict(discopop_tau=0.0), "discopop_tau"),
    (dict(ld_alpha=1.5), "ld_alpha"),
    (dict(f_divergence_type="hellinger"), "f_divergence_type"),
    (dict(f_alpha_divergence_coef=float("nan")), "f_alpha_divergence_coef"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(parallel="zero3"), "parallel"),
])
def test_bad_loss_options_are_refused_naming_them(bad, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**bad).validate()


def test_cli_flags_set_the_options(capsys, tmp_path):
    ap = cli._parser()
    args = ap.parse_args(["train", "--data", "x", "--out", "y", "--loss-type", "sigmoid",
                          "--discopop-tau", "0.2", "--ld-alpha", "0.5",
                          "--f-divergence-type", "alpha_divergence",
                          "--f-alpha-divergence-coef", "0.7", "--parallel", "fsdp"])
    cfg = cli._train_config(args)
    assert (cfg.discopop_tau, cfg.ld_alpha, cfg.f_divergence_type, cfg.f_alpha_divergence_coef,
            cfg.parallel) == (0.2, 0.5, "alpha_divergence", 0.7, "fsdp")
    assert cli._train_config(ap.parse_args(["train", "--data", "x", "--out", "y",
                                            "--ld-alpha", "none"])).ld_alpha is None
    for flag, val in (("--ld-alpha", "2"), ("--f-divergence-type", "bogus"),
                      ("--discopop-tau", "-1"), ("--parallel", "tp")):
        rc = cli.main(["train", "--data", str(tmp_path / "none.jsonl"), "--out",
                       str(tmp_path / "o"), flag, val])
        err = capsys.readouterr().err
        assert rc == 2 and flag in err and len(err.strip().splitlines()) == 1, err
    # a combination the loss refuses is one line too, before anything is read
    rc = cli.main(["train", "--data", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "o"),
                   "--loss-type", "nca_pair", "--f-divergence-type", "js_divergence"])
    assert rc == 2 and "f_divergence_type" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
