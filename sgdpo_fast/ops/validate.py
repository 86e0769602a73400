"""Input checks of the log-prob op: every failure is a ValueError naming the argument.

``validate_logprob_inputs`` looks only at types, shapes, dtypes, devices and Python
scalars, so ``torch.compile`` traces it without a graph break; ``check_targets`` reads
tensor values and runs inside the op (eager, at run time).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INT64 = (-2**63, 2**63 - 1)


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise ValueError(f"{name} must be a floating tensor (float32, float16 or bfloat16), got {t.dtype}")


def check_int(name: str, value) -> int:
    """``value`` as an int64-range Python int, else ValueError (1.5, True and 2**70 are
    refused rather than truncated)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if not _INT64[0] <= value <= _INT64[1]:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return value


def validate_logprob_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    ignore_index: int,
    temperature: float,
    softcap: Optional[float],
    logit_scale: float,
    exact_dtypes: bool = True,
) -> None:
    """Raise ``ValueError`` naming the offending argument; returns nothing when all is well.

    hidden  [..., D] floating; weight [V, D] same dtype (unless ``exact_dtypes`` is False:
    the ZeRO-3 / vocab-parallel path casts it) and device; targets [...] integer, shaped
    like ``hidden.shape[:-1]``; bias [V] same dtype and device, optional.
    """
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension [..., D]")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight has D={weight.shape[1]} but hidden has D={hidden.shape[-1]} (last dim)")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary (V=0)")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    if exact_dtypes and weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if not isinstance(targets, torch.Tensor):
        raise ValueError(f"targets must be a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden.shape[:-1] "
            f"{tuple(hidden.shape[:-1])}")
    if targets.device != hidden.device:
        raise ValueError(f"targets is on {targets.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_float("bias", bias)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V]=({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
        if exact_dtypes and bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} differs from hidden dtype {hidden.dtype}")
    check_int("ignore_index", ignore_index)
    for name, val in (("temperature", temperature), ("logit_scale", logit_scale)):
        if not (isinstance(val, (int, float)) and not isinstance(val, bool)
                and math.isfinite(val) and val > 0):
            raise ValueError(f"{name} must be a finite positive number, got {val!r}")
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a finite positive number, got {softcap!r}")


def check_targets(targets: torch.Tensor, V: int, ignore_index: int) -> None:
    """Every target lies in ``[0, V)`` or equals ``ignore_index`` (reads the values)."""
    if targets.numel():
        bad = (targets != ignore_index) & ((targets < 0) | (targets >= V))
        if bool(bad.any()):
            first = targets[bad].flatten()[0].item()
            raise ValueError(
                f"targets holds {first}, outside [0, {V}) and not ignore_index={ignore_index}")
