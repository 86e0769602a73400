"""The benchmark's vocabulary sweep (``python -m bench --vocab-sweep``): shapes, option checks,
grouping and the plot, on fake rows (the end-to-end run is in test_gpu_check_plumbing.py)."""
import pytest

from bench import cases, report, runner


def test_sweep_shapes():
    assert cases.vocab_sweep_shapes("cpu") == [dict(N=1024, D=576, V=v)
                                               for v in (32000, 128256, 256000)]
    assert cases.vocab_sweep_shapes("cuda")[0] == dict(N=8192, D=4096, V=32000)
    assert cases.vocab_sweep_shapes("cpu", [300, 600], N=8, D=4) == [dict(N=8, D=4, V=300),
                                                                     dict(N=8, D=4, V=600)]
    with pytest.raises(ValueError, match="positive"):
        cases.vocab_sweep_shapes("cpu", [0])


def test_sweep_options():
    args = runner.parse_args(["--vocab-sweep"])
    assert args.workload == "logprob" and args.vocab_sweep == []
    args = runner.parse_args(["--vocab-sweep", "300", "600", "--no-plots"])
    assert args.vocab_sweep == [300, 600] and args.plots == "none"
    with pytest.raises(SystemExit):
        runner.parse_args(["--vocab-sweep", "--workload", "loss"])


def _row(method, N, V, ms, mem=None, status="ok"):
    return {"workload": "logprob", "method": method, "shape": {"N": N, "D": 8, "V": V},
            "status": status, "time_ms_median": ms, "mem_extra_bytes": mem}


def test_vocab_series_and_plot(tmp_path):
    rows = [_row("eager", 16, v, v / 10, v * 4 * 16) for v in (100, 200, 400)] + \
        [_row("ours_cpu", 16, v, v / 20, 2 ** 20) for v in (100, 200, 400)] + \
        [_row("eager", 32, 100, 1.0)] + [_row("cce", 16, 200, None, status="unavailable")]
    groups = report.vocab_series(rows)
    assert list(groups) == [(16, 8)]          # N=32 was run at one V only: no sweep
    assert [V for V, _ in groups[(16, 8)]["eager"]] == [100, 200, 400]
    res = {"rows": rows, "machine": "m", "device": "cpu", "dtype": "fp32"}
    paths = report.plot_vocab(res, str(tmp_path))
    assert [p.rsplit("/", 1)[1] for p in paths] == ["logprob_vocab.png"]
    assert report.plot_vocab({**res, "rows": rows[-2:]}, str(tmp_path / "none")) == []
