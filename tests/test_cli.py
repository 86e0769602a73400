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
                   "--no-progress", "--improver-lr", "1e-3", "--policy-target", "draft",
                   "--seed", "3"])
    assert rc == 0
    assert "pairs kept" in capsys.readouterr().out
    with open(os.path.join(out, "sgpo_config.json")) as f:
        c = json.load(f)
    assert c["policy_target"] == "draft"
    assert c["seed"] == c["pref_train"]["seed"] == c["improver_train"]["seed"] == 3
    assert os.path.isfile(os.path.join(out, "iter-0", "pairs.jsonl"))
    assert os.path.isfile(os.path.join(out, "final", "config.json"))

    # a second run into the same folder: refused, unless --overwrite, which deletes only the
    # SGPO run's entries (a file of the user's stays)
    args = ["sgpo", "--model", model_dir, "--data", sft, "--out", out, "--max-new-tokens", "6",
            "--max-steps", "1", "--improver-max-steps", "1", "--no-progress"]
    assert cli.main(args) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert cli.main(args + ["--resume", "--overwrite"]) == 2
    assert "give one of them" in capsys.readouterr().err
    mine = [os.path.join(out, n) for n in ("notes.txt", "iter-notes.txt")]
    stale = [os.path.join(out, "iter-0", "stale.txt"), os.path.join(out, "final", "stale.txt"),
             os.path.join(out, "final.tmp")]  # the last: left by an interrupted write
    for p in mine + stale:
        with open(p, "w") as f:
            f.write("x")
    assert cli.main(args + ["--overwrite"]) == 0
    with open(os.path.join(out, "sgpo_config.json")) as f:
        assert json.load(f)["policy_target"] == "reference"  # the second run's config
    assert not any(os.path.exists(p) for p in stale)
    assert all(os.path.isfile(p) for p in mine)
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


# --------------------------------------------------------------------------- reliability (issue 11)

