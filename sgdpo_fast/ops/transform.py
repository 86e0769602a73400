"""The logit transform shared by every backend.

Raw logits ``x = hidden @ weight.T + bias`` become ``z = transform(x)``:

1. ``y = x * logit_scale``
2. ``y = softcap * tanh(y / softcap)`` when ``softcap`` is set
3. ``z = y / temperature``

``dz/dx`` is needed by every backward epilogue; it is returned by
:func:`apply_with_derivative` so backends do not re-derive it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class LogitTransform:
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    temperature: float = 1.0

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Transform a float32 (or float64) logit tile (``x`` itself for the identity)."""
        z = x * self.logit_scale if self.logit_scale != 1.0 else x
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z

    def apply_with_derivative(self, x: torch.Tensor):
        """Return ``(z, dz/dx)``; ``dz/dx`` is a python float when constant."""
        if self.softcap is None:
            return self.apply(x), self.logit_scale / self.temperature
        t = torch.tanh(x * (self.logit_scale / self.softcap))
        z = t * (self.softcap / self.temperature)
        dzdx = (1.0 - t * t) * (self.logit_scale / self.temperature)
        return z, dzdx
