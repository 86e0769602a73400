"""Training jobs run under a launcher by tests/test_distributed_trainer.py:

    python -m torch.distributed.run --nproc-per-node 2 tests/distributed_jobs.py OUT [ONE_PROC_RUN]

Each job trains the tiny Llama with ``sgdpo_fast.trainer.train`` (2 ranks x batch 1 x
accumulation 2); rank 0 writes the final weights to ``OUT/<job>.safetensors`` and what it
saw to ``OUT/<job>.json``.  The test compares them with one-process runs.
"""
import json
import os
import sys

import torch

from safetensors.torch import save_file
from sgdpo_fast import distributed
from sgdpo_fast.trainer import RunFolderError, TrainConfig, train
from tiny_lm import PAIRS, tiny_model, tiny_tokenizer



def config(**kw) -> TrainConfig:
    """5 pairs, global batch 4 (per-rank batch x ranks x 2): 2 steps per epoch, the second
    with one pair (one rank makes a weight-0 pass); 4 steps cross an epoch boundary."""
    base = dict(lr=1e-3, batch_size=1, grad_accum=2, max_steps=4, warmup_ratio=0.0, save_every=0,
                progress=False, save_final=False, seed=0, max_grad_norm=0.05)
    base.update(kw)
    return TrainConfig(**base)


class Killed(RuntimeError):
    pass


def _save(out, name, model, info):
    if distributed.is_main():
        save_file({k: v.detach().clone() for k, v in model.state_dict().items()},
                  os.path.join(out, f"{name}.safetensors"))
        with open(os.path.join(out, f"{name}.json"), "w") as f:
            json.dump(info, f)


def main():
    out = sys.argv[1]
    one_proc_run = sys.argv[2] if len(sys.argv) > 2 else None
    torch.set_num_threads(1)
    tok = tiny_tokenizer()
    distributed.init_from_env("cpu")
    assert distributed.world() == 2
    for name, kw in (("ddp-sgdpo", dict(loss_type="sgdpo", parallel="ddp")),
                     ("fsdp-sgdpo", dict(loss_type="sgdpo", parallel="fsdp")),
                     ("fsdp-sigmoid", dict(loss_type="sigmoid", parallel="fsdp",
                                           max_grad_norm=None))):
        model = tiny_model(3)
        res = train(model, tok, PAIRS, config(**kw), os.path.join(out, name))
        _save(out, name, model, {"loss": [res["last"]["loss"]]})

    # killed after step 3 and resumed, with dropout (every rank's random states matter), tied
    # embeddings and FSDP2's sharded checkpoints; the newest checkpoint (step 3) has a flipped
    # bit in rank 1's shard, which rank 1 finds (the ranks share the hashing): all ranks fall
    # back to step 2
    cfg = config(loss_type="sgdpo", parallel="fsdp", save_every=1, keep_checkpoints=2)
    model = tiny_model(3, dropout=0.2, tie=True)
    train(model, tok, PAIRS, cfg, os.path.join(out, "fsdp-dropout"))
    _save(out, "fsdp-dropout", model, {})

    def kill(step, metrics):
        if step == 3:
            raise Killed()

    run = os.path.join(out, "fsdp-killed")
    try:
        train(tiny_model(3, dropout=0.2, tie=True), tok, PAIRS, cfg, run, callbacks=[kill])
        raise AssertionError("the run was not killed")
    except Killed:
        pass
    ckpts = sorted(os.listdir(os.path.join(run, "checkpoints")))
    shard_dir = os.path.join(run, "checkpoints", "step-000003", "dcp")
    if distributed.is_main():
        (shard,) = [n for n in os.listdir(shard_dir) if n.startswith("shard-00002-")]
        with open(os.path.join(shard_dir, shard), "r+b") as f:
            f.seek(-5, os.SEEK_END)
            b = f.read(1)
            f.seek(-5, os.SEEK_END)
            f.write(bytes([b[0] ^ 0x08]))
    distributed.barrier()
    model = tiny_model(3, dropout=0.2, tie=True)
    res = train(model, tok, PAIRS, cfg, run, resume=True)
    _save(out, "fsdp-killed", model, {"checkpoints_after_kill": ckpts, "steps": res["steps"],
                                      "after_resume": sorted(os.listdir(os.path.join(run, "checkpoints")))})

    if one_proc_run:  # a one-process run resumed with two processes: refused
        try:
            train(tiny_model(3), tok, PAIRS, config(loss_type="sigmoid"), one_proc_run, resume=True)
            msg = None
        except RunFolderError as e:
            msg = str(e)
        if distributed.is_main():
            with open(os.path.join(out, "world-mismatch.json"), "w") as f:
                json.dump({"error": msg}, f)
    distributed.destroy()


if __name__ == "__main__":
    main()
