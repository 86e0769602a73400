"""Plain-Python layout shared by the pairwise-loss kernel (``pairwise_loss.py``) and its
torch twin (``sgdpo_fast/losses/pairwise.py``): loss codes and the columns of ``stats``.
Importing it does not import triton."""
from types import MappingProxyType

# loss codes: index into LOSS_TYPES (sgdpo_fast.losses.formulas.LOSS_TYPES is this tuple)
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "sgdpo")
LOSS_CODE = MappingProxyType({name: i for i, name in enumerate(LOSS_TYPES)})  # read-only

# columns of the per-pair ``stats`` [B, N_STATS]
COL_LOSS = 0      # per-pair preference loss (no NLL term)
COL_LOGP_W = 1    # chosen policy sequence log-prob (sum, or mean with average_log_prob / simpo)
COL_LOGP_L = 2    # rejected, likewise
COL_REW_W = 3     # chosen reward  beta * (logp - ref logp), same aggregation as COL_LOGP_W
COL_REW_L = 4     # rejected reward
COL_PIL_W = 5     # beta * chosen pilot log-ratio (sgdpo; 0 otherwise)
COL_PIL_L = 6     # beta * rejected pilot log-ratio
COL_SUM_W = 7     # chosen policy log-prob summed over the response (for the NLL term)
N_STATS = 8
