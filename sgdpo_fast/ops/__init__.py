"""The log-prob op (layer 0 of the package): plan, tiled driver, backends, custom op,
vocab-parallel."""
from .logprob import fused_token_logprobs, token_logprobs
from .plan import METRICS, LogprobPlan, TileConfig, TritonConfig
from .transform import LogitTransform

__all__ = ["fused_token_logprobs", "token_logprobs", "LogprobPlan", "TileConfig",
           "TritonConfig", "METRICS", "LogitTransform"]
