"""The thin trainer: preference (DPO family, SGDPO) and SFT objectives over Hugging Face
causal LMs, with the LM head through the fused op.  See ``loop.py`` for the run folder and
docs/guarantees.md for what a run promises (exact resume, atomic writes, no pickle, ...)."""
from .checkpoint import CheckpointError
from .config import DEMO, ConfigError, TrainConfig
from .files import RunWriteError
from .loop import NonFiniteError, Trainer, cosine_with_warmup, train
from .objectives import PreferenceObjective, SFTObjective, make_objective
from .run_folder import RunFolderError, check_start

__all__ = ["DEMO", "TrainConfig", "Trainer", "train", "cosine_with_warmup",
           "PreferenceObjective", "SFTObjective", "make_objective", "ConfigError",
           "RunFolderError", "RunWriteError", "NonFiniteError", "CheckpointError", "check_start"]
