"""The thin trainer: AdamW, gradient accumulation, cosine schedule with warmup,
bf16 autocast on GPU, checkpoints every K steps, exact resume, JSONL metrics, a
PNG plot and a tqdm bar.  The model's loss comes from an objective
(``objectives.py``); the LM head always runs through the fused op.

Run folder::

    <out>/config.json          the TrainConfig, the step count and the run's fingerprints
    <out>/metrics.jsonl        one line per optimizer step
    <out>/metrics.png          loss, rewards, margins, accuracy (+ pilots for SGDPO)
    <out>/reference_logps.safetensors   precomputed reference (preference losses)
    <out>/checkpoints/step-N/  the last ``keep_checkpoints`` checkpoints (checkpoint.py)
    <out>/final/               save_pretrained model + tokenizer at the end

A folder that holds a run is continued only with ``resume=True`` and replaced only with
``overwrite=True``; everything is validated before any file is touched, and a resume must
match the run's data, base model and settings (``run_folder.py``).  Every file is written
atomically (``files.py``); a failed write raises ``RunWriteError`` naming the file.
A non-finite loss, gradient norm or parameter stops the run with ``NonFiniteError``
naming the step, before that step is logged or saved.

Data order: epoch ``e`` visits the examples in ``randperm(n)`` drawn from a
generator seeded with ``(seed, e)``; optimizer step ``s`` of that epoch takes the next
*global batch* of ``batch_size x ranks x grad_accum`` examples of that order, and rank ``r``
computes, at micro-step ``k``, the ``batch_size`` examples at position ``(k x ranks + r) x
batch_size`` of it (one process: micro-batches ``s*accum ... s*accum + accum - 1``).  The
step number therefore fixes the data position, and a resumed run replays exactly what an
uninterrupted one would have done.

Several processes (``torchrun`` / ``accelerate launch``; ``parallel.py``): DDP, or FSDP2 with
``parallel="fsdp"``.  Every rank runs the same number of micro-steps (a rank left without
examples at the end of an epoch makes a weight-0 pass); a step's loss is normalized by the
whole global batch (``objectives.py``), so the weights equal one process's at the same
global batch up to float rounding.  Rank 0 alone writes ``config.json``, metrics, the plot,
the reference file, checkpoints (FSDP2: every rank writes its shards) and ``final/``; the
folder must be on a filesystem every rank sees.  A stop request (Ctrl-C, SIGTERM, which
the launcher forwards) is agreed on by all ranks at the end of a step, so they all save
the same step.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, List, Optional, Sequence

import torch

from .. import distributed
from . import run_folder
from .checkpoint import (find_resumable, load_checkpoint, load_sharded_checkpoint,
                         save_checkpoint, set_aside, sharded_training_state, training_state)
from .config import ConfigError, TrainConfig
from .files import write_folder, write_json, write_text, writing
from .parallel import Parallel, check_layout
from .plot import plot_metrics
from .run_folder import RunFolderError


class NonFiniteError(FloatingPointError):
    """The loss, the gradient norm or the parameters became NaN or infinite at a step; the
    run stopped before logging or saving that step (the message names it and the last
    checkpoint)."""


def _warn(msg: str) -> None:
    if distributed.is_main():
        print(f"[sgdpo_fast] warning: {msg}", file=sys.stderr, flush=True)


def _say(msg: str) -> None:
    if distributed.is_main():
        print(msg, flush=True)


class _StopRequest:
    """Ctrl-C / SIGTERM during training: finish the current step, checkpoint, then raise
    KeyboardInterrupt; a second signal leaves at once (losing the unsaved steps)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self._old = {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\n[sgdpo_fast] stopping after this step and saving a checkpoint "
              "(signal again to leave at once)", flush=True)

    def install(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear 0 -> 1 over ``warmup`` steps, then cosine 1 -> 0 at ``total``."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        done = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))
    return f


class Trainer:
    """``Trainer(model, tokenizer, objective, cfg, out_dir).train(resume=False)``.

    ``callbacks``: callables ``cb(step, metrics)`` run after each optimizer step
    (after its checkpoint, if any).  Ctrl-C or SIGTERM lets the current step finish,
    saves a checkpoint and raises KeyboardInterrupt; ``--resume`` continues from it.
    """

    def __init__(self, model, tokenizer, objective, cfg: TrainConfig, out_dir: str,
                 callbacks: Sequence[Callable] = ()):
        self.model, self.tokenizer, self.obj = model, tokenizer, objective
        self.cfg = cfg.validate()
        self.out = out_dir
        self.callbacks = list(callbacks)
        distributed.init_from_env(next(model.parameters()).device.type)
        self.par = Parallel(cfg.parallel)
        if self.par.sharded:
            try:
                check_layout(model, cfg.parallel)
            except ValueError as e:
                raise ConfigError(str(e)) from None
            if getattr(objective, "needs_ref", False) and cfg.reference == "copy":
                raise ConfigError("reference='copy' keeps a whole frozen model on every rank, which "
                                  "parallel='fsdp' is meant to avoid: use reference='precompute' "
                                  "(the default)")
        self.module = None
        self.device = next(model.parameters()).device
        if (self.par.kind == "ddp" and self.device.type == "cuda"
                and self.device.index != torch.cuda.current_device()):
            raise ConfigError(f"the model is on {self.device} but this process's GPU is "
                              f"cuda:{torch.cuda.current_device()} (LOCAL_RANK): move the model "
                              f"there (one GPU per process)")
        self.world = self.par.world
        self.global_batch = cfg.batch_size * self.world * cfg.grad_accum
        self.steps_per_epoch = math.ceil(len(objective) / self.global_batch)
        self.total_steps = cfg.max_steps or cfg.epochs * self.steps_per_epoch
        self.generator = torch.Generator().manual_seed(cfg.seed)
        self.metrics_path = os.path.join(out_dir, "metrics.jsonl")
        self.plot_path = os.path.join(out_dir, "metrics.png")

    # data order -----------------------------------------------------------------------------
    def _order(self, epoch: int) -> List[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.obj), generator=g).tolist()

    def step_examples(self, step: int) -> List[int]:
        """The example indices of optimizer step ``step`` (0-based) over all ranks: the next
        global batch of its epoch's order."""
        epoch, j = divmod(step, self.steps_per_epoch)
        g = self.global_batch
        return self._order(epoch)[j * g:(j + 1) * g]

    def micro_batches(self, step: int, rank: Optional[int] = None) -> List[List[int]]:
        """The example indices of each micro-batch of optimizer step ``step`` on ``rank``
        (default: this process).  Every rank gets the same number of micro-batches; an empty
        one (the end of an epoch) is run as a weight-0 pass, so collectives stay in step."""
        ex = self.step_examples(step)
        bs, w = self.cfg.batch_size, self.world
        r = self.par.rank if rank is None else rank
        n_micro = math.ceil(len(ex) / (bs * w))
        return [ex[(k * w + r) * bs:(k * w + r + 1) * bs] for k in range(n_micro)]

    # pieces ---------------------------------------------------------------------------------
    def _optimizer(self):
        params = self.par.params()
        opt = torch.optim.AdamW(params, lr=self.cfg.lr, betas=tuple(self.cfg.adam_betas),
                                weight_decay=self.cfg.weight_decay)
        warm = int(round(self.cfg.warmup_ratio * self.total_steps))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warm, self.total_steps))
        return opt, sched

    def _bf16(self, device: torch.device) -> bool:
        return self.cfg.bf16 if self.cfg.bf16 is not None else device.type == "cuda"

    def _autocast(self):
        if self._bf16(self.device):
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _truncate_metrics(self, upto: int) -> None:
        """Drop metric lines of steps after ``upto`` (recorded after the checkpoint)."""
        if not self.par.main or not os.path.isfile(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path) as f:
            for line in f:
                try:
                    if json.loads(line)["step"] <= upto:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError):
                    pass  # a line torn by the kill, or blank
        write_text(self.metrics_path, "".join(keep))

    def _save(self, step, opt, sched):
        """A checkpoint of ``step`` (every rank calls it: the random states are gathered, and
        under FSDP2 every rank writes its shards)."""
        if self.par.sharded:
            state, sharded = sharded_training_state(self.module, opt, sched, self.generator)
        else:
            state, sharded = training_state(self.model, opt, sched, self.generator), None
        path = save_checkpoint(self.out, step, state, self._record,
                               keep=self.cfg.keep_checkpoints, sharded=sharded)
        self._last_ckpt = path
        return path

    def _plot(self):
        if not self.par.main:
            return self.plot_path
        with writing(self.plot_path):
            return plot_metrics(self.metrics_path, self.plot_path, self._title())

    def fingerprints(self) -> dict:
        """The run's identity: its tokenized data and its base model (as passed in)."""
        return {"data": self.obj.fingerprint(), "model": run_folder.model_fingerprint(self.model)}

    def _resume_point(self, record: dict):
        """The newest intact checkpoint (path or None), after checking that this run matches
        the recorded one; damaged newer checkpoints are reported and returned for setting
        aside.  Reads only: nothing in the folder changes here."""
        path, meta, bad = find_resumable(self.out, _warn)
        problems = []
        stored = run_folder.read_record(self.out)
        for rec, where in ((meta, path), (stored, os.path.join(self.out, run_folder.CONFIG_FILE))):
            if rec is not None and not problems:
                problems = [f"{p} (recorded in {where})" for p in run_folder.mismatch(
                    rec, record["fingerprints"], self.cfg, self.world)]
        if problems:
            raise RunFolderError(f"cannot resume {self.out}: " + "; ".join(problems) +
                                 ". Resume with the run's own data, model and settings, or "
                                 "start a new run (--overwrite, or another --out)")
        if path is None and run_folder.holds_run(self.out):
            _warn(f"no intact checkpoint in {self.out}: starting from step 0")
        return path, bad

    # the loop -------------------------------------------------------------------------------
    def train(self, resume: bool = False, overwrite: bool = False) -> dict:
        """Train to ``total_steps``.  ``resume``: continue the run in ``out_dir`` from its
        newest intact checkpoint; ``overwrite``: replace a run that is there.  Without either,
        a folder holding a run is refused (RunFolderError) and left as it is."""
        run_folder.check_start(self.out, resume, overwrite)
        record = {"objective": self.obj.name, "n_examples": len(self.obj),
                  "total_steps": self.total_steps, **self.cfg.to_dict(),
                  "world_size": self.world, "global_batch": self.global_batch,
                  "fingerprints": self.fingerprints(), "settings": run_folder.settings(self.cfg)}
        ckpt, bad = self._resume_point(record) if resume else (None, [])
        distributed.barrier()  # every rank has read the folder before rank 0 changes it
        # ---- everything is validated: from here on the folder changes ----
        main = self.par.main
        if not resume:
            if main:
                run_folder.clear_run(self.out)  # only the trainer's own files, and only now
            torch.manual_seed(self.cfg.seed + self.par.rank)  # dropout etc.: reproducible
        if main:
            os.makedirs(self.out, exist_ok=True)
            for path in bad:
                _warn(f"damaged checkpoint {path} kept as {set_aside(path)}")
        self._record = {"fingerprints": record["fingerprints"], "settings": record["settings"],
                        "world_size": self.world}
        if main:
            write_json(os.path.join(self.out, run_folder.CONFIG_FILE), record)
        distributed.barrier()
        if self.cfg.gradient_checkpointing:
            en = getattr(self.model, "activation_checkpointing_enable", None)
            if en is not None:
                en()
            elif self.world > 1:  # reentrant checkpointing and DDP's hooks do not mix
                self.model.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.model.gradient_checkpointing_enable()
        train_dev = distributed.device() if self.par.sharded else self.device
        self.module = self.par.wrap(self.model, self.cfg.backend, self._bf16(train_dev))
        self.device = self.par.device
        try:
            return self._run(resume, record, ckpt)
        finally:
            self.par.release()
            self.module = None

    def _run(self, resume: bool, record: dict, ckpt) -> dict:
        main = self.par.main
        # the reference comes from the model as loaded, before a checkpoint replaces its
        # weights, computed under the same autocast as the policy
        with self._autocast():
            self.obj.prepare(self.model, self.out, record["fingerprints"]["model"],
                             module=self.par.inference_module(),
                             collective=self.par.collective_forward)
        self.par.settle()
        opt, sched = self._optimizer()
        step = 0
        self._last_ckpt = None
        if ckpt is not None:
            load = load_sharded_checkpoint if self.par.sharded else load_checkpoint
            target = self.module if self.par.sharded else self.model
            step = load(ckpt, target, opt, sched, self.generator, verify=False)["step"]
            self._last_ckpt = ckpt
            _say(f"[sgdpo_fast] resumed from {ckpt} (step {step}/{self.total_steps})")
        self._truncate_metrics(step)
        last_saved = step
        self.module.train()
        try:
            from tqdm.auto import tqdm
            bar = tqdm(total=self.total_steps, initial=step, desc=f"train {self.cfg.loss_type}",
                       disable=not (self.cfg.progress and main), dynamic_ncols=True)
        except ImportError:  # pragma: no cover
            bar = None
        t0 = time.perf_counter()
        last = {}
        stop = _StopRequest()
        clean = True  # between steps: weights, optimizer, step count and metrics agree
        agreed = False  # every rank stops after the same step (several processes)
        try:
            stop.install()
            while step < self.total_steps:
                clean = False
                last = self._step(step, opt, sched)
                last.update(step=step + 1, epoch=step // self.steps_per_epoch,
                            elapsed_s=round(time.perf_counter() - t0, 3))
                if main:
                    with writing(self.metrics_path), open(self.metrics_path, "a") as f:
                        f.write(json.dumps(last) + "\n")
                step += 1
                clean = True
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}")
                if self.cfg.save_every and step % self.cfg.save_every == 0 and step < self.total_steps:
                    self._save(step, opt, sched)
                    last_saved = step
                    self._plot()
                for cb in self.callbacks:
                    cb(step, last)
                requested = stop.requested if self.world == 1 else distributed.any_rank(stop.requested)
                if requested and step < self.total_steps:
                    agreed = True
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            # several processes: only a stop all ranks agreed on can save (a collective)
            if clean and step > last_saved and (self.world == 1 or agreed):
                path = self._save(step, opt, sched)
                _say(f"\n[sgdpo_fast] interrupted: saved {path}; continue with --resume")
            elif not clean or step > last_saved:
                _say(f"\n[sgdpo_fast] interrupted inside step {step + 1}: nothing saved since "
                     f"step {last_saved}; continue with --resume")
            raise
        finally:
            stop.restore()
            if bar is not None:
                bar.close()
        if step > last_saved or self._last_ckpt is None:
            self._save(step, opt, sched)
        plot = self._plot()
        self.par.write_back()  # FSDP2: the trained weights into the caller's model
        final = None
        if self.cfg.save_final:
            final = os.path.join(self.out, "final")
            if main:
                write_folder(final, self._save_final)
            distributed.barrier()
        if not last:  # resumed a finished run: report its last logged step
            rows = [l for l in open(self.metrics_path)] if os.path.isfile(self.metrics_path) else []
            last = json.loads(rows[-1]) if rows else {}
        return {"steps": step, "last": last, "metrics": self.metrics_path, "plot": plot,
                "final": final, "out": self.out}

    def _save_final(self, folder: str) -> None:
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)

    def _title(self):
        return f"{self.cfg.loss_type}  beta={self.cfg.beta}  lr={self.cfg.lr:g}"

    def _step(self, step: int, opt, sched) -> dict:
        examples = self.step_examples(step)
        micro = self.micro_batches(step)
        totals = self.obj.totals(examples)  # the whole step's counts: global normalization
        opt.zero_grad(set_to_none=True)
        sums: dict = {}
        total = 0.0
        scale = self.par.grad_scale
        for k, idx in enumerate(micro):
            real = bool(idx)
            with self.par.accumulating(sync=k == len(micro) - 1):
                with self._autocast():
                    loss, metrics = self.obj.loss(self.module, idx if real else examples[:1],
                                                  step=step, totals=totals)
                if not real:  # a pass only to keep the ranks' collectives in step
                    loss = loss * 0.0
                (loss * scale if scale != 1 else loss).backward()
            if real:
                total += loss.item()
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + (v if real else 0.0)
        if self.world > 1:
            keys = list(sums)
            vec = distributed.all_reduce_sum(torch.tensor([total] + [sums[k] for k in keys],
                                                          dtype=torch.float64))
            total, sums = float(vec[0]), {k: float(v) for k, v in zip(keys, vec[1:].tolist())}
        params = [p for p in self.par.params() if p.grad is not None]
        if not params:
            gn = 0.0
        elif self.cfg.max_grad_norm is None:  # no clipping
            gn = self.par.total_norm([p.grad for p in params])
        else:
            gn = self.par.clip(params, self.cfg.max_grad_norm)
        if not (math.isfinite(total) and math.isfinite(gn)):
            # before opt.step(): the weights stay as the last finished step left them
            self._non_finite(step, f"the loss is {total} and the gradient norm {gn}; the "
                                   f"weights were not updated")
        lr = opt.param_groups[0]["lr"]
        try:
            opt.step()
        except RuntimeError as e:  # torch refuses an update size beyond the float range
            if "overflow" not in str(e):
                raise
            self._non_finite(step, f"its update overflowed (lr {lr:g}: {e}); the learning rate "
                                   f"is far too large")
        sched.step()
        trained = self.par.params()
        if trained and not math.isfinite(self.par.total_norm(trained, norm_type=math.inf)):
            self._non_finite(step, f"its update (lr {lr:g}) made parameters non-finite; the "
                                   f"learning rate is far too large")
        return {"loss": total, "lr": lr, "grad_norm": gn, **sums}

    def _non_finite(self, step: int, what: str):
        last = (f"the last checkpoint, {self._last_ckpt}, is intact" if self._last_ckpt
                else "no checkpoint was saved")
        raise NonFiniteError(f"step {step + 1}: {what}. Stopped before logging or saving this "
                             f"step; {last}. Lower --lr or check the data")


def train(model, tokenizer, records, cfg: TrainConfig, out_dir: str, resume: bool = False,
          callbacks: Sequence[Callable] = (), overwrite: bool = False) -> dict:
    """Train ``model`` on ``records`` (preference pairs, or SFT examples with
    ``loss_type="sft"``) and return the run summary.  ``resume`` continues the run in
    ``out_dir``; ``overwrite`` replaces it; a folder holding a run needs one of them."""
    from .objectives import make_objective

    cfg.validate()
    run_folder.check_start(out_dir, resume, overwrite)  # fail fast, before tokenizing
    obj = make_objective(records, tokenizer, cfg)
    return Trainer(model, tokenizer, obj, cfg, out_dir, callbacks).train(resume=resume,
                                                                         overwrite=overwrite)
