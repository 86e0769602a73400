"""Preference losses: DPO family and SGDPO on per-token log-probs, and the fused-head module.

- ``preference_loss`` (``preference.py``): per-token log-probs -> loss, rewards, metrics.
- ``FusedLinearPreferenceLoss`` (``fused_linear.py``): hidden states + LM head -> loss,
  never building the [tokens x vocab] logits; Liger's calling convention.
- ``formulas.py`` per-loss formulas, ``pilots.py`` SGDPO pilot draws, ``pairwise.py``
  the pairwise step (torch path, Triton kernel dispatch, the custom op with its autograd).
"""
from .fused_linear import FusedLinearPreferenceLoss, PreferenceAux
from .formulas import LOSS_TYPES
from .pilots import draw_pilot_masks, pilot_counts
from .preference import PreferenceLossOutput, preference_loss

__all__ = ["preference_loss", "PreferenceLossOutput", "FusedLinearPreferenceLoss", "PreferenceAux",
           "LOSS_TYPES", "draw_pilot_masks", "pilot_counts"]
