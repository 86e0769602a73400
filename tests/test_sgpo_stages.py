"""SGPO's finished training stages: weights.safetensors (pickle-free), verified against the
size and SHA-256 recorded in DONE when loaded back; an older stage's weights.pt is never
unpickled (the stage is trained again)."""
import json
import os

import pytest
import torch

from sgdpo_fast.sgpo.sharded import train_stage
from sgdpo_fast.trainer import TrainConfig, train
from tiny_lm import tiny_model, tiny_tokenizer

RECS = [{"prompt": "Name a fruit.", "response": "apple"}, {"prompt": "Hi", "response": "hello"}]
CFG = TrainConfig(loss_type="sft", max_steps=2, batch_size=2, lr=1e-2, warmup_ratio=0.0,
                  save_every=1, progress=False, save_final=False)


def test_a_finished_stage_is_loaded_back_only_when_intact(tmp_path, capsys):
    tok = tiny_tokenizer()
    d = str(tmp_path / "stage")
    trained = tiny_model(1)
    info = train_stage(trained, tok, RECS, CFG, d, False, train)
    assert info["steps"] == 2
    assert {"weights.safetensors", "DONE"} <= set(os.listdir(d))
    assert not os.path.exists(os.path.join(d, "checkpoints"))
    done = json.load(open(os.path.join(d, "DONE")))
    assert done["weights"]["bytes"] == os.path.getsize(os.path.join(d, "weights.safetensors"))
    want = {k: v.clone() for k, v in trained.state_dict().items()}
    assert any(not torch.equal(v, tiny_model(1).state_dict()[k]) for k, v in want.items())

    again = tiny_model(1)  # a resumed SGPO run: the stage is loaded, not trained
    assert train_stage(again, tok, RECS, CFG, d, True, train) == info
    for k, v in again.state_dict().items():
        assert torch.equal(v, want[k]), k

    path = os.path.join(d, "weights.safetensors")
    raw = bytearray(open(path, "rb").read())
    raw[-3] ^= 0x10  # one flipped bit in the tensor data
    open(path, "wb").write(bytes(raw))
    with pytest.raises(ValueError, match="weights.safetensors.*SHA-256"):
        train_stage(tiny_model(1), tok, RECS, CFG, d, True, train)

    # a stage finished by an older version (weights.pt): never unpickled, trained again
    os.remove(path)
    open(os.path.join(d, "weights.pt"), "wb").write(b"not a pickle anyone should load")
    json.dump({"steps": 2, "last": {}}, open(os.path.join(d, "DONE"), "w"))
    capsys.readouterr()
    legacy = tiny_model(1)
    assert train_stage(legacy, tok, RECS, CFG, d, True, train)["steps"] == 2
    assert "weights.pt" in capsys.readouterr().err
    for k, v in legacy.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert "weights" in json.load(open(os.path.join(d, "DONE")))
