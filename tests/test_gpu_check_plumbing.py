"""``make gpu-check`` without a GPU: the script's plumbing end to end in its dry-run mode (tiny
CPU shapes, GPU tests only collected), the layout of what it leaves in $GPU_OUT (what a lent
machine can send back: at most 8 files, at most two folders down), and the summary's goal
checks on a fake result."""
import json
import os
import re
import subprocess
import sys

import pytest

from bench import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "gpu_check.sh")
FILES = {"gpu_check.log", "machine.json", "build.log", "pytest_gpu.log", "results.json",
         "results.md", "logprob_vocab.png", "summary.md"}


def test_time_budget_default_is_five_minutes():
    text = open(SCRIPT).read()
    total = int(re.search(r'TOTAL_S="\$\{TOTAL_S:-(\d+)\}"', text).group(1))
    assert total <= 300
    caps = [int(c) for c in re.findall(r"\$\(cap (\d+) \d+\)", text)]
    assert caps and all(c <= total for c in caps)


def test_dry_run_writes_the_layout(tmp_path):
    out = tmp_path / "gpu-out"
    env = dict(os.environ, GPU_CHECK_DRY_RUN="1", GPU_OUT=str(out), PYTHON=sys.executable,
               TOTAL_S="240")
    res = subprocess.run(["bash", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert set(os.listdir(out)) == FILES, os.listdir(out)
    assert gpu_check.layout_problems(str(out)) == []
    summary = (out / "summary.md").read_text()
    assert "| shape | method | time ms | extra MiB | % of bf16 peak | status |" in summary
    assert "GPU tests:" in summary and "skipped" in summary
    assert "- bench: exit 0" in summary
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["shape"]["V"] for r in rows} == {300, 600}                 # the vocabulary sweep
    assert any(r["status"] == "unavailable" and r["reason"] for r in rows)  # not dropped
    assert (out / "logprob_vocab.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the console shows the summary table once
    assert res.stdout.count("| shape | method |") == 1


def test_layout_problems(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    (deep / "x.json").write_text("{}")
    (tmp_path / "bad name.txt").write_text("x")
    problems = " ".join(gpu_check.layout_problems(str(tmp_path)))
    assert "11 files" in problems and "folders down" in problems and "bad name.txt" in problems
    ok = tmp_path / "ok"
    (ok / "a" / "b").mkdir(parents=True)
    (ok / "a" / "b" / "f.txt").write_text("x")
    assert gpu_check.layout_problems(str(ok)) == []


def _row(method, ms, N=8192, mem=10 * 2 ** 20, pct=70.0, status="ok"):
    return {"workload": "logprob", "method": method, "shape": {"N": N, "D": 4096, "V": 128256},
            "status": status, "reason": "", "time_ms_median": ms, "mem_extra_bytes": mem,
            "roofline_pct": pct}


def test_summary_goal_checks(tmp_path):
    rows = [_row("ours_triton", 40.0), _row("ours_cuda", 45.0), _row("cce", 60.0),
            _row("liger_flce", 55.0), _row("ours_triton", 100.0, N=16384, mem=100 * 2 ** 20,
                                            pct=50.0), _row("cce", 110.0, N=16384)]
    (tmp_path / "results.json").write_text(json.dumps({"rows": rows}))
    text = gpu_check.summary(str(tmp_path))
    n8 = next(ln for ln in text.splitlines() if ln.startswith("- N=8192"))
    assert "ours_triton 40.0 ms" in n8 and "0.73x the fastest peer (liger_flce" in n8
    assert n8.count("NOT met") == 0
    n16 = next(ln for ln in text.splitlines() if ln.startswith("- N=16384"))
    assert n16.count("NOT met") == 3   # 0.91x the peer, 50% of the roofline, 100 MiB
    assert (tmp_path / "summary.md").read_text() == text
