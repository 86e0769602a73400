"""``sgdpo-fast`` command line.

    sgdpo-fast train --data prefs.jsonl --out runs/x [--model M] [--loss-type sgdpo] ...
    sgdpo-fast sgpo  --out runs/y [--data bundled:train] [--iterations 1] ...
    sgdpo-fast eval  [--model M] [--data bundled:heldout]

The demo (``make demo``, ``python -m examples.demo``) and the benchmark (``python -m
bench``) live in the source tree, beside the package.

``--model`` is a local Hugging Face folder (a run's ``final/`` works) or
``embedded:smollm2-135m`` (default).  Every run writes into ``--out`` and
continues an interrupted run with ``--resume``.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys

from .trainer.config import TrainConfig

# flag -> TrainConfig field (type from the dataclass default); only flags given override
_TRAIN_FLAGS = {
    "loss_type": str, "beta": float, "label_smoothing": float, "pilot_ratio_chosen": float,
    "pilot_ratio_rejected": float, "pilot_mode": str, "simpo_gamma": float, "nll_alpha": float,
    "reference": str, "lr": float, "weight_decay": float, "warmup_ratio": float,
    "max_grad_norm": float, "epochs": int, "max_steps": int, "batch_size": int,
    "grad_accum": int, "max_length": int, "max_prompt_length": int, "seed": int,
    "save_every": int, "keep_checkpoints": int, "backend": str, "system_prompt": str,
}


def _add_model(ap):
    ap.add_argument("--model", default="embedded:smollm2-135m",
                    help="local HF causal LM folder, or embedded:smollm2-135m (default)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda if available)")


def _add_train_flags(ap, prefix=""):
    g = ap.add_argument_group(f"{prefix or 'training'} options (TrainConfig)")
    for name, typ in _TRAIN_FLAGS.items():
        g.add_argument(f"--{prefix}{name.replace('_', '-')}", dest=f"{prefix.replace('-', '_')}{name}",
                       type=typ, default=None, help=f"default {getattr(TrainConfig, name)!r}")
    if not prefix:
        g.add_argument("--pilot-grad", action="store_true", default=None)
        g.add_argument("--gradient-checkpointing", action="store_true", default=None)
        g.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                       help="bf16 autocast (default: on with CUDA)")
        g.add_argument("--no-progress", dest="progress", action="store_false", default=None)


def _train_config(args, prefix="", base: TrainConfig = None) -> TrainConfig:
    base = base or TrainConfig()
    names = list(_TRAIN_FLAGS) + (["pilot_grad", "gradient_checkpointing", "bf16", "progress"]
                                  if not prefix else [])
    kw = {n: getattr(args, prefix + n) for n in names
          if getattr(args, prefix + n, None) is not None}
    return base.replace(**kw).validate()


def _device(args):
    import torch
    if args.device:
        return args.device
    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_for_training(args):
    """fp32 master weights: AdamW updates of bf16 weights would round most small steps
    away (lr 5e-7); on CUDA the compute runs in bf16 through autocast (``--bf16``)."""
    import torch
    from .model.loading import load_model
    return load_model(args.model, device=_device(args), dtype=torch.float32)


def _cmd_train(args):
    from .data.records import load_preferences, load_sft
    from .trainer import train

    cfg = _train_config(args)
    records = load_sft(args.data) if cfg.loss_type == "sft" else load_preferences(args.data)
    model, tok = _load_for_training(args)
    res = train(model, tok, records, cfg, args.out, resume=args.resume)
    print(json.dumps({k: res[k] for k in ("steps", "metrics", "plot", "final")}, indent=1))
    return 0


def _cmd_sgpo(args):
    from .data.records import load_sft
    from .model.generation import GenConfig
    from .sgpo import SGPOConfig, run_sgpo

    pref = _train_config(args, base=TrainConfig(loss_type="sgdpo", save_final=False))
    imp = _train_config(args, "improver_", TrainConfig(loss_type="sft", lr=1e-5, save_final=False))
    if imp.loss_type != "sft":
        raise SystemExit("--improver-loss-type must be sft")
    # machinery flags apply to both training stages
    imp = imp.replace(gradient_checkpointing=pref.gradient_checkpointing, bf16=pref.bf16,
                      progress=pref.progress)
    cfg = SGPOConfig(iterations=args.iterations, n_improver_prompts=args.improver_prompts,
                     n_pref_prompts=args.pref_prompts, policy_mix=args.policy_mix,
                     tukey_k=args.tukey_k, max_similarity=args.max_similarity, seed=pref.seed,
                     gen=GenConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                   batch_size=args.gen_batch_size, seed=pref.seed,
                                   progress=pref.progress),
                     drop_truncated=not args.keep_truncated,
                     improver_train=imp, pref_train=pref)
    records = load_sft(args.data)
    model, tok = _load_for_training(args)
    summaries = run_sgpo(model, tok, records, cfg, args.out, resume=args.resume)
    final = os.path.join(args.out, "final")
    model.save_pretrained(final)
    tok.save_pretrained(final)
    for s in summaries:
        print(f"iteration {s['iteration']}: {s['kept']}/{s['candidates']} pairs kept "
              f"{s['decisions']}")
    print(f"model: {final}")
    return 0


def _cmd_eval(args):
    from .data.records import load_sft
    from .evaluate import evaluate, format_table
    from .model.generation import GenConfig
    from .model.loading import load_model

    records = load_sft(args.data)
    if args.limit:
        records = records[:args.limit]
    model, tok = load_model(args.model, device=_device(args))
    res = evaluate(model, tok, records, GenConfig(max_new_tokens=args.max_new_tokens,
                                                  batch_size=args.batch_size),
                   answers_path=args.answers)
    print(format_table(res))
    return 0


def _parser():
    ap = argparse.ArgumentParser(prog="sgdpo-fast", description="fused preference optimization "
                                 "(DPO family, SGDPO, SGPO) without the [tokens x vocab] logits")
    sub = ap.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="DPO-family / SGDPO (or --loss-type sft) training")
    _add_model(t)
    t.add_argument("--data", required=True, help="JSONL (prompt/chosen/rejected; prompt/response "
                   "for sft), bundled:train, or hf:<dataset>[:split]")
    t.add_argument("--out", required=True, help="run folder")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    _add_train_flags(t)

    s = sub.add_parser("sgpo", help="the SGPO self-improving loop from SFT data")
    _add_model(s)
    s.add_argument("--data", default="bundled:train", help="SFT JSONL (prompt/response)")
    s.add_argument("--out", required=True)
    s.add_argument("--resume", action="store_true")
    s.add_argument("--iterations", type=int, default=1)
    s.add_argument("--improver-prompts", type=int, default=None, help="default: all")
    s.add_argument("--pref-prompts", type=int, default=None, help="default: all")
    s.add_argument("--policy-mix", type=float, default=1.0)
    s.add_argument("--tukey-k", type=float, default=1.5)
    s.add_argument("--max-similarity", type=float, default=0.9)
    s.add_argument("--keep-truncated", action="store_true",
                   help="keep pairs whose answers hit --max-new-tokens (dropped by default)")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--gen-batch-size", type=int, default=16)
    _add_train_flags(s)
    _add_train_flags(s, "improver-")

    e = sub.add_parser("eval", help="checker accuracy on task records")
    _add_model(e)
    e.add_argument("--data", default="bundled:heldout")
    e.add_argument("--answers", default=None, help="write every answer to this JSONL")
    e.add_argument("--limit", type=int, default=None)
    e.add_argument("--max-new-tokens", type=int, default=32)
    e.add_argument("--batch-size", type=int, default=16)
    return ap


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    from .data.records import DataError

    def _term(signum, frame):  # `kill` / a scheduler's SIGTERM: save like Ctrl-C does
        raise KeyboardInterrupt
    previous = signal.signal(signal.SIGTERM, _term)
    try:
        return {"train": _cmd_train, "sgpo": _cmd_sgpo, "eval": _cmd_eval}[args.command](args)
    except DataError as e:
        print(f"sgdpo-fast {args.command}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    raise SystemExit(main())
