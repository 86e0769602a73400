"""Preference losses: DPO family (every TRL 1.16 DPO loss type), SimPO and SGDPO on per-token
log-probs, and the fused-head modules.

- ``preference_loss`` (``preference.py``): per-token log-probs -> loss, rewards, metrics.
- ``FusedLinearDPOLoss`` / ``FusedLinearPreferenceLoss`` (``fused_linear.py``): hidden
  states + LM head -> loss, never building the [tokens x vocab] logits; the first with
  Liger-Kernel's ``LigerFusedLinearDPOLoss`` calling convention (default sigmoid), the
  second sgdpo_fast's (default sgdpo); one implementation.
- ``formulas.py`` per-loss formulas, ``pilots.py`` SGDPO pilot draws, ``pairwise.py``
  the pairwise step (torch path, Triton kernel dispatch, the custom op with its autograd).
"""
from .fused_linear import FusedLinearDPOLoss, FusedLinearPreferenceLoss, PreferenceAux
from .formulas import F_DIVERGENCES, LOSS_TYPES
from .pilots import draw_pilot_masks, pilot_counts
from .preference import PreferenceLossOutput, preference_loss

__all__ = ["preference_loss", "PreferenceLossOutput", "FusedLinearDPOLoss",
           "FusedLinearPreferenceLoss", "PreferenceAux", "LOSS_TYPES", "F_DIVERGENCES",
           "draw_pilot_masks", "pilot_counts"]
