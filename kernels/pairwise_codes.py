"""Plain-Python layout shared by the pairwise-loss kernel (``pairwise_loss.py``) and its
torch twin (``sgdpo_fast/losses/pairwise.py``): loss codes, f-divergence codes and the
columns of ``stats``.  Importing it does not import triton."""
from types import MappingProxyType

# loss codes: index into LOSS_TYPES (sgdpo_fast.losses.formulas.LOSS_TYPES is this tuple).
# Every per-pair loss has a code the kernel understands; "aot" and "aot_unpaired" sort the
# batch (the loss of a pair depends on the others), so only the torch path computes them
# (``KERNEL_LOSS_TYPES`` are the kernel's).
LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "sgdpo", "exo_pair", "nca_pair",
              "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop", "sigmoid_norm", "sft",
              "aot", "aot_unpaired")
LOSS_CODE = MappingProxyType({name: i for i, name in enumerate(LOSS_TYPES)})  # read-only
BATCH_LOSS_TYPES = frozenset({"aot", "aot_unpaired"})
KERNEL_LOSS_TYPES = tuple(t for t in LOSS_TYPES if t not in BATCH_LOSS_TYPES)

# f-divergence regularizers (f-DPO; TRL's f_divergence_type): the loss side's log-ratios x
# go through f'(exp(x)) before the loss
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
FDIV_CODE = MappingProxyType({name: i for i, name in enumerate(F_DIVERGENCES)})

# columns of the per-pair ``stats`` [B, N_STATS]
COL_LOSS = 0      # per-pair preference loss (no NLL term); aot*: the i-th smallest pair's
COL_LOGP_W = 1    # chosen policy sequence log-prob (sum, or mean with average_log_prob / simpo)
COL_LOGP_L = 2    # rejected, likewise
COL_REW_W = 3     # chosen reward  beta * (logp - ref logp), same aggregation as COL_LOGP_W
COL_REW_L = 4     # rejected reward
COL_PIL_W = 5     # beta * chosen pilot log-ratio (sgdpo; 0 otherwise)
COL_PIL_L = 6     # beta * rejected pilot log-ratio
COL_SUM_W = 7     # chosen policy log-prob summed over the response (for the NLL term)
N_STATS = 8
