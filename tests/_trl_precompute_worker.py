"""Run by tests/test_integrations_trl.py under ``torch.distributed.run`` (and in one process):
SGDPOTrainer's per-token reference precompute on a tiny model; the main process writes the
stored columns as JSON to argv[2]."""
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

from datasets import load_from_disk  # noqa: E402

from sgdpo_fast.integrations.trl import SGDPOConfig, SGDPOTrainer  # noqa: E402
from test_integrations_trl import make_models, make_tokenizer  # noqa: E402


def main(data_dir, out):
    policy, _ = make_models()
    args = SGDPOConfig(output_dir=out + ".run", report_to="none", per_device_train_batch_size=2,
                       use_cpu=True, save_strategy="no", bf16=False, precompute_ref_log_probs=True,
                       loss_type="sgdpo")
    t = SGDPOTrainer(model=copy.deepcopy(policy), ref_model=None, args=args,
                     train_dataset=load_from_disk(data_dir), processing_class=make_tokenizer())
    if t.accelerator.is_main_process:
        cols = {k: list(t.train_dataset[k]) for k in ("ref_chosen_token_logps",
                                                      "ref_rejected_token_logps")}
        with open(out, "w") as f:
            json.dump(cols, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
