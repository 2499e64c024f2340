"""Cascade RL (paper §2.3): the MPO and GSPO objectives and the per-token log-probs as pure JAX functions
(`losses`), their train steps and the two stages as train.py runs them (`mpo`, `gspo`; `training/stages.py`
picks one), rollouts from the inference engine (`rollout`), rewards and the accuracy filter (`rewards`),
preference pairs (`pairs`) and the digits demo (`cascade`)."""
from internvl_jax.training.rl.losses import (AGG_MODES, MPO_WEIGHTS, BCOState, bco_init, bco_pair_loss,
                                             dpo_sigmoid_loss, group_advantages, grpo_loss, gspo_loss, mpo_loss,
                                             policy_token_logps, sequence_logps, sft_loss, token_logps)

__all__ = ["AGG_MODES", "MPO_WEIGHTS", "BCOState", "bco_init", "bco_pair_loss", "dpo_sigmoid_loss",
           "group_advantages", "grpo_loss", "gspo_loss", "mpo_loss", "policy_token_logps", "sequence_logps",
           "sft_loss", "token_logps"]
