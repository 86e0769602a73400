"""The thin trainer: preference (DPO family, SGDPO) and SFT objectives over Hugging Face
causal LMs, with the LM head through the fused op.  See ``loop.py`` for the run folder."""
from .config import DEMO, TrainConfig
from .loop import Trainer, cosine_with_warmup, train
from .objectives import PreferenceObjective, SFTObjective, make_objective

__all__ = ["DEMO", "TrainConfig", "Trainer", "train", "cosine_with_warmup",
           "PreferenceObjective", "SFTObjective", "make_objective"]
