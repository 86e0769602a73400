"""Training configuration and the rules every setting must satisfy.

Defaults are the SGDPO paper's for real runs (beta 0.1, learning rate 5e-7, one
epoch, pilot ratios 0.6 / 0.9).  ``DEMO`` holds the documented settings of the
CPU demo on the embedded 135M model, where 5e-7 for a few dozen steps would not
move the weights visibly.

``RULES`` says, per field, what is allowed (finite numbers, ranges, choices, integers).
:meth:`TrainConfig.validate` applies them plus the loss's own cross-field checks (through
``losses.preference.validate_preference_inputs``, the one implementation of those), and
the command line parses each flag with the same rule (:meth:`Rule.parse`), so a bad value
is refused before any file is read or written.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from types import MappingProxyType
from typing import Optional, Tuple


from ..losses import formulas
from ..ops.plan import BACKENDS


class ConfigError(ValueError):
    """A setting outside what it allows; the message names the setting."""


@dataclass(frozen=True)
class Rule:
    """What one setting allows: ``kind`` int, float, bool, str or choice; numbers within
    ``lo``..``hi`` (open ends with ``lo_open`` / ``hi_open``; floats always finite);
    ``none`` also allows None (on the command line, for numbers: ``none`` or ``off``);
    ``choices`` for ``choice``."""

    kind: str
    lo: Optional[float] = None
    hi: Optional[float] = None
    lo_open: bool = False
    hi_open: bool = False
    none: bool = False
    choices: Tuple[str, ...] = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(self.choices)
        if self.kind in ("bool", "str"):
            return "a " + ("boolean" if self.kind == "bool" else "string")
        what = "an integer" if self.kind == "int" else "a finite number"
        if self.lo is not None and self.hi is not None:
            rng = (f" in {'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                   f"{')' if self.hi_open else ']'}")
        elif self.lo is not None:
            rng = f" {'>' if self.lo_open else '>='} {self.lo:g}"
        elif self.hi is not None:
            rng = f" {'<' if self.hi_open else '<='} {self.hi:g}"
        else:
            rng = ""
        return what + rng + (" (or none)" if self.none else "")

    def problem(self, value) -> Optional[str]:
        """None if ``value`` is allowed, else what is wrong with it."""
        if value is None:
            return None if self.none else f"must be {self.describe()}, got None"
        bad = f"must be {self.describe()}, got {value!r}"
        if self.kind == "bool":
            return None if isinstance(value, bool) else bad
        if self.kind == "str":
            return None if isinstance(value, str) else bad
        if self.kind == "choice":
            return None if value in self.choices else bad
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return bad
        if self.kind == "int" and not isinstance(value, int):
            return bad
        if isinstance(value, float) and not math.isfinite(value):
            return bad
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return bad
        if self.hi is not None and (value >= self.hi if self.hi_open else value > self.hi):
            return bad
        return None

    def check(self, name: str, value):
        p = self.problem(value)
        if p is not None:
            raise ConfigError(f"{name} {p}")
        return value

    def parse(self, text: str):
        """The value of a command-line string; ValueError (argparse reports it with the flag)
        when it is not allowed."""
        if self.none and self.kind in ("int", "float") and text.strip().lower() in ("none", "off"):
            return None
        if self.kind == "int":
            try:
                value = int(text)
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        elif self.kind == "float":
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        else:
            value = text
        p = self.problem(value)
        if p is not None:
            raise ValueError(p)
        return value


_POS_INT = Rule("int", lo=1)
_NONNEG_INT = Rule("int", lo=0)
_FLOAT = Rule("float")
_POS = Rule("float", lo=0, lo_open=True)
_NONNEG = Rule("float", lo=0)
_RATIO = Rule("float", lo=0, hi=1, lo_open=True)
_BOOL = Rule("bool")
_OPT_BOOL = Rule("bool", none=True)


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
    discopop_tau: float = 0.05        # discopop's temperature (TRL's)
    ld_alpha: Optional[float] = None  # LD-DPO: weight of answer tokens past the pair's shared length
    f_divergence_type: str = "reverse_kl"   # f-DPO (TRL's): reverse_kl | forward_kl | js_divergence | alpha_divergence
    f_alpha_divergence_coef: float = 0.5    # alpha of f_divergence_type="alpha_divergence"
    reference: str = "precompute"     # precompute (per-token ref log-probs once) | copy (frozen model)
    # optimization
    lr: float = 5e-7
    weight_decay: float = 0.0
    adam_betas: tuple = (0.9, 0.999)
    warmup_ratio: float = 0.1
    max_grad_norm: Optional[float] = 1.0  # None: no clipping (never 0 or a negative number)
    epochs: int = 1
    max_steps: Optional[int] = None   # optimizer steps; overrides epochs when set
    batch_size: int = 2               # pairs (or SFT examples) per micro-batch
    grad_accum: int = 1
    # sequences
    max_length: int = 512             # prompt + answer tokens, always (>= 2)
    max_prompt_length: int = 256
    system_prompt: Optional[str] = None
    # machinery
    seed: int = 0
    bf16: Optional[bool] = None       # None: bf16 autocast on CUDA, off on CPU
    gradient_checkpointing: bool = False
    backend: str = "auto"             # log-prob op backend
    parallel: str = "ddp"             # several processes (torchrun / accelerate launch): ddp | fsdp (FSDP2)
    save_every: int = 50              # checkpoint every K optimizer steps (0: only at the end)
    keep_checkpoints: int = 2         # 0: keep all
    save_final: bool = True           # save_pretrained the final model to <out>/final
    progress: bool = True             # tqdm bar

    def validate(self) -> "TrainConfig":
        """Raise ConfigError (a ValueError) naming the first setting that is not allowed."""
        for name, rule in RULES.items():
            rule.check(name, getattr(self, name))
        b = self.adam_betas
        if not (isinstance(b, (tuple, list)) and len(b) == 2 and
                all(Rule("float", lo=0, hi=1, hi_open=True).problem(x) is None for x in b)):
            raise ConfigError(f"adam_betas must be two finite numbers in [0, 1), got {b!r}")
        if self.loss_type != "sft":
            from ..losses.preference import loss_type_list, validate_loss_options
            try:  # the loss's own checks of its settings
                validate_loss_options(
                    loss_type_list(self.loss_type), beta=self.beta,
                    label_smoothing=self.label_smoothing, r1=self.pilot_ratio_chosen,
                    r2=self.pilot_ratio_rejected, pilot_mode=self.pilot_mode,
                    simpo_gamma=self.simpo_gamma, nll_alpha=self.nll_alpha,
                    discopop_tau=self.discopop_tau, ld_alpha=self.ld_alpha,
                    f_divergence_type=self.f_divergence_type,
                    f_alpha_divergence_coef=self.f_alpha_divergence_coef)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)


RULES = MappingProxyType({
    "loss_type": Rule("choice", choices=("sft",) + tuple(formulas.LOSS_TYPES)),
    "beta": _POS,
    "label_smoothing": Rule("float", lo=0, hi=0.5),
    "pilot_ratio_chosen": _RATIO,
    "pilot_ratio_rejected": _RATIO,
    "pilot_mode": Rule("choice", choices=("different", "same")),
    "pilot_grad": _BOOL,
    "simpo_gamma": _FLOAT,
    "nll_alpha": _NONNEG,
    "discopop_tau": _POS,
    "ld_alpha": Rule("float", lo=0, hi=1, none=True),
    "f_divergence_type": Rule("choice", choices=tuple(formulas.F_DIVERGENCES)),
    "f_alpha_divergence_coef": _FLOAT,
    "reference": Rule("choice", choices=("precompute", "copy")),
    "lr": _POS,
    "weight_decay": _NONNEG,
    "warmup_ratio": Rule("float", lo=0, hi=1, hi_open=True),
    "max_grad_norm": Rule("float", lo=0, lo_open=True, none=True),
    "epochs": _POS_INT,
    "max_steps": Rule("int", lo=1, none=True),
    "batch_size": _POS_INT,
    "grad_accum": _POS_INT,
    "max_length": Rule("int", lo=2),
    "max_prompt_length": _POS_INT,
    "system_prompt": Rule("str", none=True),
    "seed": Rule("int", lo=0, hi=2**32 - 1),
    "bf16": _OPT_BOOL,
    "gradient_checkpointing": _BOOL,
    "backend": Rule("choice", choices=("auto",) + tuple(BACKENDS)),
    "parallel": Rule("choice", choices=("ddp", "fsdp")),
    "save_every": _NONNEG_INT,
    "keep_checkpoints": _NONNEG_INT,
    "save_final": _BOOL,
    "progress": _BOOL,
})

# Settings that change how a run is carried out or kept, not what it computes: a resumed run
# may differ in these (``backend``: the same math to float rounding; the others: none).
RESUME_FREE = frozenset({"progress", "save_every", "keep_checkpoints", "save_final",
                         "gradient_checkpointing", "backend"})

# The CPU demo on SmolLM2-135M: a few dozen steps, so a larger learning rate than the paper's.
DEMO = dict(lr=5e-6, warmup_ratio=0.1, batch_size=2, grad_accum=2, max_length=160,
            max_prompt_length=96, save_every=4, keep_checkpoints=1)
