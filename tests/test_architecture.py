"""The package's shape: layers import downward only, no import-path hacks, no module-level
configuration (options travel in a frozen LogprobPlan), metrics from the same sweep."""
import ast
import dataclasses
import pathlib
import types

import pytest
import torch

import sgdpo_fast as sf
from sgdpo_fast.ops import LogprobPlan, TileConfig, TritonConfig, sweep
from oracle import logprob_oracle

PKG = pathlib.Path(sf.__file__).parent
# layer of each top-level part of the package (docs/design.md draws the same picture);
# a module may import its own layer and the layers below it
LAYERS = {"kernels": 0, "ops": 0, "losses": 1, "model": 2, "data": 2, "distributed": 2,
          "trainer": 3, "sgpo": 4, "evaluate": 4, "integrations": 4, "cli": 5}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "sgdpo_fast" else ""


def _imports(path: pathlib.Path):
    mod = "sgdpo_fast." + ".".join(path.relative_to(PKG).with_suffix("").parts)
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            yield mod, target
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield mod, a.name


def test_layers_import_downward_only():
    bad = []
    for path in PKG.rglob("*.py"):
        for mod, target in _imports(path):
            src, dst = _part(mod), _part(target)
            if src in LAYERS and dst in LAYERS and LAYERS[dst] > LAYERS[src]:
                bad.append(f"{mod} imports {target}")
    assert not bad, bad
    # and every part of the package has a layer
    parts = {p.name if p.is_dir() else p.stem for p in PKG.iterdir()
             if (p.is_dir() and (p / "__init__.py").exists()) or (p.suffix == ".py"
                                                                  and p.stem != "__init__")}
    assert parts <= set(LAYERS), parts - set(LAYERS)


def test_no_import_path_manipulation():
    for path in PKG.rglob("*.py"):
        text = path.read_text()
        assert "sys.path" not in text and "__path__" not in text, path


def test_no_module_level_mutable_configuration():
    """Module globals of the op's modules are constants: upper-case names bound to
    immutable values (numbers, strings, tuples, frozensets, frozen dataclasses)."""
    import importlib
    for name in ("ops.plan", "ops.sweep", "ops.logprob", "ops.backends",
                 "ops.backends.cpu_backend", "ops.backends.torch_backend",
                 "ops.backends.cuda_backend", "ops.backends.triton_backend",
                 "losses.preference", "losses.pairwise", "integrations.trl"):
        mod = importlib.import_module("sgdpo_fast." + name)
        for key, val in vars(mod).items():
            if key.startswith("__") or key == "annotations" or callable(val) \
                    or isinstance(val, type(mod)):
                continue
            frozen = dataclasses.is_dataclass(val) and type(val).__dataclass_params__.frozen
            ok = isinstance(val, (int, float, str, bytes, tuple, frozenset, type(None),
                                  types.MappingProxyType)) or frozen
            # the one exception: the record of what patch_trl() replaced in TRL
            assert ok or (name, key) == ("integrations.trl", "_SAVED"), (name, key, type(val))


def test_plan_is_frozen_and_validated():
    p = LogprobPlan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.backend = "torch"
    for bad, match in ((dict(backend="gpu"), "backend"), (dict(metrics=("nope",)), "metrics"),
                       (dict(ignore_index=1.5), "ignore_index"),
                       (dict(ignore_index=2**70), "int64")):
        with pytest.raises(ValueError, match=match):
            LogprobPlan(**bad)
    with pytest.raises(ValueError, match="tile_elems"):
        TileConfig(tile_elems=0)
    with pytest.raises(ValueError, match="block_n"):
        TritonConfig(block_n=-1)
    cfg = TritonConfig(block_n=16, splits=3)
    assert TritonConfig.from_list(cfg.as_list()) == cfg


def _inputs(N=29, D=12, V=97, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g).requires_grad_()
    w = torch.randn(V, D, generator=g).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    with torch.no_grad():  # some targets are the argmax, so is_top1 has both answers
        t[::3] = (h[::3] @ w.t()).argmax(1)
    t[[1, 7]] = -100
    return h, w, t


