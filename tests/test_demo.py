"""`make demo`'s script end to end with --quick on a tiny random Llama (the real run on the
embedded SmolLM2 is `make demo`; its output is in the README)."""
import os

from examples import demo
from tiny_lm import tiny_model, tiny_tokenizer


def test_demo_quick_on_tiny_model(tmp_path, capsys):
    mdir = str(tmp_path / "tiny")
    tiny_model(31).save_pretrained(mdir)
    tiny_tokenizer().save_pretrained(mdir)
    out = str(tmp_path / "run")
    assert demo.main(["--quick", "--model", mdir, "--out", out]) == 0
    text = capsys.readouterr().out
    assert "| **overall**" in text and "materialized fp32 logits" in text
    assert text.count("| **overall**") == 2 and "Untrained families (probe" in text
    for fam in ("letters", "calendar", "lists", "compare"):  # the untrained families' rows
        assert f"| {fam} |" in text
    for f in ("eval_before.jsonl", "eval_after.jsonl", "eval_table.md", "probe_before.jsonl",
              "probe_after.jsonl",
              "sgpo/iter-0/pairs.jsonl", "sgpo/iter-0/drafts.jsonl", "train_pairs.jsonl"):
        assert os.path.isfile(os.path.join(out, f)), f
