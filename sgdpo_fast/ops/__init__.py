from .logprob import FusedTokenLogprobFunction, fused_token_logprobs
from .transform import LogitTransform

__all__ = ["FusedTokenLogprobFunction", "fused_token_logprobs", "LogitTransform"]