@pytest.mark.parametrize("backend", ["torch", "cpu", "triton"])
def test_metrics_come_from_the_same_sweep(backend, monkeypatch):
    if backend == "triton":
        pytest.importorskip("triton")
        from sgdpo_fast.ops.backends import triton_usable
        if not triton_usable("cpu"):
            pytest.skip("needs TRITON_INTERPRET=1")
    h, w, t = _inputs()
    tiles = TileConfig(tile_elems=8 * 20, max_block_n=8, min_block_v=7)
    plan = LogprobPlan(backend=backend, tiles=tiles,
                       triton=TritonConfig(block_n=16, block_v=32, block_d=16),
                       metrics=("entropy", "log_sum_sq_probs", "mean_logits", "is_top1"))
    calls = []
    orig = sweep.logit_tile_
    monkeypatch.setattr(sweep, "logit_tile_", lambda *a: calls.append(1) or orig(*a))  # counter
    lp, met = sf.ops.token_logprobs(h, w, t, softcap=5.0, plan=plan)
    if backend != "triton":
        n_tiles = 4 * 5  # 27 valid rows in blocks of 8, 97 ids in tiles of 20
        assert len(calls) == n_tiles, len(calls)
    z = 5.0 * torch.tanh(h.double() @ w.double().t() / 5.0)
    lsm = torch.log_softmax(z, -1)
    valid = t != -100
    want = {"entropy": -(lsm.exp() * lsm).sum(-1), "log_sum_sq_probs": torch.logsumexp(2 * lsm, -1),
            "mean_logits": z.mean(-1), "is_top1": (z.argmax(-1) == t).double()}
    assert want["is_top1"][valid].sum() >= 5 and (1 - want["is_top1"][valid]).sum() >= 5
    for k, v in want.items():
        got = met[k]
        assert got.dtype == torch.float32 and not got.requires_grad
        assert torch.all(got[~valid] == 0)
        torch.testing.assert_close(got[valid].double(), v[valid], rtol=1e-5, atol=1e-5, msg=k)
    torch.testing.assert_close(lp.double(), logprob_oracle(h, w, t, softcap=5.0), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_nan_in_an_ignored_row_reaches_no_gradient(backend):
    """Ignored rows are dropped before the GEMMs: a NaN there touches nothing."""
    h, w, t = _inputs()
    with torch.no_grad():
        h[1] = float("nan")  # t[1] is ignored
    lp = sf.fused_token_logprobs(h, w, t, backend=backend)
    gh, gw = torch.autograd.grad(lp.sum(), (h, w))
    assert torch.isfinite(lp).all() and torch.isfinite(gw).all()
    assert torch.all(gh[1] == 0) and torch.isfinite(gh).all()


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_logits_accumulate_in_fp32(backend):
    """bf16 inputs: the logits are fp32 sums (not rounded to bf16 before the logsumexp), so
    the result equals the fp64 oracle of the same bf16 inputs to fp32 accuracy."""
    h, w, t = _inputs(N=33, D=64, V=301)
    hb, wb = h.detach().bfloat16(), w.detach().bfloat16()
    lp = sf.fused_token_logprobs(hb, wb, t, backend=backend)
    ref = logprob_oracle(hb, wb, t)
    assert (lp.double() - ref).abs().max() < 1e-4


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_double_backward_is_a_clear_error(backend):
    h, w, t = _inputs()
    lp = sf.fused_token_logprobs(h, w, t, backend=backend)
    (gh,) = torch.autograd.grad(lp.sum(), (h,), create_graph=True)  # first order: fine
    assert torch.isfinite(gh).all()
    with pytest.raises(NotImplementedError, match="second-order"):
        gh.sum().backward()


def test_plan_math_fields_are_used_or_contradicted():
    """The transform and ignore_index may come from the plan instead of the keywords; a plan
    that says one thing and a keyword another is an error, never silently ignored."""
    from sgdpo_fast.ops import LogitTransform
    h, w, t = _inputs()
    t2 = t.clone()
    t2[t2 == -100] = -1
    p = LogprobPlan(ignore_index=-1, transform=LogitTransform(1.0, 1.5, 2.0))
    got = sf.fused_token_logprobs(h, w, t2, plan=p)
    want = logprob_oracle(h, w, t2, ignore_index=-1, softcap=1.5, temperature=2.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    same = sf.fused_token_logprobs(h, w, t2, plan=p, softcap=1.5, ignore_index=-1)
    torch.testing.assert_close(same, got)
    with pytest.raises(ValueError, match="softcap=3.0 contradicts"):
        sf.fused_token_logprobs(h, w, t2, plan=p, softcap=3.0)
    with pytest.raises(ValueError, match="ignore_index=-7 contradicts"):
        sf.fused_token_logprobs(h, w, t, plan=LogprobPlan(ignore_index=-1), ignore_index=-7)


def test_triton_blocks_must_be_powers_of_two():
    for bad in (dict(block_n=24), dict(block_v=8), dict(block_d=48)):
        with pytest.raises(ValueError, match="power of two"):
            TritonConfig(**bad)


def test_preference_loss_second_order_is_a_clear_error():
    g = torch.Generator().manual_seed(0)
    p = torch.randn(4, 5, dtype=torch.float64, generator=g).requires_grad_()
    r = torch.randn(4, 5, dtype=torch.float64, generator=g)
    out = sf.preference_loss(p, r, torch.ones(4, 5, dtype=torch.bool), loss_type="sigmoid")
    (gp,) = torch.autograd.grad(out.loss, p, create_graph=True)
    with pytest.raises(NotImplementedError, match="preference_loss has no second-order"):
        gp.sum().backward()