def _one_line(capsys) -> str:
    """The CLI's report of a user error: exactly one line on stderr, no traceback."""
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _snapshot(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


BAD_FLAGS = [
    ("train", ["--lr", "inf"], "--lr"), ("train", ["--lr", "nan"], "--lr"),
    ("train", ["--lr", "0"], "--lr"), ("train", ["--lr", "-1e-3"], "--lr"),
    ("train", ["--lr", "abc"], "--lr"),
    ("train", ["--max-grad-norm", "-1"], "--max-grad-norm"),
    ("train", ["--max-grad-norm", "0"], "--max-grad-norm"),
    ("train", ["--max-grad-norm", "nan"], "--max-grad-norm"),
    ("train", ["--beta", "-1"], "--beta"), ("train", ["--beta", "inf"], "--beta"),
    ("train", ["--pilot-ratio-chosen", "1.5"], "--pilot-ratio-chosen"),
    ("train", ["--pilot-ratio-rejected", "0"], "--pilot-ratio-rejected"),
    ("train", ["--warmup-ratio", "1"], "--warmup-ratio"),
    ("train", ["--label-smoothing", "0.7"], "--label-smoothing"),
    ("train", ["--loss-type", "ipo", "--label-smoothing", "0.1"], "label_smoothing"),
    ("train", ["--weight-decay", "-0.1"], "--weight-decay"),
    ("train", ["--nll-alpha", "nan"], "--nll-alpha"), ("train", ["--simpo-gamma", "inf"], "--simpo-gamma"),
    ("train", ["--batch-size", "0"], "--batch-size"), ("train", ["--epochs", "-1"], "--epochs"),
    ("train", ["--max-steps", "0"], "--max-steps"), ("train", ["--grad-accum", "0"], "--grad-accum"),
    ("train", ["--max-length", "1"], "--max-length"), ("train", ["--max-prompt-length", "0"], "--max-prompt-length"),
    ("train", ["--seed", "-1"], "--seed"), ("train", ["--save-every", "-2"], "--save-every"),
    ("train", ["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    ("train", ["--loss-type", "dpo2"], "--loss-type"), ("train", ["--reference", "x"], "--reference"),
    ("train", ["--backend", "gpu"], "--backend"), ("train", ["--pilot-mode", "x"], "--pilot-mode"),
    ("train", ["--nope"], "--nope"),
    ("eval", ["--limit", "-1"], "--limit"), ("eval", ["--limit", "0"], "--limit"),
    ("eval", ["--max-new-tokens", "0"], "--max-new-tokens"), ("eval", ["--batch-size", "0"], "--batch-size"),
    ("sgpo", ["--temperature", "-1"], "--temperature"), ("sgpo", ["--temperature", "nan"], "--temperature"),
    ("sgpo", ["--max-similarity", "1.5"], "--max-similarity"), ("sgpo", ["--policy-mix", "-1"], "--policy-mix"),
    ("sgpo", ["--tukey-k", "nan"], "--tukey-k"), ("sgpo", ["--iterations", "0"], "--iterations"),
    ("sgpo", ["--improver-prompts", "0"], "--improver-prompts"), ("sgpo", ["--gen-batch-size", "0"], "--gen-batch-size"),
    ("sgpo", ["--improver-lr", "inf"], "--improver-lr"),
    ("sgpo", ["--improver-loss-type", "sigmoid"], "--improver-loss-type"),
]


@pytest.mark.parametrize("cmd,bad,flag", BAD_FLAGS, ids=lambda x: " ".join(x) if isinstance(x, list) else x)
def test_a_bad_flag_is_one_line_with_exit_2_before_anything_happens(model_dir, tmp_path, capsys,
                                                                     cmd, bad, flag):
    """Items 2, 3, 9, 11: every numeric flag is checked when parsed (lr finite > 0, clipping
    finite > 0, ratios in range, counts >= 1); the report is one line, exit code 2, and the
    run folder is not even created."""
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = tmp_path / "o"
    args = [cmd, "--model", model_dir] + (["--data", p, "--out", str(out)] if cmd == "train" else
                                          ["--out", str(out)] if cmd == "sgpo" else [])
    assert cli.main(args + bad) == 2
    line = _one_line(capsys)
    assert flag in line, line
    assert not out.exists()


def _train_args(model_dir, data, out, *extra):
    return ["train", "--model", model_dir, "--data", data, "--out", out, "--max-steps", "2",
            "--lr", "1e-3", "--save-every", "1", "--no-progress", "--loss-type", "sigmoid", *extra]


def test_a_typo_never_deletes_a_run(model_dir, tmp_path, capsys):
    """Item 4: a finished run folder is refused without --resume or --overwrite, and a bad
    flag next to --overwrite is refused before anything is deleted."""
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = str(tmp_path / "run")
    assert cli.main(_train_args(model_dir, p, out)) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert cli.main(_train_args(model_dir, p, out, "--beta", "-1")) == 2
    assert "--beta" in _one_line(capsys)
    assert cli.main(_train_args(model_dir, p, out, "--beta", "-1", "--overwrite")) == 2
    _one_line(capsys)
    assert cli.main(_train_args(model_dir, p, out)) == 2
    line = _one_line(capsys)
    assert "--resume" in line and "--overwrite" in line and out in line
    assert cli.main(_train_args(model_dir, p, out, "--resume", "--overwrite")) == 2
    _one_line(capsys)
    assert _snapshot(out) == before
    assert cli.main(_train_args(model_dir, p, out, "--overwrite", "--beta", "0.5")) == 0
    assert json.load(open(os.path.join(out, "config.json")))["beta"] == 0.5


def test_resume_with_other_data_is_a_clear_error(model_dir, tmp_path, capsys):
    p, q = str(tmp_path / "prefs.jsonl"), str(tmp_path / "other.jsonl")
    write_jsonl(p, PAIRS)
    write_jsonl(q, PAIRS[:3])
    out = str(tmp_path / "run")
    assert cli.main(_train_args(model_dir, p, out)) == 0
    capsys.readouterr()
    before = _snapshot(out)
    assert cli.main(_train_args(model_dir, q, out, "--resume")) == 2
    assert "data" in _one_line(capsys)
    assert cli.main(_train_args(model_dir, p, out, "--resume", "--lr", "2e-3")) == 2
    assert "lr" in _one_line(capsys)
    assert _snapshot(out) == before


def test_non_finite_weights_exit_non_zero_naming_the_step(model_dir, tmp_path, capsys):
    """Item 2: --lr 1e39 is finite but overflows the first update: exit 1, one line naming the
    step, and no checkpoint and no final/ holding the broken weights."""
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = str(tmp_path / "run")
    assert cli.main(_train_args(model_dir, p, out, "--lr", "1e39")) == 1
    assert "step 1" in _one_line(capsys)
    assert not os.path.exists(os.path.join(out, "final"))
    ck = os.path.join(out, "checkpoints")
    assert not os.path.isdir(ck) or not [d for d in os.listdir(ck) if d.startswith("step-")]


@pytest.mark.parametrize("what", ["missing", "empty", "no-tokenizer"])
def test_a_bad_model_folder_is_one_line(model_dir, tmp_path, capsys, what):
    """Item 11: a missing model folder, an empty one, one without tokenizer files."""
    import shutil
    d = tmp_path / "m"
    if what == "empty":
        d.mkdir()
    elif what == "no-tokenizer":
        shutil.copytree(model_dir, d)
        for f in os.listdir(d):
            if "token" in f or f in ("vocab.json", "merges.txt", "chat_template.jinja"):
                os.remove(d / f)
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    assert cli.main(["train", "--model", str(d), "--data", p, "--out", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    want = {"missing": f"no model folder at {d} (nothing is downloaded)",
            "empty": "config.json", "no-tokenizer": "tokenizer"}[what]
    assert want in line and str(d) in line, line
    assert not (tmp_path / "o").exists()


def test_a_lone_surrogate_is_one_line_naming_file_and_line(model_dir, tmp_path, capsys):
    p = tmp_path / "prefs.jsonl"
    p.write_text(json.dumps(PAIRS[0]) + "\n" + '{"prompt": "a\\ud800b", "chosen": "x", "rejected": "y"}\n')
    assert cli.main(["train", "--model", model_dir, "--data", str(p), "--out", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    assert f"{p}:2" in line and "surrogate" in line, line


def _limited(limit):
    """preexec_fn of a child whose files may not grow past ``limit`` bytes: a write beyond it
    fails with EFBIG, as one on a full disk fails with ENOSPC (SIGXFSZ ignored)."""
    def f():
        import resource
        import signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return f


def test_a_failed_write_is_one_line_exit_1(model_dir, tmp_path):
    """Item 11: a write that fails (the file-size limit here, a full disk in real life) is one
    line naming the file, exit 1, no traceback."""
    import subprocess
    import sys
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "sgdpo_fast.cli", *_train_args(model_dir, p, out)],
                       capture_output=True, text=True, timeout=300, preexec_fn=_limited(20_000))
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert r.returncode == 1 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert "cannot write" in lines[0] and "step-000001" in lines[0], lines[0]
    assert "File too large" in lines[0], lines[0]
    ck = os.path.join(out, "checkpoints")
    assert not [d for d in os.listdir(ck) if d.startswith("step-")]  # no half checkpoint


def test_a_failed_checkpoint_write_keeps_the_last_good_one(tmp_path):
    """The limit is set after step 2's checkpoint (by a callback): writing step 4's fails,
    names the file, and leaves step 2's checkpoint whole and nothing of step 4's."""
    import subprocess
    import sys
    script = f"""
import os, resource, signal, sys
from tiny_lm import tiny_model, tiny_tokenizer
from sgdpo_fast.trainer import TrainConfig, RunWriteError, train
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
def limit(step, metrics):
    if step == 2:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))
cfg = TrainConfig(loss_type="sigmoid", lr=1e-3, max_steps=4, save_every=2, progress=False,
                  save_final=False)
try:
    train(tiny_model(3), tiny_tokenizer(), {PAIRS!r}, cfg, {str(tmp_path / "run")!r},
          callbacks=[limit])
except RunWriteError as e:
    print("ERROR", e)
    sys.exit(0)
sys.exit(5)
"""
    here = os.path.dirname(os.path.abspath(__file__))  # tiny_lm, and the root for bench.tiny_lm
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([here, os.path.dirname(here)]))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    msg = r.stdout.split("ERROR", 1)[1]
    assert "step-000004" in msg and "File too large" in msg, msg
    ck = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ck)) == ["step-000002"]
    from sgdpo_fast.trainer.checkpoint import read_checkpoint
    assert read_checkpoint(str(ck / "step-000002"))["step"] == 2


def test_eval_limit_takes_exactly_that_many(model_dir, tmp_path, capsys):
    assert cli.main(["eval", "--model", model_dir, "--limit", "1", "--max-new-tokens", "2"]) == 0
    assert "(n=1)" in capsys.readouterr().out


@pytest.mark.parametrize("missing,extra", [("transformers", "train")])
def test_missing_optional_dependency_names_the_extra(model_dir, tmp_path, missing, extra):
    """A command whose optional dependency is not installed says which extra to install, on
    one line, exit code 2 (run in a subprocess where the package cannot be imported)."""
    import subprocess
    import sys
    p = str(tmp_path / "prefs.jsonl")
    write_jsonl(p, PAIRS)
    code = (f"import sys; sys.modules[{missing!r}] = None\n"
            "from sgdpo_fast.cli import main\n"
            f"sys.exit(main(['train', '--model', {model_dir!r}, '--data', {p!r}, "
            f"'--out', {str(tmp_path / 'o')!r}, '--max-steps', '1', '--no-progress']))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[-1] == (f"sgdpo-fast train: error: needs the Python package {missing!r}, not "
                         f'installed: pip install "sgdpo_fast[{extra}]" (from a clone: pip '
                         f'install ".[{extra}]")'), r.stderr


def test_user_errors_found_late_are_one_line_exit_2(model_dir, tmp_path, capsys):
    """An empty data file, --gen-backend vllm without vLLM, an unknown embedded model: one
    line, exit 2, no traceback."""
    import importlib.util
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    cases = [(["train", "--model", model_dir, "--data", str(empty), "--out", str(tmp_path / "a")],
              "no records"),
             (["train", "--model", "embedded:nope", "--data", str(empty), "--out",
               str(tmp_path / "b")], "no records"),
             (["sgpo", "--model", model_dir, "--data", str(empty), "--out", str(tmp_path / "c")],
              "no records")]
    if importlib.util.find_spec("vllm") is None:
        cases.append((["sgpo", "--model", model_dir, "--gen-backend", "vllm", "--out",
                       str(tmp_path / "d")], "needs vLLM"))
    for argv, msg in cases:
        capsys.readouterr()
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0] and "Traceback" not in err[0], (argv, err)
    capsys.readouterr()
    sft = tmp_path / "sft.jsonl"
    write_jsonl(str(sft), [{"prompt": "Say cat.", "response": "cat"}])
    assert cli.main(["train", "--model", "embedded:nope", "--data", str(sft), "--loss-type", "sft",
                     "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown embedded model" in err[0], err
