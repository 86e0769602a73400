"""`sgdpo-fast train / sgpo / eval` end to end on a tiny random Llama saved to a folder."""
import json
import os

import pytest

from sgdpo_fast import cli
from sgdpo_fast.data.records import write_jsonl
from tiny_lm import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny"))
    tiny_model(21).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


PAIRS = [{"prompt": f"Q{i}?", "chosen": f"good {i}", "rejected": f"bad {i}!"} for i in range(4)]


def test_train_bad_line_names_file_and_line(model_dir, tmp_path, capsys):
    p = tmp_path / "prefs.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps(PAIRS[0]) + "\n\n")
        f.write(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    rc = cli.main(["train", "--model", model_dir, "--data", str(p), "--out", str(tmp_path / "o")])
    assert rc == 2
    err = capsys.readouterr().err
    assert f"{p}:3" in err and "rejected" in err


def test_train_then_resume_then_eval(model_dir, tmp_path, capsys):
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = str(tmp_path / "run")
    args = ["train", "--model", model_dir, "--data", p, "--out", out, "--max-steps", "2",
            "--lr", "1e-3", "--save-every", "1", "--no-progress", "--loss-type", "sgdpo",
            "--pilot-ratio-chosen", "0.5"]
    assert cli.main(args) == 0
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["pilot_ratio_chosen"] == 0.5 and cfg["loss_type"] == "sgdpo" and cfg["max_steps"] == 2
    assert os.path.isfile(os.path.join(out, "metrics.png"))
    assert cli.main(args + ["--resume"]) == 0
    assert "resumed" in capsys.readouterr().out
    final = os.path.join(out, "final")
    assert cli.main(["eval", "--model", final, "--limit", "3", "--max-new-tokens", "4",
                     "--answers", str(tmp_path / "ans.jsonl")]) == 0
    printed = capsys.readouterr().out
    assert "overall" in printed and "(n=3)" in printed
    assert len(open(tmp_path / "ans.jsonl").read().splitlines()) == 3


def test_sgpo_command(model_dir, tmp_path, capsys):
    sft = str(tmp_path / "sft.jsonl")
    write_jsonl(sft, [{"prompt": f"Say {w}.", "response": w} for w in ("cat", "dog", "sun", "owl")])
    out = str(tmp_path / "sgpo")
    rc = cli.main(["sgpo", "--model", model_dir, "--data", sft, "--out", out,
                   "--max-new-tokens", "6", "--max-steps", "1", "--improver-max-steps", "1",
                   "--no-progress", "--improver-lr", "1e-3"])
    assert rc == 0
    assert "pairs kept" in capsys.readouterr().out
    assert os.path.isfile(os.path.join(out, "iter-0", "pairs.jsonl"))
    assert os.path.isfile(os.path.join(out, "final", "config.json"))


def test_sigterm_saves_a_checkpoint_and_resume_finishes(model_dir, tmp_path):
    """A real `kill` of a training process: it saves the last finished step and exits 130;
    --resume completes the run."""
    import signal
    import subprocess
    import sys
    import time

    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = str(tmp_path / "run")
    args = [sys.executable, "-m", "sgdpo_fast.cli", "train", "--model", model_dir, "--data", p,
            "--out", out, "--max-steps", "60", "--save-every", "0", "--no-progress",
            "--lr", "1e-3", "--batch-size", "1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if os.path.isfile(metrics) and len(open(metrics).read().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "--resume" in err
    done = len(open(metrics).read().splitlines())
    assert 3 <= done < 60
    assert os.listdir(os.path.join(out, "checkpoints")) == [f"step-{done:06d}"]
    assert cli.main(args[3:] + ["--resume"]) == 0
    assert [json.loads(l)["step"] for l in open(metrics)] == list(range(1, 61))


def test_cli_help_lists_the_commands(capsys):
    from sgdpo_fast import cli
    with pytest.raises(SystemExit) as e:  # argparse's --help exits 0
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert all(c in out for c in ("train", "sgpo", "eval"))
