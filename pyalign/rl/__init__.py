"""Online RL from rewards: PPO/GRPO-family policy losses in one fused kernel (:mod:`.policy`), KL
estimators (:mod:`.kl`), group advantages, plain or from a reward ensemble penalized by its uncertainty (:mod:`.advantages`) and PPO's value loss (:mod:`.value`).
Option names follow TRL's ``GRPOConfig`` where TRL has the option, verl's where only verl has it."""
from pyalign.rl.advantages import ESTIMATORS, MULTI_OBJECTIVE_AGGREGATIONS, ensemble_advantages, group_advantages
from pyalign.rl.fused_linear import fused_linear_policy_loss
from pyalign.rl.kl import kl_penalty
from pyalign.rl.policy import (IMPORTANCE_SAMPLING_MODES, KL_ESTIMATORS, LOSS_AGG_MODES, LOSS_TYPES,
                               policy_loss)
from pyalign.rl.value import value_loss

__all__ = ["policy_loss", "fused_linear_policy_loss", "kl_penalty", "group_advantages", "ensemble_advantages", "value_loss", "LOSS_TYPES", "KL_ESTIMATORS",
           "IMPORTANCE_SAMPLING_MODES", "LOSS_AGG_MODES", "ESTIMATORS", "MULTI_OBJECTIVE_AGGREGATIONS"]
