"""Cascade RL (paper §2.3): the MPO and GSPO objectives as pure JAX functions (`losses`), their train steps
(`mpo`, `gspo`), rollouts from the inference engine (`rollout`), rewards and the accuracy filter (`rewards`),
preference pairs (`pairs`), the two stages as train.py runs (`stages`) and the digits demo (`cascade`)."""
from internvl_jax.training.rl.losses import (AGG_MODES, MPO_WEIGHTS, BCOState, bco_init, bco_pair_loss, dpo_sigmoid_loss,
                                    group_advantages, grpo_loss, gspo_loss, mpo_loss, sequence_logps, sft_loss)

__all__ = ["AGG_MODES", "MPO_WEIGHTS", "BCOState", "bco_init", "bco_pair_loss", "dpo_sigmoid_loss",
           "group_advantages", "grpo_loss", "gspo_loss", "mpo_loss", "sequence_logps", "sft_loss"]
