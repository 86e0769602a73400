"""Training configuration.

Defaults are the SGDPO paper's for real runs (beta 0.1, learning rate 5e-7, one
epoch, pilot ratios 0.6 / 0.9).  ``DEMO`` holds the documented settings of the
CPU demo on the embedded 135M model, where 5e-7 for a few dozen steps would not
move the weights visibly.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from ..losses import formulas


@dataclass
class TrainConfig:
    # objective
    loss_type: str = "sgdpo"          # sigmoid | ipo | hinge | robust | simpo | sgdpo | sft
    beta: float = 0.1
    label_smoothing: float = 0.0
    pilot_ratio_chosen: float = 0.6
    pilot_ratio_rejected: float = 0.9
    pilot_mode: str = "different"
    pilot_grad: bool = False
    simpo_gamma: float = 0.5
    nll_alpha: float = 0.0
    reference: str = "precompute"     # precompute (per-token ref log-probs once) | copy (frozen model)
    # optimization
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    epochs: int = 1
    max_steps: Optional[int] = None   # optimizer steps; overrides epochs when set
    batch_size: int = 2               # pairs (or SFT examples) per micro-batch
    grad_accum: int = 1
    # sequences
    max_length: int = 512
    max_prompt_length: int = 256
    system_prompt: Optional[str] = None
    # machinery
    seed: int = 0
    bf16: Optional[bool] = None       # None: bf16 autocast on CUDA, off on CPU
    gradient_checkpointing: bool = False
    backend: str = "auto"             # log-prob op backend
    save_every: int = 50              # checkpoint every K optimizer steps (0: only at the end)
    keep_checkpoints: int = 2
    save_final: bool = True           # save_pretrained the final model to <out>/final
    progress: bool = True             # tqdm bar

    def validate(self) -> "TrainConfig":
        if self.loss_type != "sft" and self.loss_type not in formulas.LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: expected 'sft' or one of "
                             f"{formulas.LOSS_TYPES}")
        if self.reference not in ("precompute", "copy"):
            raise ValueError(f"reference must be 'precompute' or 'copy', got {self.reference!r}")
        for name in ("batch_size", "grad_accum", "epochs", "max_length", "max_prompt_length"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


# The CPU demo on SmolLM2-135M: a few dozen steps, so a larger learning rate than the paper's.
DEMO = dict(lr=5e-6, warmup_ratio=0.1, batch_size=2, grad_accum=2, max_length=160,
            max_prompt_length=96, save_every=4, keep_checkpoints=1)
