"""Cascade RL (paper §2.3): the MPO and GSPO objectives as pure JAX functions — see `losses`."""
from internvl_jax.rl.losses import (AGG_MODES, MPO_WEIGHTS, BCOState, bco_init, bco_pair_loss, dpo_sigmoid_loss,
                                    group_advantages, grpo_loss, gspo_loss, mpo_loss, sequence_logps, sft_loss)

__all__ = ["AGG_MODES", "MPO_WEIGHTS", "BCOState", "bco_init", "bco_pair_loss", "dpo_sigmoid_loss",
           "group_advantages", "grpo_loss", "gspo_loss", "mpo_loss", "sequence_logps", "sft_loss"]
