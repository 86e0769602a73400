"""The fused op on the embedded SmolLM2 head vs eager (`sgdpo-fast demo --head`), at a small token count."""
import pytest
import torch

from sgdpo_fast import head_demo
from sgdpo_fast.embedded import smollm2_head


def test_embedded_head_loads():
    w, norm = smollm2_head()
    assert w.shape == (49152, 576) and norm.shape == (576,)
    assert torch.isfinite(w).all() and w.abs().mean() > 0


def test_head_demo_runs_and_matches_oracle():
    resolved, results = head_demo.run(N=96, reps=1, seed=3)
    assert resolved in ("cpu", "torch")
    assert [r["method"] for r in results] == ["eager", "ours"]
    for r in results:
        assert r["err_logp"] < 1e-4 and r["err_dh"] < 1e-4
        assert r["times"][0] > 0 and r["peak_mib"] >= 0


def test_cli_dispatches(capsys):
    from sgdpo_fast import cli
    with pytest.raises(SystemExit) as e:  # argparse's --help exits 0
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sgpo", "eval", "demo", "bench"))
    try:
        cli.main(["bench", "--help"])
    except SystemExit as e:  # argparse's --help exits 0
        assert e.code == 0
    assert "python -m bench" in capsys.readouterr().out
